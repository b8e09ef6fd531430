"""The per-chunk step as custom ops, with their PyTorch default and fake implementations.

The native CPU extension (csrc/fused_kl_cpu.cpp, loaded by align_ti.native) overrides both
ops for CPU tensors via TORCH_LIBRARY_IMPL; align_ti.native imports this module to define the
schemas first. It imports no other part of the fused KL and nothing that imports native.

Both ops take (zs, zt, v, div_code, beta, inv_t, labels, a, c, need_grad, split, g_out) and
return (d [r], nll [r] or [0], gce [r, ns] fp32 or [0]); see `chunk_torch.ChunkSpec` for the
scalars. zs and zt may each be float32, bfloat16 or float16; the maths is fp32. Columns >= v
of the gradient hold only the CE term.

- `align_ti::kl_chunk`: the gradient is written in place over zs (in zs's dtype; zt is
  scratch), or into g_out when given. Declared as writing zs and zt: only for the drivers'
  own chunk buffers.
- `align_ti::kl_chunk_into`: zs and zt are only read (a caller's logits: declaring them
  written would bump their version counters and break any other backward that saved them);
  the gradient goes into g_out ([r, ns], float32 or zs's dtype). The native kernel reads the
  rows without copies and rounds the gradient once, at its store.

The two share one signature, so one C++ function implements both.
"""
from __future__ import annotations

from typing import Optional

import torch

from align_ti.ops.fused_kl.chunk_torch import ChunkSpec, chunk_torch

_F32 = torch.float32


def _empty(device) -> torch.Tensor:
    return torch.zeros(0, dtype=_F32, device=device)


def _on_fp32_copies(zs, zt, spec: ChunkSpec, labels, a, c, dest):
    """`chunk_torch` on fp32 copies of zs and zt; the gradient is copied into `dest`."""
    d, nll, g, gce = chunk_torch(zs.to(_F32, copy=True), zt.to(_F32, copy=True), spec, labels, a, c)
    if dest is not None and g is not None:
        dest.copy_(g)
    return d, nll, gce


def _outputs(d, nll, gce, device):
    """The ops' outputs: an absent nll or gce is an empty tensor."""
    return d, (nll if nll is not None else _empty(device)), (gce if gce is not None else _empty(device))


def kl_chunk_default(
    zs: torch.Tensor, zt: torch.Tensor, v: int, div_code: int, beta: float, inv_t: float,
    labels: Optional[torch.Tensor], a: Optional[torch.Tensor], c: Optional[torch.Tensor],
    need_grad: bool, split: bool, g_out: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`align_ti::kl_chunk` in PyTorch (its implementation wherever the native kernel is not
    loaded; callable directly, e.g. to compare the two)."""
    spec = ChunkSpec(v, div_code, beta, inv_t, need_grad, split)
    dest = g_out
    if g_out is None and zs.dtype != _F32:
        dest = zs  # in place in a low-precision zs: compute on fp32 copies, then store
    if dest is not None or zt.dtype != _F32:
        return _outputs(*_on_fp32_copies(zs, zt, spec, labels, a, c, dest), zs.device)
    d, nll, _, gce = chunk_torch(zs, zt, spec, labels, a, c)
    return _outputs(d, nll, gce, zs.device)


def kl_chunk_into_default(
    zs: torch.Tensor, zt: torch.Tensor, v: int, div_code: int, beta: float, inv_t: float,
    labels: Optional[torch.Tensor], a: Optional[torch.Tensor], c: Optional[torch.Tensor],
    need_grad: bool, split: bool, g_out: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`align_ti::kl_chunk_into` in PyTorch: zs and zt are only read."""
    if need_grad and g_out is None:
        raise ValueError("kl_chunk_into: need_grad needs g_out (zs and zt are only read)")
    spec = ChunkSpec(v, div_code, beta, inv_t, need_grad, split)
    return _outputs(*_on_fp32_copies(zs, zt, spec, labels, a, c, g_out), zs.device)


def _fake(zs, zt, v, div_code, beta, inv_t, labels, a, c, need_grad, split, g_out=None):
    r = zs.shape[0]
    nll = zs.new_empty((r,) if labels is not None else (0,), dtype=_F32)
    gce = zs.new_empty(zs.shape if (need_grad and labels is not None and split) else (0,), dtype=_F32)
    return zs.new_empty((r,), dtype=_F32), nll, gce


kl_chunk = torch.library.custom_op("align_ti::kl_chunk", kl_chunk_default,
                                   mutates_args=("zs", "zt", "g_out"))
kl_chunk_into = torch.library.custom_op("align_ti::kl_chunk_into", kl_chunk_into_default,
                                        mutates_args=("g_out",))
kl_chunk.register_fake(_fake)
kl_chunk_into.register_fake(_fake)
