"""The drivers: all row chunks of one call, for the forward and for the recomputing backward.

- `linear_driver`: per row chunk, both LM heads with an fp32 result (`matmuls.head_logits`;
  [r, V] logits of one chunk only, never [N, V]), the chunk step (`run_chunk`), then the
  gradient matmuls, so no logits are recomputed: 2 N V (Hs + Ht) + 4 N V Hs FLOP, the minimum.
- `logits_driver`: the chunk step over given logits.

The chunk step runs on the Triton row kernel (impl="triton"), on the native CPU kernel
(impl="torch" on CPU where `align-ti build-native` built it: `uses_native_kernel`) or on the
PyTorch chunk code. Chunks are sized by bytes (`heuristics.rows_per_chunk`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

from align_ti import native as _native
from align_ti.ops import heuristics as _heur
from align_ti.ops.fused_kl import rows as _rows
from align_ti.ops.fused_kl.chunk_torch import ChunkSpec, chunk_torch
from align_ti.ops.fused_kl.chunk_triton import chunk_triton
from align_ti.ops.fused_kl.matmuls import StudentGrads, cuda_low_precision_mm, grad_matmuls, head_logits
from align_ti.ops.fused_kl.options import FusedKLOptions
from align_ti.ops.fused_kl.rows import RowPlan

_F32 = torch.float32


class Head(NamedTuple):
    """One model's LM-head input: hidden [N, H], weight [V, H], bias [V] or None."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class GradRequest:
    """Which student gradients a `linear_driver` run computes, and how.

    dh, dw, db: the hidden states', weight's and bias's gradients.
    split_ce: the CE's gradients in accumulators of their own (the forward: the upstream
        scalars of kl and ce are not known yet) instead of summed with the divergence's.
    grad_kl, grad_ce: the upstream gradients (None: 1, the forward's unit upstream).
    fp32_weight_grad: dw accumulates in fp32 (else in the weight's dtype, once per chunk).
    """

    dh: bool = False
    dw: bool = False
    db: bool = False
    split_ce: bool = True
    grad_kl: Optional[torch.Tensor] = None
    grad_ce: Optional[torch.Tensor] = None
    fp32_weight_grad: bool = True

    @property
    def any(self) -> bool:
        return self.dh or self.dw or self.db


class LinearResult(NamedTuple):
    kl: torch.Tensor                       # fp32 scalar, or [M] for reduction="none"
    ce: Optional[torch.Tensor]             # fp32 scalar with labels, else None
    grads: Optional[StudentGrads]          # fp32 accumulators (dw: see fp32_weight_grad)
    grads_ce: Optional[StudentGrads]       # the CE's, with split_ce
    row_d: torch.Tensor                    # fp32 [n_proc]: D_i of every processed row, unweighted


# --------------------------------------------------------------------------------------------
# the chunk step on the chosen implementation
# --------------------------------------------------------------------------------------------

# logits dtypes the native kernel reads directly (fp32 maths; the gradient stored in zs's dtype)
_NATIVE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def uses_native_kernel(zs: torch.Tensor, zt: torch.Tensor) -> bool:
    """Whether impl="torch" hands these logits rows to the native CPU kernel (built, enabled,
    CPU, a dtype it reads, unit column stride)."""
    return (zs.device.type == "cpu" and zs.dtype in _NATIVE_DTYPES and zt.dtype in _NATIVE_DTYPES
            and zs.stride(-1) == 1 and zt.stride(-1) == 1 and _native.enabled())


