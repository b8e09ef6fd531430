"""Which implementation runs an op call: one rule for every op.

impl="auto" picks Triton for CUDA tensors and the chunked PyTorch path elsewhere.
impl="triton" on CPU tensors works only under the Triton interpreter (TRITON_INTERPRET=1 set
before triton is imported), which the test suite uses to run the kernels without a GPU.
"""
from __future__ import annotations

import os

import torch

from align_ti.constants import IMPLS
from align_ti.validation import check_choice


def interpret_mode() -> bool:
    """Whether Triton kernels run in the interpreter (on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def resolve_impl(impl: str, device: torch.device) -> str:
    """"auto" -> "triton" on CUDA, "torch" elsewhere; a clear error for triton without CUDA."""
    check_choice("impl", impl, IMPLS)
    if impl == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if impl == "triton" and device.type != "cuda" and not interpret_mode():
        raise ValueError(
            f"impl='triton' needs CUDA tensors (got tensors on {device}); use impl='torch' or "
            "'auto', or set TRITON_INTERPRET=1 before importing triton to run the kernels on CPU"
        )
    return impl


def cdiv(a: int, b: int) -> int:
    """Ceiling division for launch grids."""
    return -(-a // b)
