"""The LM-head matmuls of the fused KL with an fp32 result: a chunk's logits, and the gradient
matmuls (d hidden = g W, d weight += g^T h, d bias += sum g).

bf16/fp16 logits are never rounded before the softmax: CUDA multiplies low-precision operands
with an fp32 result in cuBLAS (`out_dtype`); CPU upcasts the weight in vocabulary blocks of
bounded size (no fp32 matmul of low-precision inputs there).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from align_ti.ops import heuristics as _heur
from align_ti.ops.fused_kl.chunk_torch import scratch_buffer

_F32 = torch.float32


class StudentGrads(NamedTuple):
    """Gradients (or their accumulators) of the student's hidden states, weight and bias; None
    where not computed."""

    dh: Optional[torch.Tensor] = None
    dw: Optional[torch.Tensor] = None
    db: Optional[torch.Tensor] = None


def cuda_low_precision_mm(h: torch.Tensor) -> bool:
    """bf16/fp16 CUDA operands multiply with an fp32 result in cuBLAS (`out_dtype`, torch >=
    2.8: aten mm/addmm .dtype_out); older torch takes the upcasting path."""
    return (h.is_cuda and h.dtype != _F32 and hasattr(torch.ops.aten.mm, "dtype_out")
            and hasattr(torch.ops.aten.addmm, "dtype_out"))


def _weight_blocks(w, scratch):
    """(start, fp32 copy of w[start:start + step]) over the rows of a low-precision [V, H]
    weight. The copies go into one reused buffer from `scratch` (a fresh allocation per block
    costs page faults: ~4x the conversion itself)."""
    step = _heur.vocab_block_rows(w.shape[1], w.device)
    scratch = {} if scratch is None else scratch
    buf = scratch_buffer(scratch, f"w{w.shape[1]}", min(step, w.shape[0]), w.shape[1], w.device)
    for s in range(0, w.shape[0], step):
        e = min(s + step, w.shape[0])
        yield s, buf[: e - s].copy_(w[s:e])


def head_logits(h, weight, bias, ncols, out, scratch=None):
    """out (fp32 [r, ncols]) <- h @ weight[:ncols]^T + bias[:ncols], accumulated in fp32."""
    w = weight[:ncols]
    if h.dtype == _F32:
        torch.mm(h, w.t(), out=out)
    elif cuda_low_precision_mm(h):
        torch.mm(h, w.t(), out_dtype=_F32, out=out)  # cuBLAS writes fp32 straight into `out`
    else:  # CPU bf16/fp16: upcast the weight in vocabulary blocks of bounded size
        hf = h.to(_F32)
        for s, wf in _weight_blocks(w, scratch):
            torch.mm(hf, wf.t(), out=out[:, s:s + wf.shape[0]])
    if bias is not None:
        out += bias[:ncols].to(_F32)
    return out


def _grad_hidden(g, w, low, cuda_low, scratch):
    """fp32 [r, H] = g @ w."""
    if not low:
        return g @ w
    if cuda_low:
        return torch.mm(g, w, out_dtype=_F32)
    gh = torch.zeros(g.shape[0], w.shape[1], dtype=_F32, device=g.device)
    for s, wf in _weight_blocks(w, scratch):
        gh.addmm_(g[:, s:s + wf.shape[0]], wf)
    return gh


def _grad_weight(g, h, dw, first, low, cuda_low):
    """dw (+)= g^T h; with `first` written, not added to (dw may be uninitialised)."""
    if dw.dtype != _F32:  # accumulated in the weight's dtype: one rounding per chunk
        gl = g.to(h.dtype)
        if first:
            torch.mm(gl.t(), h, out=dw)
        else:
            dw.addmm_(gl.t(), h)
    elif not low:
        if first:
            torch.mm(g.t(), h, out=dw)
        else:
            dw.addmm_(g.t(), h)
    elif cuda_low:  # cuBLAS adds into the fp32 accumulator (beta = 1): no temporary
        if first:
            torch.mm(g.t(), h, out_dtype=_F32, out=dw)
        else:
            torch.addmm(dw, g.t(), h, out_dtype=_F32, out=dw)
    else:
        dw.addmm_(g.t(), h.to(_F32))


def grad_matmuls(g, h, weight, ncols, acc: StudentGrads, rows, first=False, scratch=None):
    """acc.dh[rows] += g @ W[:ncols]; acc.dw[:ncols] += g^T h; acc.db[:ncols] += g.sum(0)
    (each where its accumulator is not None).

    g is [r, ncols], fp32 or (from the Triton kernel) in h's low-precision dtype; the
    accumulators are fp32, except a dw in the weight's low-precision dtype
    (fp32_weight_grad=False), which gets each chunk's g^T h, accumulated in fp32 by the matmul,
    added and rounded to that dtype once per chunk. `rows` is an int64 index tensor
    (duplicates add up) or a slice. With `first`, dw[:ncols] is written, not added to.
    `scratch`: reusable buffers (CPU low precision)."""
    w = weight[:ncols]
    low = h.dtype != _F32
    cuda_low = cuda_low_precision_mm(h)
    if cuda_low:
        g = g.to(h.dtype)  # rounded once for both matmuls (a no-op for the kernel's gradient)
    elif g.dtype != _F32:
        g = g.to(_F32)  # CPU (interpreter tier): fp32 matmuls of the rounded gradient
    if acc.dh is not None:
        gh = _grad_hidden(g, w, low, cuda_low, scratch)
        if isinstance(rows, slice):
            acc.dh[rows] += gh
        else:
            acc.dh.index_add_(0, rows, gh)
    if acc.dw is not None:
        _grad_weight(g, h, acc.dw[:ncols], first, low, cuda_low)
    if acc.db is not None:
        acc.db[:ncols] += g.sum(0, dtype=_F32)