def run_chunk(impl: str, zs, zt, spec: ChunkSpec, labels=None, a=None, c=None, scratch=None,
              g_out=None):
    """`chunk_torch`'s contract on the chosen implementation. zs, zt are fp32 chunk buffers,
    or (only where `uses_native_kernel`) bf16/fp16 rows, whose gradient is then written in
    place in their dtype. `g_out` (Triton only): where the gradient goes instead of over zs."""
    if impl == "triton":
        return chunk_triton(zs, zt, spec, labels, a, c, g_out)
    assert g_out is None, "g_out is a Triton-path option"
    if uses_native_kernel(zs, zt):
        d, nll, gce = torch.ops.align_ti.kl_chunk(zs, zt, spec.v, spec.div_code, spec.beta, spec.inv_t,
                                                  labels, a, c, spec.need_grad, spec.split)
        has_ce = labels is not None
        return (d, nll if has_ce else None, zs if spec.need_grad else None,
                gce if (spec.need_grad and has_ce and spec.split) else None)
    # not through the op: the reusable scratch buffers save an allocation per chunk
    return chunk_torch(zs, zt, spec, labels, a, c, scratch)


def _chunk_rows(per_row_bytes: int, n_proc: int, opts: FusedKLOptions, device, balanced: bool) -> int:
    rows = _heur.rows_per_chunk(per_row_bytes, device, opts.chunk_bytes or None)
    return _heur.balanced_rows(n_proc, rows, device) if balanced else rows


# --------------------------------------------------------------------------------------------
# fused with both LM heads
# --------------------------------------------------------------------------------------------

def _accumulators(student: Head, want: GradRequest, ns: int, n_proc: int) -> StudentGrads:
    """Zeroed fp32 accumulators of the requested gradients (dw: see `_weight_accumulator`)."""
    hs, ws, bs = student
    zeros = dict(dtype=_F32, device=hs.device)
    return StudentGrads(
        torch.zeros(hs.shape, **zeros) if want.dh else None,
        _weight_accumulator(student, want, ns, n_proc) if want.dw else None,
        torch.zeros(ws.shape[0], **zeros) if (want.db and bs is not None) else None,
    )


def _weight_accumulator(student: Head, want: GradRequest, ns: int, n_proc: int) -> torch.Tensor:
    """The [Vs, Hs] weight-gradient accumulator, fp32 or (fp32_weight_grad=False) in the
    weight's dtype. Where the first chunk's matmul writes that dtype directly (mm out=), it
    writes rows [:ns] and only the rows past them are zeroed (saves a pass over [Vs, Hs]);
    the CPU upcasting path for a low-precision weight adds into zeros."""
    hs, ws, _ = student
    dtype = _F32 if want.fp32_weight_grad else ws.dtype
    direct = ws.dtype == _F32 or dtype != _F32 or cuda_low_precision_mm(hs)
    if not direct or n_proc == 0:
        return torch.zeros(ws.shape, dtype=dtype, device=hs.device)
    t = torch.empty(ws.shape, dtype=dtype, device=hs.device)
    t[ns:].zero_()
    return t


def linear_driver(student: Head, teacher: Head, rows: RowPlan, opts: FusedKLOptions,
                  want: GradRequest = GradRequest()) -> LinearResult:
    """Run all row chunks of `fused_linear_kl` / `fused_linear_distill`: the losses, and the
    gradients `want` asks for (none: the forward only)."""
    hs, ws, bs = student
    device = hs.device
    n_proc = rows.count(hs.shape[0])
    v = opts.vocab_size
    has_ce = rows.labels is not None
    ns = ws.shape[0] if has_ce else v  # the CE reads all the student's columns
    need_grad = want.any
    split = has_ce and want.split_ce
    spec = ChunkSpec(v, opts.kl.code, opts.kl.beta, 1.0 / opts.kl.temperature, need_grad, split)
    w_eff = _rows.row_weights(rows, n_proc, device)

    a = c = None
    if need_grad:
        a = _rows.kl_coefficients(w_eff, rows.mask, n_proc, device, opts.kl.reduction, want.grad_kl)
        if has_ce:
            c = _rows.ce_coefficients(rows.labels, rows.mask, want.grad_ce)
    grads = _accumulators(student, want, ns, n_proc) if need_grad else None
    grads_ce = _accumulators(student, want, ns, n_proc) if (need_grad and split) else None

    # The Triton kernel writes a low-precision student's gradient in its dtype, into a buffer
    # of its own: the gradient matmuls round it to that dtype anyway, and the fp32 logits
    # buffer is then only read. Not with a bias gradient (its row sum stays fp32-exact).
    g_dtype = hs.dtype if (opts.impl == "triton" and need_grad and hs.dtype != _F32
                           and not (want.db and bs is not None)) else None
    # scratch per row: fp32 student + teacher logits (+ the separate CE gradient when split,
    # + the low-precision gradient); the torch path's own temporaries are per sub-block
    # (`chunk_torch`), a few MiB
    per_row = 4 * (ns + v + (ns if split else 0))
    if g_dtype is not None:
        per_row += ns * hs.element_size()
    r_chunk = _chunk_rows(per_row, n_proc, opts, device, balanced=True)
    buf_s = torch.empty(r_chunk, ns, dtype=_F32, device=device)  # reused by every chunk
    buf_t = torch.empty(r_chunk, v, dtype=_F32, device=device)
    buf_g = None if g_dtype is None else torch.empty(r_chunk, ns, dtype=g_dtype, device=device)
    scratch = {}
    d_all = torch.zeros(n_proc, dtype=_F32, device=device)
    nll_all = torch.zeros(n_proc, dtype=_F32, device=device) if has_ce else None
    wt, bt = teacher.weight.detach(), None if teacher.bias is None else teacher.bias.detach()
    for s in range(0, n_proc, r_chunk):
        e = min(s + r_chunk, n_proc)
        sel, hs_c, ht_c = _chunk_hidden(student.hidden, teacher.hidden, rows, s, e)
        zs = head_logits(hs_c, ws, bs, ns, buf_s[: e - s], scratch)
        zt = head_logits(ht_c, wt, bt, v, buf_t[: e - s], scratch)
        d, nll, g, gce = run_chunk(
            opts.impl, zs, zt, spec, rows.labels[s:e] if has_ce else None,
            a[s:e] if need_grad else None, c[s:e] if (need_grad and has_ce) else None, scratch,
            None if buf_g is None else buf_g[: e - s])
        d_all[s:e] = d
        if has_ce:
            nll_all[s:e] = nll
        if need_grad:
            grad_matmuls(g, hs_c, ws, ns, grads, sel, s == 0, scratch)
            if gce is not None:
                grad_matmuls(gce, hs_c, ws, ns, grads_ce, sel, s == 0, scratch)
        del zs, zt, g, gce
    del buf_s, buf_t, buf_g, scratch

    kl = _rows.reduce_kl(d_all, w_eff, rows.mask, opts.kl.reduction, n_proc, device)
    ce = _rows.reduce_ce(nll_all, rows.labels, rows.mask) if has_ce else None
    return LinearResult(kl, ce, grads, grads_ce, d_all)


def _chunk_hidden(hs, ht, rows: RowPlan, s: int, e: int):
    """(rows of the chunk as an index or a slice, student hidden [r, Hs], teacher hidden [r, Ht])."""
    if rows.idx is not None:
        sel = rows.idx[s:e]
        return sel, hs.index_select(0, sel), ht.index_select(0, sel)
    hs_c, ht_c = hs[s:e], ht[s:e]
    if rows.mask is not None:  # unselected rows: exactly 0, even if they hold NaN/inf
        keep = rows.mask[s:e, None]
        hs_c = torch.where(keep, hs_c, torch.zeros((), dtype=hs.dtype, device=hs.device))
        ht_c = torch.where(keep, ht_c, torch.zeros((), dtype=ht.dtype, device=ht.device))
    return slice(s, e), hs_c, ht_c


# --------------------------------------------------------------------------------------------
# logits in
# --------------------------------------------------------------------------------------------

def logits_driver(zs_in, zt_in, rows: RowPlan, opts: FusedKLOptions, need_grad: bool = False,
                  grad: Optional[torch.Tensor] = None):
    """`fused_kl`'s chunks: (loss, d loss / d student_logits [N, Vs] in the logits' dtype, or
    None without need_grad), for the unit upstream gradient (grad None) or the given one."""
    device = zs_in.device
    n_proc = rows.count(zs_in.shape[0])
    v = opts.vocab_size
    spec = ChunkSpec(v, opts.kl.code, opts.kl.beta, 1.0 / opts.kl.temperature, need_grad)
    w_eff = _rows.row_weights(rows, n_proc, device)
    a = (_rows.kl_coefficients(w_eff, rows.mask, n_proc, device, opts.kl.reduction, grad)
         if need_grad else None)
    # The native CPU kernel reads fp32, bf16 and fp16 logits rows in their dtype. All rows:
    # it reads them where they are and writes the gradient rows straight into grad_logits (no
    # chunk copies, no copy-back). Selected rows: gathered copies in the logits' dtype, the
    # gradient in place over them. Otherwise (PyTorch chunk code): fp32 chunk copies.
    native = opts.impl == "torch" and uses_native_kernel(zs_in, zt_in)
    direct = native and rows.idx is None and rows.mask is None
    grad_logits = _logits_gradient(zs_in, v, direct) if need_grad else None
    dt_s, dt_t = (zs_in.dtype, zt_in.dtype) if native else (_F32, _F32)  # chunk working dtypes
    # bytes per row of a chunk: the two chunk copies (none when direct: the size then only
    # sets how many rows one kernel call gets); the PyTorch chunk code's own temporaries are
    # per sub-block (`chunk_torch`)
    per_row = v * (torch.finfo(dt_s).bits + torch.finfo(dt_t).bits) // 8
    r_chunk = _chunk_rows(per_row, n_proc, opts, device, balanced=False)
    d_all = torch.zeros(n_proc, dtype=_F32, device=device)
    scratch = {}
    for s in range(0, n_proc, r_chunk):
        e = min(s + r_chunk, n_proc)
        a_c = a[s:e] if need_grad else None
        if direct:
            d, _, _ = torch.ops.align_ti.kl_chunk_into(
                zs_in[s:e, :v], zt_in[s:e, :v], v, spec.div_code, spec.beta, spec.inv_t, None,
                a_c, None, need_grad, False, grad_logits[s:e, :v] if need_grad else None)
            d_all[s:e] = d
            continue
        zs, zt = _chunk_logits(zs_in, zt_in, rows, s, e, v, dt_s, dt_t)
        d, _, g, _ = run_chunk(opts.impl, zs, zt, spec, None, a_c, None, scratch)
        d_all[s:e] = d
        if need_grad:
            if rows.idx is None:
                grad_logits[s:e, :v] = g
            else:
                grad_logits[:, :v].index_add_(0, rows.idx[s:e], g.to(grad_logits.dtype))
        del zs, zt, g
    loss = _rows.reduce_kl(d_all, w_eff, rows.mask, opts.kl.reduction, n_proc, device)
    return loss, grad_logits


def _logits_gradient(zs_in, v: int, direct: bool) -> torch.Tensor:
    """The [N, Vs] gradient buffer, zero where no chunk writes (columns >= V'; with `direct`
    every row's first V' columns are written by the kernel)."""
    if not direct:
        return torch.zeros(zs_in.shape, dtype=zs_in.dtype, device=zs_in.device)
    g = torch.empty(zs_in.shape, dtype=zs_in.dtype, device=zs_in.device)
    if zs_in.shape[1] > v:
        g[:, v:].zero_()
    return g


def _chunk_logits(zs_in, zt_in, rows: RowPlan, s: int, e: int, v: int, dt_s, dt_t):
    """Copies of the chunk's first V' logits columns in the working dtypes."""
    if rows.idx is not None:
        sel = rows.idx[s:e]
        return zs_in[:, :v].index_select(0, sel).to(dt_s), zt_in[:, :v].index_select(0, sel).to(dt_t)
    zs = zs_in[s:e, :v].to(dt_s, copy=True, memory_format=torch.contiguous_format)
    zt = zt_in[s:e, :v].to(dt_t, copy=True, memory_format=torch.contiguous_format)
    if rows.mask is not None:  # unselected rows: exactly 0, even if they hold NaN/inf
        zs.masked_fill_(~rows.mask[s:e, None], 0.0)
        zt.masked_fill_(~rows.mask[s:e, None], 0.0)
    return zs, zt
