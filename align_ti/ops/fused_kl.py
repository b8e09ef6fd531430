"""Vocabulary divergence fused with both LM heads: `fused_linear_kl`, `fused_linear_distill`,
`fused_kl` (launchers, autograd, torch.library registration, public functions).

Design (one structure for every implementation):

- The selected rows are processed in row chunks sized by bytes (`heuristics.rows_per_chunk`).
  For a chunk of r rows the two LM heads are applied with an fp32 result (fp32 matmul
  accumulator: bf16/fp16 logits are never rounded before the softmax), giving [r, V] fp32
  logits for that chunk only; [N, V] logits or probabilities are never held.
- The per-chunk work (log-sum-exp of both heads, the divergence, the CE term and the gradient
  with respect to the raw student logits, written in place over the chunk's logits) is done
  by `_chunk_torch` (impl="torch", any device) or by the Triton row kernel
  `align_ti.kernels.fused_kl.fused_kl_rows_kernel` (impl="triton"), which streams each row's
  vocabulary in blocks with an online log-sum-exp.
- The gradient matmuls (d hidden = g W, d weight += g^T h) follow per chunk, so no logits are
  recomputed: the work is 2 N V (Hs + Ht) + 4 N V Hs FLOP, the minimum.
- Gradients are computed during the forward when the upstream gradient is a scalar
  (reduction "mean"/"sum"), and the backward scales them; for "none", and for fp16 inputs
  (whose range needs a loss scale applied before rounding), the forward computes only the
  losses and the backward recomputes the chunks with the upstream gradient
  (`_grads_in_forward`).
- The entry points are torch.library custom ops (`align_ti::fused_linear_kl`, ...), with
  fake (meta) implementations and autograd registered, so `torch.compile(fullgraph=True)`
  traces a function calling them without a graph break.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch

from align_ti import native as _native
from align_ti.ops import heuristics as _heur
from align_ti.reference.fused_kl import (
    IGNORE_INDEX,
    KLOptions,
    check_head,
    check_labels,
    check_logits,
    check_weights,
    normalize_rows,
    resolve_vocab_size,
)
from align_ti.validation import check_bool, check_choice, check_same_device

IMPLS = ("auto", "triton", "torch")
_DIV_CODE = {"forward": 0, "reverse": 1, "jsd": 2}
_F32 = torch.float32

# A bool `rows` mask becomes indices (nonzero) on devices where that costs no host sync
# (CPU) and for reduction="none" (whose output length is the number of selected rows).
# Elsewhere (CUDA, mean/sum) the mask is applied inside the op: every row is processed and
# unselected rows contribute exactly 0, with no host sync. Tests flip this to check both.
MASK_AS_INDICES_DEVICES = ("cpu",)


# --------------------------------------------------------------------------------------------
# argument handling
# --------------------------------------------------------------------------------------------

def _resolve_impl(impl: str, device: torch.device) -> str:
    check_choice("impl", impl, IMPLS)
    if impl == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if impl == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"impl='triton' needs CUDA tensors (got tensors on {device}); use impl='torch' or "
            "'auto', or set TRITON_INTERPRET=1 before importing triton to run the kernels on CPU"
        )
    return impl


def _plan_rows(rows, weights, labels, n: int, device: torch.device, reduction: str):
    """Turn validated (rows, weights, labels) into what the custom ops take:
    (idx int64 [M] or None, mask bool [N] or None, w fp32 aligned or None, labels int64
    aligned or None). `rows` is already normalised (None, int64 indices or a bool mask)."""
    w = None if weights is None else weights.detach()
    y = None if labels is None else labels
    if rows is None or rows.dtype != torch.bool:
        idx = rows
        mask = None
    elif device.type in MASK_AS_INDICES_DEVICES or reduction == "none":
        idx = rows.nonzero().squeeze(1)
        mask = None
        if w is not None and w.shape[0] == n:
            w = w.index_select(0, idx)
        if y is not None and y.shape[0] == n:
            y = y.index_select(0, idx)
    else:
        idx = None
        mask = rows
        if w is not None and w.shape[0] != n:  # [M] weights with an [N] mask
            w = torch.zeros(n, dtype=w.dtype, device=device).masked_scatter(rows, w)
        if y is not None and y.shape[0] != n:
            y = torch.full((n,), IGNORE_INDEX, dtype=y.dtype, device=device).masked_scatter(rows, y)
    if w is not None:
        w = w.to(_F32)
    if y is not None:
        y = y.long()
    return idx, mask, w, y


# --------------------------------------------------------------------------------------------
# per-row coefficients (weights, reductions, upstream gradients)
# --------------------------------------------------------------------------------------------

def _row_weights(w, mask, n_proc: int, device) -> Optional[torch.Tensor]:
    """Effective fp32 weight of every processed row (None = all ones)."""
    if mask is None:
        return w
    base = w if w is not None else torch.ones(n_proc, dtype=_F32, device=device)
    return torch.where(mask, base, torch.zeros((), dtype=_F32, device=device))


def _kl_denominator(w_eff, n_proc: int, device) -> torch.Tensor:
    if w_eff is None:
        # a fill, not torch.tensor(...): a host value copied to a CUDA tensor syncs the stream
        return torch.full((), float(n_proc), dtype=_F32, device=device)
    return w_eff.sum()


def _safe_div(x: torch.Tensor, denom: torch.Tensor) -> torch.Tensor:
    """x / denom, and 0 where denom == 0 (the contract's empty / all-zero-weight rule)."""
    ok = denom > 0
    return torch.where(ok, x / torch.where(ok, denom, torch.ones_like(denom)), torch.zeros_like(x))


def _ce_valid(labels, mask):
    valid = labels != IGNORE_INDEX
    return valid if mask is None else valid & mask


def _kl_coefficients(w_eff, n_proc, device, reduction, grad_kl):
    """fp32 [n_proc]: the factor of dD_i/dz in d(loss)/dz for each processed row."""
    if reduction == "none":
        g = grad_kl.to(_F32)
        return g if w_eff is None else g * w_eff
    base = w_eff if w_eff is not None else torch.ones(n_proc, dtype=_F32, device=device)
    if reduction == "mean":
        base = _safe_div(base, _kl_denominator(w_eff, n_proc, device))
    return base if grad_kl is None else base * grad_kl.to(_F32)


def _ce_coefficients(labels, mask, grad_ce):
    valid = _ce_valid(labels, mask)
    c = _safe_div(valid.to(_F32), valid.sum().to(_F32))
    return c if grad_ce is None else c * grad_ce.to(_F32)


def weigh_rows(d: torch.Tensor, w: Optional[torch.Tensor]) -> torch.Tensor:
    """w_i D_i per row, and exactly 0 where w_i == 0, even when D_i is +inf (0 * inf = NaN)."""
    return d if w is None else torch.where(w != 0, w * d, torch.zeros((), dtype=d.dtype, device=d.device))


def _reduce(d, w_eff, mask, reduction, n_proc, device):
    """Apply the row weights and the reduction to the per-row divergence d [n_proc]."""
    wd = weigh_rows(d, w_eff)
    if mask is not None:
        wd = torch.where(mask, wd, torch.zeros((), dtype=_F32, device=device))
    if reduction == "none":
        return wd
    total = wd.sum()
    if reduction == "sum":
        return total
    return _safe_div(total, _kl_denominator(w_eff, n_proc, device))


def _reduce_ce(nll, labels, mask):
    valid = _ce_valid(labels, mask)
    total = torch.where(valid, nll, torch.zeros_like(nll)).sum()
    return _safe_div(total, valid.sum().to(_F32))


# --------------------------------------------------------------------------------------------
# per-chunk work: torch implementation
# --------------------------------------------------------------------------------------------

def _log_softmax_into(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """out <- log_softmax(x, -1) without allocating (out must not alias x). A strided `out`
    (the first V' columns of wider student logits) gets a copy: aten's _log_softmax.out
    writes a non-contiguous out as if it were contiguous."""
    if not out.is_contiguous():
        return out.copy_(torch.log_softmax(x, -1))
    return torch.ops.aten._log_softmax.out(x, -1, False, out=out)


def _scratch_buf(scratch: dict, name: str, rows: int, cols: int, device) -> torch.Tensor:
    """A reusable fp32 [rows, cols] buffer from `scratch` (grown when too small)."""
    t = scratch.get(name)
    if t is None or t.shape[0] < rows or t.shape[1] != cols:
        t = scratch[name] = torch.empty(rows, cols, dtype=_F32, device=device)
    return t[:rows]


def _chunk_torch(zs, zt, v, div_code, beta, inv_t, labels, a, c, need_grad, split, scratch=None):
    """The per-chunk work on fp32 logits; the PyTorch implementation of `align_ti::kl_chunk`.

    zs: [r, ns] raw student logits (ns = V', or Vs when labels are given); overwritten with
        the gradient a * dD/dz (+ c * dCE/dz unless split) when need_grad.
    zt: [r, V'] raw teacher logits; used as scratch.
    scratch: dict of reusable buffers; missing ones are allocated.
    Returns (d [r], nll [r] or None, g or None, gce [r, ns] or None).

    The rows go through `_chunk_torch_block` in sub-blocks sized by
    `heuristics.elementwise_rows`: its temporaries (log p_S, the CE log-probs, a JSD buffer)
    then take a few MiB instead of [r, V'] each, so they do not shrink the row chunk that
    the matmuls see, and the ~10 elementwise passes run over cache-resident rows.
    """
    r = zs.shape[0]
    scratch = {} if scratch is None else scratch
    has_ce = labels is not None
    per_row = 4 * (v + (v if div_code == 2 else 0) + (zs.shape[1] if has_ce else 0))
    step = _heur.elementwise_rows(per_row, zs.device)
    if r <= step:
        return _chunk_torch_block(zs, zt, v, div_code, beta, inv_t, labels, a, c, need_grad,
                                  split, scratch)
    d = torch.empty(r, dtype=_F32, device=zs.device)
    nll = torch.empty(r, dtype=_F32, device=zs.device) if has_ce else None
    gce = None
    if need_grad and has_ce and split:  # the block's CE gradient lives in scratch: keep it
        gce = _scratch_buf(scratch, "gce", r, zs.shape[1], zs.device)
    for s in range(0, r, step):
        e = min(s + step, r)
        d_b, nll_b, _, gce_b = _chunk_torch_block(
            zs[s:e], zt[s:e], v, div_code, beta, inv_t, labels[s:e] if has_ce else None,
            a[s:e] if need_grad else None, c[s:e] if (need_grad and has_ce) else None,
            need_grad, split, scratch)
        d[s:e] = d_b
        if has_ce:
            nll[s:e] = nll_b
        if gce is not None:
            gce[s:e] = gce_b
    return d, nll, (zs if need_grad else None), gce


# -inf logits are vocabulary masks, with 0 log 0 = 0 (the rule of align_ti.reference.fused_kl).
# The torch path applies it without an elementwise pass of its own: a product p (log p - log q)
# at a column where p == 0 is 0 * -inf or 0 * NaN, and nansum drops it.

def _no_distribution(ls: torch.Tensor, lt: torch.Tensor) -> torch.Tensor:
    """bool [r]: rows where either model has no distribution. A NaN or +inf logit, or a row
    masked in every column, makes the row's log-sum-exp NaN and so every log-probability of
    the row: column 0 shows it. Those rows must stay NaN, which nansum would hide."""
    return torch.isnan(ls[:, 0]) | torch.isnan(lt[:, 0])


def _sum_terms(terms: torch.Tensor, no_dist: torch.Tensor) -> torch.Tensor:
    """[r]: the row sums of p (log p - log q) products with 0 log 0 = 0 (see above); +inf where
    p > 0 and q == 0 stays; NaN for the rows without a distribution."""
    return terms.nansum(-1).masked_fill_(no_dist, math.nan)


def _gradient_core(terms: torch.Tensor, p: torch.Tensor, d: torch.Tensor, out: torch.Tensor):
    """out <- p (log p - log q - D) = terms - p D (the reverse KL and JSD gradients), with the
    masked columns' non-finite terms (0 * -inf, and +inf where only q is masked) as 0 and a
    +inf D as 0: a finite gradient for every row with a distribution, so a row of weight 0
    gets exactly 0 (one whose D is +inf gets a finite gradient without meaning). In two passes,
    as the plain `(log p - log q - D) * p` it replaces."""
    d = torch.where(d == math.inf, 0.0, d)
    return torch.addcmul(terms.nan_to_num_(0.0, 0.0, 0.0), p, d[:, None], value=-1.0, out=out)


def _chunk_torch_block(zs, zt, v, div_code, beta, inv_t, labels, a, c, need_grad, split,
                       scratch):
    """`_chunk_torch` on one block of rows, in a fixed set of [r, V'] buffers ("s", "x":
    [>= r, V'], "ce": [>= r, ns], taken from `scratch`)."""
    r = zs.shape[0]

    def buf(name, cols):
        return _scratch_buf(scratch, name, r, cols, zs.device)

    nll = gce = None
    if labels is not None:
        lp = _log_softmax_into(buf("ce", zs.shape[1]), zs)  # raw student log-probs (all Vs)
        valid = labels != IGNORE_INDEX
        safe = torch.where(valid, labels, torch.zeros_like(labels))
        picked = lp.gather(1, safe[:, None]).squeeze(1)
        nll = torch.where(valid, -picked, torch.zeros_like(picked))
        if need_grad:
            cc = torch.where(valid, c, torch.zeros_like(c))
            gce = lp.exp_()
            gce.scatter_add_(1, safe[:, None], torch.full_like(picked[:, None], -1.0))
            gce.mul_(cc[:, None])
    us = zs[:, :v]
    if inv_t != 1.0:
        us.mul_(inv_t)
        zt.mul_(inv_t)
    ls = _log_softmax_into(buf("s", v), us)  # log p_S
    lt = _log_softmax_into(us, zt)           # log p_T, over the student's raw columns
    no_dist = _no_distribution(ls, lt)
    pt_or_free = zt                          # the teacher's raw logits are no longer needed
    if div_code == 0:
        torch.exp(lt, out=pt_or_free)        # p_T
        lt.sub_(ls)                          # log p_T - log p_S
        if need_grad:
            ls.exp_().sub_(pt_or_free)       # p_S - p_T
        d = _sum_terms(pt_or_free.mul_(lt), no_dist)
        gk_scale = 1.0
    elif div_code == 1:
        ps = torch.exp(ls, out=pt_or_free)   # p_S
        ls.sub_(lt)                          # log p_S - log p_T
        terms = torch.mul(ps, ls, out=lt)
        d = _sum_terms(terms, no_dist)
        if need_grad:
            _gradient_core(terms, ps, d, out=ls)  # p_S (log p_S - log p_T - D)
        gk_scale = 1.0
    else:
        x = buf("x", v)
        lm = pt_or_free
        torch.add(ls, math.log1p(-beta), out=x)
        torch.add(lt, math.log(beta), out=lm)
        torch.logaddexp(lm, x, out=lm)       # log M
        torch.exp(lt, out=x)                 # p_T
        lt.sub_(lm)
        dt = _sum_terms(x.mul_(lt), no_dist)
        torch.exp(ls, out=x)                 # p_S
        ls.sub_(lm)                          # log p_S - log M
        terms = torch.mul(x, ls, out=lt)
        kls = _sum_terms(terms, no_dist)
        d = beta * dt + (1.0 - beta) * kls
        if need_grad:
            _gradient_core(terms, x, kls, out=ls)  # p_S (log p_S - log M - KL(p_S || M))
        gk_scale = 1.0 - beta
    if not need_grad:
        return d, nll, None, None
    torch.mul(ls, (a * (inv_t * gk_scale))[:, None], out=us)  # gradient over the V' columns
    if zs.shape[1] > v:
        zs[:, v:].zero_()
    if gce is not None and not split:
        zs.add_(gce)
        gce = None
    return d, nll, zs, gce


# --------------------------------------------------------------------------------------------
# per-chunk work: Triton launcher
# --------------------------------------------------------------------------------------------

_autotuned = None


def _row_kernel():
    from align_ti.kernels import fused_kl as _k

    if not _heur.autotune_enabled():
        return _k.fused_kl_rows_kernel, False
    global _autotuned
    if _autotuned is None:
        import triton

        _autotuned = triton.autotune(
            configs=_heur.kl_row_autotune_configs(),
            key=["n_cols_s", "v", "DIVERGENCE", "HAS_CE", "NEED_GRAD"],
            restore_value=["zs_ptr", "zt_ptr", "g_ptr", "gce_ptr", "d_ptr", "nll_ptr"],
        )(_k.fused_kl_rows_kernel)
    return _autotuned, True


def _chunk_triton(zs, zt, v, div_code, beta, inv_t, labels, a, c, need_grad, split, g_out=None):
    """Same contract as `_chunk_torch`; `g_out` (default: zs, in place) receives the gradient."""
    r, ns = zs.shape
    device = zs.device
    d = torch.empty(r, dtype=_F32, device=device)
    has_ce = labels is not None
    nll = torch.empty(r, dtype=_F32, device=device) if has_ce else d
    g = zs if g_out is None else g_out
    gce = torch.empty_like(zs) if (need_grad and has_ce and split) else g
    # the kernel reads the per-row vectors at ptr + row: a stride-0 upstream gradient (of
    # reduction="none" then .sum()) or a strided labels / weights view must be made dense
    a_t = a.contiguous() if need_grad else d
    c_t = c.contiguous() if (need_grad and has_ce) else a_t
    lab = labels.contiguous() if has_ce else d
    if r == 0:
        return d, (nll if has_ce else None), (g if need_grad else None), None
    kernel, tuned = _row_kernel()
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    cfg = {} if tuned else _heur.kl_row_config(ns, interpret=interpret)
    kernel[(r,)](
        zs, zs.stride(0), zt, zt.stride(0), g, g.stride(0), gce, gce.stride(0),
        lab, a_t, c_t, d, nll,
        ns, v, float(inv_t), float(beta),
        DIVERGENCE=div_code, HAS_CE=has_ce,
        CE_SHARES_LSE=bool(has_ce and inv_t == 1.0 and ns == v),
        SPLIT_CE=bool(has_ce and split), NEED_GRAD=bool(need_grad),
        **cfg,
    )
    return (
        d,
        nll if has_ce else None,
        g if need_grad else None,
        gce if (need_grad and has_ce and split) else None,
    )


# The per-chunk step as custom ops. Their default implementation is `_chunk_torch`; the native
# CPU extension (align_ti/native.py, csrc/fused_kl_cpu.cpp) overrides both for CPU tensors via
# TORCH_LIBRARY_IMPL when loaded. Returns (d [r], nll [r] or [0], gce [r, ns] fp32 or [0]).
# zs and zt may each be float32, bfloat16 or float16 (`_NATIVE_DTYPES`); the math is fp32.
# Columns >= v of the gradient hold only the CE term.
# - kl_chunk: the gradient is written in place over zs (in zs's dtype; zt is scratch), or into
#   g_out when given. Declared as writing zs and zt: only for the drivers' own chunk buffers.
# - kl_chunk_into: zs and zt are only read (a caller's logits: declaring them written would
#   bump their version counters and break any other backward that saved them); the gradient
#   goes into g_out ([r, ns], float32 or zs's dtype). The native kernel reads the rows
#   without copies and rounds the gradient once, at its store.
# The two share one signature, so one C++ function implements both.
def _kl_chunk_on_copies(zs, zt, v, div_code, beta, inv_t, labels, a, c, need_grad, split, dest):
    """`_chunk_torch` on fp32 copies of zs and zt; the gradient is copied into `dest`."""
    d, nll, g, gce = _chunk_torch(zs.to(_F32, copy=True), zt.to(_F32, copy=True), v, div_code,
                                  beta, inv_t, labels, a, c, need_grad, split)
    if dest is not None and g is not None:
        dest.copy_(g)
    return d, (nll if nll is not None else _empty(zs.device)), (gce if gce is not None else _empty(zs.device))


@torch.library.custom_op("align_ti::kl_chunk", mutates_args=("zs", "zt", "g_out"))
def _kl_chunk_op(
    zs: torch.Tensor, zt: torch.Tensor, v: int, div_code: int, beta: float, inv_t: float,
    labels: Optional[torch.Tensor], a: Optional[torch.Tensor], c: Optional[torch.Tensor],
    need_grad: bool, split: bool, g_out: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dest = g_out
    if g_out is None and zs.dtype != _F32:
        dest = zs  # in place in a low-precision zs: compute on fp32 copies, then store
    if dest is not None or zt.dtype != _F32:
        return _kl_chunk_on_copies(zs, zt, v, div_code, beta, inv_t, labels, a, c, need_grad, split, dest)
    d, nll, _, gce = _chunk_torch(zs, zt, v, div_code, beta, inv_t, labels, a, c, need_grad, split)
    return d, (nll if nll is not None else _empty(zs.device)), (gce if gce is not None else _empty(zs.device))


@torch.library.custom_op("align_ti::kl_chunk_into", mutates_args=("g_out",))
def _kl_chunk_into_op(
    zs: torch.Tensor, zt: torch.Tensor, v: int, div_code: int, beta: float, inv_t: float,
    labels: Optional[torch.Tensor], a: Optional[torch.Tensor], c: Optional[torch.Tensor],
    need_grad: bool, split: bool, g_out: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if need_grad and g_out is None:
        raise ValueError("kl_chunk_into: need_grad needs g_out (zs and zt are only read)")
    return _kl_chunk_on_copies(zs, zt, v, div_code, beta, inv_t, labels, a, c, need_grad, split, g_out)


def _kl_chunk_fake(zs, zt, v, div_code, beta, inv_t, labels, a, c, need_grad, split, g_out=None):
    r = zs.shape[0]
    nll = zs.new_empty((r,) if labels is not None else (0,), dtype=_F32)
    gce = zs.new_empty(zs.shape if (need_grad and labels is not None and split) else (0,), dtype=_F32)
    return zs.new_empty((r,), dtype=_F32), nll, gce


_kl_chunk_op.register_fake(_kl_chunk_fake)
_kl_chunk_into_op.register_fake(_kl_chunk_fake)


# logits dtypes the native kernel reads directly (fp32 math; gradient stored in zs's dtype)
_NATIVE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _use_native(zs, zt) -> bool:
    return (zs.device.type == "cpu" and zs.dtype in _NATIVE_DTYPES and zt.dtype in _NATIVE_DTYPES
            and zs.stride(-1) == 1 and zt.stride(-1) == 1 and _native.enabled())


def _chunk(impl, zs, zt, v, div_code, beta, inv_t, labels, a, c, need_grad, split, scratch=None,
           g_out=None):
    """The per-chunk step (`_chunk_torch`'s contract) on the chosen implementation. zs, zt
    are fp32 chunk buffers, or (only when `_use_native(zs, zt)`) bf16/fp16 rows, whose
    gradient is then written in place in their dtype. `g_out` (Triton only): where the
    gradient goes instead of over zs."""
    if impl == "triton":
        return _chunk_triton(zs, zt, v, div_code, beta, inv_t, labels, a, c, need_grad, split, g_out)
    assert g_out is None, "g_out is a Triton-path option"
    if _use_native(zs, zt):
        d, nll, gce = torch.ops.align_ti.kl_chunk(zs, zt, v, div_code, beta, inv_t, labels, a, c,
                                                  need_grad, split)
        has_ce = labels is not None
        return (d, nll if has_ce else None, zs if need_grad else None,
                gce if (need_grad and has_ce and split) else None)
    # not through the op: the reusable scratch buffers save an allocation per chunk
    return _chunk_torch(zs, zt, v, div_code, beta, inv_t, labels, a, c, need_grad, split, scratch)


# --------------------------------------------------------------------------------------------
# matmuls with an fp32 result
# --------------------------------------------------------------------------------------------

def _cuda_low_precision_mm(h: torch.Tensor) -> bool:
    """bf16/fp16 CUDA operands multiply with an fp32 result in cuBLAS (`out_dtype`, torch >=
    2.8: aten mm/addmm .dtype_out); older torch takes the upcasting path below."""
    return (h.is_cuda and h.dtype != _F32 and hasattr(torch.ops.aten.mm, "dtype_out")
            and hasattr(torch.ops.aten.addmm, "dtype_out"))


def _weight_blocks(w, scratch):
    """(start, fp32 copy of w[start:start + step]) over the rows of a low-precision [V, H]
    weight (CPU bf16/fp16 path: no fp32 matmul of low-precision inputs there). The copies go
    into one reused buffer from `scratch` (a fresh allocation per block costs page faults:
    ~4x the conversion itself)."""
    step = _heur.vocab_block_rows(w.shape[1], w.device)
    scratch = {} if scratch is None else scratch
    buf = _scratch_buf(scratch, f"w{w.shape[1]}", min(step, w.shape[0]), w.shape[1], w.device)
    for s in range(0, w.shape[0], step):
        e = min(s + step, w.shape[0])
        yield s, buf[: e - s].copy_(w[s:e])


def _head_logits(h, weight, bias, ncols, out, scratch=None):
    """out (fp32 [r, ncols]) <- h @ weight[:ncols]^T + bias[:ncols], accumulated in fp32."""
    w = weight[:ncols]
    if h.dtype == _F32:
        torch.mm(h, w.t(), out=out)
    elif _cuda_low_precision_mm(h):
        torch.mm(h, w.t(), out_dtype=_F32, out=out)  # cuBLAS writes fp32 straight into `out`
    else:  # CPU bf16/fp16: upcast the weight in vocabulary blocks of bounded size
        hf = h.to(_F32)
        for s, wf in _weight_blocks(w, scratch):
            torch.mm(hf, wf.t(), out=out[:, s:s + wf.shape[0]])
    if bias is not None:
        out += bias[:ncols].to(_F32)
    return out


def _grad_matmuls(g, h, weight, ncols, dh_acc, dh_rows, dw_acc, db_acc, first=False, scratch=None):
    """dh_acc[rows] += g @ W[:ncols]; dw_acc[:ncols] += g^T h; db_acc[:ncols] += g.sum(0).

    g is [r, ncols], fp32 or (from the Triton kernel) in h's low-precision dtype; the
    accumulators are fp32. `dh_rows` is an int64 index tensor (duplicates add up) or a slice.
    With `first`, an fp32 dw_acc[:ncols] is written, not added to (it may be uninitialised).
    `scratch`: reusable buffers (CPU low precision). A dw_acc in the weight's low-precision
    dtype (fp32_weight_grad=False) gets each chunk's g^T h, accumulated in fp32 by the matmul,
    added and rounded to that dtype once per chunk."""
    w = weight[:ncols]
    low = h.dtype != _F32
    cuda_low = _cuda_low_precision_mm(h)
    if cuda_low:
        g = g.to(h.dtype)  # rounded once for both matmuls (a no-op for the kernel's gradient)
    elif g.dtype != _F32:
        g = g.to(_F32)  # CPU (interpreter tier): fp32 matmuls of the rounded gradient
    if dh_acc is not None:
        if not low:
            gh = g @ w
        elif cuda_low:
            gh = torch.mm(g, w, out_dtype=_F32)
        else:
            gh = torch.zeros(g.shape[0], w.shape[1], dtype=_F32, device=g.device)
            for s, wf in _weight_blocks(w, scratch):
                gh.addmm_(g[:, s:s + wf.shape[0]], wf)
        if isinstance(dh_rows, slice):
            dh_acc[dh_rows] += gh
        else:
            dh_acc.index_add_(0, dh_rows, gh)
    if dw_acc is not None:
        dw = dw_acc[:ncols]
        if dw.dtype != _F32:  # accumulated in the weight's dtype: one rounding per chunk
            gl = g.to(h.dtype)
            if first:
                torch.mm(gl.t(), h, out=dw)
            else:
                dw.addmm_(gl.t(), h)
        elif not low:
            if first:  # the accumulator is uninitialised: write instead of add
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
    if db_acc is not None:
        db_acc[:ncols] += g.sum(0, dtype=_F32)


# --------------------------------------------------------------------------------------------
# the fused linear driver (shared by forward and recompute-backward)
# --------------------------------------------------------------------------------------------

def _linear_driver(
    hs, ws, bs, ht, wt, bt, idx, mask, w, labels,
    divergence, beta, temperature, vocab_size, reduction, impl,
    need_dh, need_dw, need_db, split, grad_kl, grad_ce, chunk_bytes, fp32_weight_grad=True,
):
    """Run all row chunks. With grad_kl None and need_* False: forward only.
    Returns (kl, ce, grads, grads_ce): grads = (dh, dw, db) fp32 accumulators or None."""
    device = hs.device
    n = hs.shape[0]
    n_proc = n if idx is None else idx.shape[0]
    v = vocab_size
    vs = ws.shape[0]
    has_ce = labels is not None
    ns = vs if has_ce else v
    inv_t = 1.0 / temperature
    div_code = _DIV_CODE[divergence]
    need_grad = need_dh or need_dw or need_db
    w_eff = _row_weights(w, mask, n_proc, device)

    a = c = None
    if need_grad:
        a = _kl_coefficients(w_eff, n_proc, device, reduction, grad_kl)
        if mask is not None:
            a = torch.where(mask, a, torch.zeros((), dtype=_F32, device=device))
        if has_ce:
            c = _ce_coefficients(labels, mask, grad_ce)

    def zeros(*shape):
        return torch.zeros(*shape, dtype=_F32, device=device)

    # the weight gradient accumulates in fp32, or (fp32_weight_grad=False) in the weight's dtype
    acc_dtype = _F32 if fp32_weight_grad else ws.dtype

    def weight_acc():
        # Where the first chunk's matmul writes the accumulator's dtype directly (mm out=), it
        # writes rows [:ns] and only the rows it does not cover are zeroed (saves a pass over
        # [Vs, Hs]); the CPU upcasting path for a low-precision weight adds into zeros.
        direct = ws.dtype == _F32 or acc_dtype != _F32 or _cuda_low_precision_mm(hs)
        if not direct or n_proc == 0:
            return torch.zeros(vs, hs.shape[1], dtype=acc_dtype, device=device)
        t = torch.empty(vs, hs.shape[1], dtype=acc_dtype, device=device)
        t[ns:].zero_()
        return t

    def grad_set():
        return (
            zeros(n, hs.shape[1]) if need_dh else None,
            weight_acc() if need_dw else None,
            zeros(vs) if (need_db and bs is not None) else None,
        )

    grads = grad_set() if need_grad else None
    grads_ce = grad_set() if (need_grad and has_ce and split) else None

    # The Triton kernel writes a low-precision student's gradient in its dtype, into a buffer
    # of its own: the gradient matmuls round it to that dtype anyway, and the fp32 logits
    # buffer is then only read. Not with a bias gradient (its row sum stays fp32-exact).
    g_dtype = hs.dtype if (impl == "triton" and need_grad and hs.dtype != _F32
                           and not (need_db and bs is not None)) else None
    # scratch per row: fp32 student + teacher logits (+ the separate CE gradient when split,
    # + the low-precision gradient); the torch path's own temporaries are per sub-block
    # (`_chunk_torch`), a few MiB
    per_row = 4 * (ns + v + (ns if has_ce and split else 0))
    if g_dtype is not None:
        per_row += ns * hs.element_size()
    r_chunk = _heur.rows_per_chunk(per_row, device, chunk_bytes if chunk_bytes > 0 else None)
    r_chunk = _heur.balanced_rows(n_proc, r_chunk, device)
    buf_s = torch.empty(r_chunk, ns, dtype=_F32, device=device)  # reused by every chunk
    buf_t = torch.empty(r_chunk, v, dtype=_F32, device=device)
    buf_g = None if g_dtype is None else torch.empty(r_chunk, ns, dtype=g_dtype, device=device)
    scratch = {}
    d_all = torch.zeros(n_proc, dtype=_F32, device=device)
    nll_all = torch.zeros(n_proc, dtype=_F32, device=device) if has_ce else None
    wt_d, bt_d = wt.detach(), None if bt is None else bt.detach()
    for s in range(0, n_proc, r_chunk):
        e = min(s + r_chunk, n_proc)
        if idx is None:
            sel = slice(s, e)
            hs_c, ht_c = hs[s:e], ht[s:e]
            if mask is not None:  # unselected rows: exactly 0, even if they hold NaN/inf
                keep = mask[s:e, None]
                hs_c = torch.where(keep, hs_c, torch.zeros((), dtype=hs.dtype, device=device))
                ht_c = torch.where(keep, ht_c, torch.zeros((), dtype=ht.dtype, device=device))
        else:
            sel = idx[s:e]
            hs_c, ht_c = hs.index_select(0, sel), ht.index_select(0, sel)
        zs = _head_logits(hs_c, ws, bs, ns, buf_s[: e - s], scratch)
        zt = _head_logits(ht_c, wt_d, bt_d, v, buf_t[: e - s], scratch)
        lab_c = labels[s:e] if has_ce else None
        a_c = a[s:e] if need_grad else None
        c_c = c[s:e] if (need_grad and has_ce) else None
        g_out = None if buf_g is None else buf_g[: e - s]
        d, nll, g, gce = _chunk(impl, zs, zt, v, div_code, beta, inv_t, lab_c, a_c, c_c,
                                need_grad, split, scratch, g_out)
        d_all[s:e] = d
        if has_ce:
            nll_all[s:e] = nll
        if need_grad:
            first = s == 0
            _grad_matmuls(g, hs_c, ws, ns, grads[0], sel, grads[1], grads[2], first, scratch)
            if gce is not None:
                _grad_matmuls(gce, hs_c, ws, ns, grads_ce[0], sel, grads_ce[1], grads_ce[2], first,
                              scratch)
        del zs, zt, g, gce, g_out
    del buf_s, buf_t, buf_g, scratch

    kl = _reduce(d_all, w_eff, mask, reduction, n_proc, device)
    ce = _reduce_ce(nll_all, labels, mask) if has_ce else None
    return kl, ce, grads, grads_ce


def _cast_grads(grads, hs, ws, bs):
    dh, dw, db = grads
    return (
        None if dh is None else dh.to(hs.dtype),
        None if dw is None else dw.to(ws.dtype),
        None if db is None else db.to(bs.dtype),
    )


def _empty(device):
    return torch.zeros(0, dtype=_F32, device=device)


# --------------------------------------------------------------------------------------------
# autograd policy shared by the ops
# --------------------------------------------------------------------------------------------

def _grads_in_forward(reduction: str, dtype: torch.dtype) -> bool:
    """Whether the forward computes the gradients (for a unit upstream gradient; the backward
    scales them): for "mean" and "sum", except in fp16, whose narrow range needs the upstream
    gradient (e.g. a GradScaler's loss scale) applied before the gradients are rounded.
    Otherwise (reduction="none", fp16) the backward recomputes the chunks."""
    return reduction != "none" and dtype != torch.float16


def _save_inputs(ctx, tensors) -> None:
    """save_for_backward, except for inference tensors (e.g. teacher states computed under
    torch.inference_mode()), which autograd refuses to save: they never get a gradient and
    are never written, so the context keeps a plain reference to them."""
    ctx.inference_inputs = {i: t for i, t in enumerate(tensors) if t is not None and t.is_inference()}
    ctx.save_for_backward(*(None if i in ctx.inference_inputs else t for i, t in enumerate(tensors)))


def _saved_inputs(ctx) -> list:
    saved = list(ctx.saved_tensors)
    for i, t in ctx.inference_inputs.items():
        saved[i] = t
    return saved


def _enter_backward(ctx, op: str) -> None:
    """Refuse what the ops cannot do, with a message instead of a wrong gradient or torch's
    saved-tensor version error."""
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        raise RuntimeError(f"{op}: double backward (create_graph=True) is not supported; its "
                           "gradients come from fused kernels, not from differentiable ops")
    if ctx.mode == "saved":
        if getattr(ctx, "consumed", False):
            raise RuntimeError(
                f"{op}: the gradients of this graph were computed in the forward and the first "
                "backward consumed them (scaled in place, no copy); a second backward through it "
                "(retain_graph=True, or kl and ce backpropagated one after the other) is not "
                "supported. Backpropagate one combined loss, or use reduction='none', whose "
                "backward recomputes the chunks each time.")
        ctx.consumed = True


def _scale_(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """t *= s in place: the saved gradient is only read by this backward, and one kernel over
    it (a [Vs, Hs] weight gradient) is all the backward costs. For a bf16 t the upstream s
    is rounded to bf16 first (within 0.2%: exact for the usual 1, 0.5, 0.25, ...); scaling in
    fp32 would take three more passes over t, ~1 ms (2%) of the fused KL on an H200 by a
    bandwidth estimate."""
    return t.mul_(s.to(t.dtype))


# --------------------------------------------------------------------------------------------
# torch.library custom ops: fused linear
# --------------------------------------------------------------------------------------------

@torch.library.custom_op("align_ti::fused_linear_kl", mutates_args=())
def _fused_linear_kl_op(
    hs: torch.Tensor, ws: torch.Tensor, bs: Optional[torch.Tensor],
    ht: torch.Tensor, wt: torch.Tensor, bt: Optional[torch.Tensor],
    idx: Optional[torch.Tensor], mask: Optional[torch.Tensor],
    w: Optional[torch.Tensor], labels: Optional[torch.Tensor],
    divergence: str, beta: float, temperature: float, vocab_size: int, reduction: str,
    impl: str, need_dh: bool, need_dw: bool, need_db: bool, chunk_bytes: int,
    fp32_weight_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor, torch.Tensor]:
    """(kl, ce, dh, dw, db, dh_ce, dw_ce, db_ce). The gradients (for a unit upstream
    gradient of kl, and of ce separately when labels are given) are computed only for
    scalar reductions and only where need_* is set; otherwise they are empty."""
    device = hs.device
    with_grad = _grads_in_forward(reduction, hs.dtype) and (need_dh or need_dw or need_db)
    kl, ce, grads, grads_ce = _linear_driver(
        hs, ws, bs, ht, wt, bt, idx, mask, w, labels,
        divergence, beta, temperature, vocab_size, reduction, impl,
        need_dh and with_grad, need_dw and with_grad, need_db and with_grad and bs is not None,
        True, None, None, chunk_bytes, fp32_weight_grad,
    )
    out = [kl, ce if ce is not None else torch.zeros((), dtype=_F32, device=device)]
    for gs in (grads, grads_ce):
        if gs is None:
            out += [_empty(device)] * 3
        else:
            out += [_empty(device) if t is None else t for t in _cast_grads(gs, hs, ws, bs)]
    # every output must be its own tensor for torch.library
    return tuple(t.clone() if t.numel() == 0 else t for t in out)


def _linear_fwd_shapes(hs, ws, bs, idx, labels, reduction, need_dh, need_dw, need_db):
    n = hs.shape[0]
    m = n if idx is None else idx.shape[0]
    with_grad = _grads_in_forward(reduction, hs.dtype) and (need_dh or need_dw or need_db)
    split = labels is not None
    kl = hs.new_empty((m,) if reduction == "none" else (), dtype=_F32)
    ce = hs.new_empty((), dtype=_F32)

    def gset(on):
        if not on:
            return [hs.new_empty((0,), dtype=_F32) for _ in range(3)]
        return [
            hs.new_empty(hs.shape) if need_dh else hs.new_empty((0,), dtype=_F32),
            ws.new_empty(ws.shape) if need_dw else hs.new_empty((0,), dtype=_F32),
            bs.new_empty(bs.shape) if (need_db and bs is not None) else hs.new_empty((0,), dtype=_F32),
        ]

    return (kl, ce, *gset(with_grad), *gset(with_grad and split))


@_fused_linear_kl_op.register_fake
def _(hs, ws, bs, ht, wt, bt, idx, mask, w, labels, divergence, beta, temperature, vocab_size,
      reduction, impl, need_dh, need_dw, need_db, chunk_bytes, fp32_weight_grad):
    return _linear_fwd_shapes(hs, ws, bs, idx, labels, reduction, need_dh, need_dw, need_db)


@torch.library.custom_op("align_ti::fused_linear_kl_backward", mutates_args=())
def _fused_linear_kl_backward_op(
    grad_kl: torch.Tensor, grad_ce: Optional[torch.Tensor],
    hs: torch.Tensor, ws: torch.Tensor, bs: Optional[torch.Tensor],
    ht: torch.Tensor, wt: torch.Tensor, bt: Optional[torch.Tensor],
    idx: Optional[torch.Tensor], mask: Optional[torch.Tensor],
    w: Optional[torch.Tensor], labels: Optional[torch.Tensor],
    divergence: str, beta: float, temperature: float, vocab_size: int, reduction: str,
    impl: str, need_dh: bool, need_dw: bool, need_db: bool, chunk_bytes: int,
    fp32_weight_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Recompute the chunks with the given upstream gradients: (dh, dw, db), empty where
    not needed."""
    device = hs.device
    need_db = need_db and bs is not None
    _, _, grads, _ = _linear_driver(
        hs, ws, bs, ht, wt, bt, idx, mask, w, labels,
        divergence, beta, temperature, vocab_size, reduction, impl,
        need_dh, need_dw, need_db, False, grad_kl, grad_ce, chunk_bytes, fp32_weight_grad,
    )
    if grads is None:
        return _empty(device), _empty(device), _empty(device)
    return tuple(_empty(device) if t is None else t for t in _cast_grads(grads, hs, ws, bs))


@_fused_linear_kl_backward_op.register_fake
def _(grad_kl, grad_ce, hs, ws, bs, ht, wt, bt, idx, mask, w, labels, divergence, beta,
      temperature, vocab_size, reduction, impl, need_dh, need_dw, need_db, chunk_bytes,
      fp32_weight_grad):
    e = hs.new_empty((0,), dtype=_F32)
    return (
        hs.new_empty(hs.shape) if need_dh else e,
        ws.new_empty(ws.shape) if need_dw else e.clone(),
        bs.new_empty(bs.shape) if (need_db and bs is not None) else e.clone(),
    )


_LINEAR_ARGS = ("hs", "ws", "bs", "ht", "wt", "bt", "idx", "mask", "w", "labels")
_LINEAR_OPTS = ("divergence", "beta", "temperature", "vocab_size", "reduction", "impl",
                "need_dh", "need_dw", "need_db", "chunk_bytes", "fp32_weight_grad")


def _linear_setup_context(ctx, inputs, output):
    tensors = inputs[:10]
    opts = dict(zip(_LINEAR_OPTS, inputs[10:]))
    ctx.opts = opts
    ctx.has_bias = tensors[2] is not None
    ctx.has_labels = tensors[9] is not None
    ctx.mark_non_differentiable(*output[2:])
    # The gradient outputs get no upstream gradient; without this autograd would hand the
    # backward zero tensors of their shapes ([Vs, Hs] among them: a fill and an allocation the
    # size of the weight gradient, 45 ms on the CPU target shape). The backward handles None.
    ctx.set_materialize_grads(False)
    if not _grads_in_forward(opts["reduction"], tensors[0].dtype):
        ctx.mode = "recompute"
        _save_inputs(ctx, tensors)
    else:
        ctx.mode = "saved"
        ctx.save_for_backward(*output[2:])


def _linear_backward(ctx, grad_kl, grad_ce, *_unused):
    o = ctx.opts
    _enter_backward(ctx, "fused_linear_kl")
    if ctx.mode == "saved":
        dh, dw, db, dh_c, dw_c, db_c = ctx.saved_tensors
        out = []
        # by the flags, not by numel: with N = 0 rows dh is [0, Hs], a real (empty) gradient
        needed = (o["need_dh"], o["need_dw"], o["need_db"] and ctx.has_bias)
        for g, g_ce, need in zip((dh, dw, db), (dh_c, dw_c, db_c), needed):
            if not need:
                out.append(None)
                continue
            res = _scale_(g, grad_kl) if grad_kl is not None else g.zero_()
            if g_ce.numel() and grad_ce is not None:
                res.add_(_scale_(g_ce, grad_ce))
            out.append(res)
        dh_o, dw_o, db_o = out
    else:
        hs, ws, bs, ht, wt, bt, idx, mask, w, labels = _saved_inputs(ctx)
        if grad_kl is None:
            m = hs.shape[0] if idx is None else idx.shape[0]
            grad_kl = torch.zeros((m,) if o["reduction"] == "none" else (), dtype=_F32, device=hs.device)
        if ctx.has_labels and grad_ce is None:
            grad_ce = torch.zeros((), dtype=_F32, device=hs.device)
        dh_o, dw_o, db_o = torch.ops.align_ti.fused_linear_kl_backward(
            grad_kl, grad_ce if ctx.has_labels else None,
            hs, ws, bs, ht, wt, bt, idx, mask, w, labels,
            *(o[k] for k in _LINEAR_OPTS),
        )
        dh_o = dh_o if o["need_dh"] else None
        dw_o = dw_o if o["need_dw"] else None
        db_o = db_o if (o["need_db"] and ctx.has_bias) else None
    grads = [dh_o, dw_o, db_o] + [None] * 7
    return tuple(grads) + (None,) * len(_LINEAR_OPTS)


torch.library.register_autograd(
    "align_ti::fused_linear_kl", _linear_backward, setup_context=_linear_setup_context
)


# --------------------------------------------------------------------------------------------
# torch.library custom ops: logits in
# --------------------------------------------------------------------------------------------

def _logits_driver(zs_in, zt_in, idx, mask, w, divergence, beta, temperature, vocab_size,
                   reduction, impl, need_grad, grad, chunk_bytes):
    """Per-row divergence of given logits; with need_grad also d loss / d student_logits
    ([N, Vs] in the logits dtype) for the unit upstream (grad None) or the given one."""
    device = zs_in.device
    n = zs_in.shape[0]
    n_proc = n if idx is None else idx.shape[0]
    v = vocab_size
    inv_t = 1.0 / temperature
    div_code = _DIV_CODE[divergence]
    w_eff = _row_weights(w, mask, n_proc, device)
    a = None
    grad_logits = None
    if need_grad:
        a = _kl_coefficients(w_eff, n_proc, device, reduction, grad)
        if mask is not None:
            a = torch.where(mask, a, torch.zeros((), dtype=_F32, device=device))
    # The native CPU kernel reads fp32, bf16 and fp16 logits rows in their dtype. All rows:
    # it reads them where they are and writes the gradient rows straight into grad_logits (no
    # chunk copies, no copy-back). Selected rows: gathered copies in the logits' dtype, the
    # gradient in place over them. Otherwise (PyTorch chunk code): fp32 chunk copies.
    native = impl == "torch" and _use_native(zs_in, zt_in)
    direct = native and idx is None and mask is None
    if need_grad:
        if direct:  # every row's first v columns are written by the kernel
            grad_logits = torch.empty(zs_in.shape, dtype=zs_in.dtype, device=device)
            if zs_in.shape[1] > v:
                grad_logits[:, v:].zero_()
        else:
            grad_logits = torch.zeros(zs_in.shape, dtype=zs_in.dtype, device=device)
    ws, wt = (zs_in.dtype, zt_in.dtype) if native else (_F32, _F32)  # chunk working dtypes
    # bytes per row of a chunk: the two chunk copies (none when direct: the size then only
    # sets how many rows one kernel call gets); the PyTorch chunk code's own temporaries are
    # per sub-block (`_chunk_torch`)
    per_row = v * (torch.finfo(ws).bits + torch.finfo(wt).bits) // 8
    r_chunk = _heur.rows_per_chunk(per_row, device, chunk_bytes if chunk_bytes > 0 else None)
    d_all = torch.zeros(n_proc, dtype=_F32, device=device)
    scratch = {}
    for s in range(0, n_proc, r_chunk):
        e = min(s + r_chunk, n_proc)
        if direct:
            d, _, _ = torch.ops.align_ti.kl_chunk_into(
                zs_in[s:e, :v], zt_in[s:e, :v], v, div_code, beta, inv_t, None,
                a[s:e] if need_grad else None, None, need_grad, False,
                grad_logits[s:e, :v] if need_grad else None)
            d_all[s:e] = d
            continue
        if idx is None:
            zs = zs_in[s:e, :v].to(ws, copy=True, memory_format=torch.contiguous_format)
            zt = zt_in[s:e, :v].to(wt, copy=True, memory_format=torch.contiguous_format)
            if mask is not None:  # unselected rows: exactly 0, even if they hold NaN/inf
                zs.masked_fill_(~mask[s:e, None], 0.0)
                zt.masked_fill_(~mask[s:e, None], 0.0)
        else:
            sel = idx[s:e]
            zs = zs_in[:, :v].index_select(0, sel).to(ws)
            zt = zt_in[:, :v].index_select(0, sel).to(wt)
        d, _, g, _ = _chunk(impl, zs, zt, v, div_code, beta, inv_t, None,
                            a[s:e] if need_grad else None, None, need_grad, False, scratch)
        d_all[s:e] = d
        if need_grad:
            if idx is None:
                grad_logits[s:e, :v] = g
            else:
                grad_logits[:, :v].index_add_(0, idx[s:e], g.to(grad_logits.dtype))
        del zs, zt, g
    return _reduce(d_all, w_eff, mask, reduction, n_proc, device), grad_logits


@torch.library.custom_op("align_ti::fused_kl", mutates_args=())
def _fused_kl_op(
    zs: torch.Tensor, zt: torch.Tensor, idx: Optional[torch.Tensor], mask: Optional[torch.Tensor],
    w: Optional[torch.Tensor], divergence: str, beta: float, temperature: float, vocab_size: int,
    reduction: str, impl: str, need_grad: bool, chunk_bytes: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, d loss / d student_logits for a unit upstream gradient, or empty)."""
    with_grad = need_grad and _grads_in_forward(reduction, zs.dtype)
    loss, g = _logits_driver(zs, zt.detach(), idx, mask, w, divergence, beta, temperature,
                             vocab_size, reduction, impl, with_grad, None, chunk_bytes)
    return loss, (g if g is not None else _empty(zs.device))


@_fused_kl_op.register_fake
def _(zs, zt, idx, mask, w, divergence, beta, temperature, vocab_size, reduction, impl,
      need_grad, chunk_bytes):
    m = zs.shape[0] if idx is None else idx.shape[0]
    loss = zs.new_empty((m,) if reduction == "none" else (), dtype=_F32)
    g = (zs.new_empty(zs.shape) if (need_grad and _grads_in_forward(reduction, zs.dtype))
         else zs.new_empty((0,), dtype=_F32))
    return loss, g


@torch.library.custom_op("align_ti::fused_kl_backward", mutates_args=())
def _fused_kl_backward_op(
    grad: torch.Tensor, zs: torch.Tensor, zt: torch.Tensor, idx: Optional[torch.Tensor],
    mask: Optional[torch.Tensor], w: Optional[torch.Tensor], divergence: str, beta: float,
    temperature: float, vocab_size: int, reduction: str, impl: str, chunk_bytes: int,
) -> torch.Tensor:
    _, g = _logits_driver(zs, zt, idx, mask, w, divergence, beta, temperature, vocab_size,
                          reduction, impl, True, grad, chunk_bytes)
    return g


@_fused_kl_backward_op.register_fake
def _(grad, zs, zt, idx, mask, w, divergence, beta, temperature, vocab_size, reduction, impl,
      chunk_bytes):
    return zs.new_empty(zs.shape)


_KL_OPTS = ("divergence", "beta", "temperature", "vocab_size", "reduction", "impl",
            "need_grad", "chunk_bytes")


def _kl_setup_context(ctx, inputs, output):
    ctx.opts = dict(zip(_KL_OPTS, inputs[5:]))
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # no zero [N, Vs] for the gradient output (as above)
    if not _grads_in_forward(ctx.opts["reduction"], inputs[0].dtype):
        ctx.mode = "recompute"
        _save_inputs(ctx, inputs[:5])
    else:
        ctx.mode = "saved"
        ctx.save_for_backward(output[1])


def _kl_backward(ctx, grad, _unused):
    o = ctx.opts
    if not o["need_grad"] or grad is None:
        return (None,) * (5 + len(_KL_OPTS))
    _enter_backward(ctx, "fused_kl")
    if ctx.mode == "saved":
        (g,) = ctx.saved_tensors
        g = _scale_(g, grad)
    else:
        zs, zt, idx, mask, w = _saved_inputs(ctx)
        g = torch.ops.align_ti.fused_kl_backward(
            grad, zs, zt, idx, mask, w, o["divergence"], o["beta"], o["temperature"],
            o["vocab_size"], o["reduction"], o["impl"], o["chunk_bytes"],
        )
    return (g,) + (None,) * (4 + len(_KL_OPTS))


torch.library.register_autograd("align_ti::fused_kl", _kl_backward, setup_context=_kl_setup_context)


# --------------------------------------------------------------------------------------------
# public functions
# --------------------------------------------------------------------------------------------

def _needs_grad(t) -> bool:
    return t is not None and t.requires_grad and torch.is_grad_enabled()


def _linear_common(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, rows,
                   weights, divergence, beta, temperature, vocab_size, reduction, student_bias,
                   teacher_bias, impl, chunk_bytes, fp32_weight_grad):
    opts = KLOptions(divergence, beta, temperature, reduction)
    check_bool("fp32_weight_grad", fp32_weight_grad)
    check_head("student", student_hidden, student_weight, student_bias, None)
    n = student_hidden.shape[0]
    check_head("teacher", teacher_hidden, teacher_weight, teacher_bias, n)
    device = check_same_device({
        "student_hidden": student_hidden, "student_weight": student_weight,
        "teacher_hidden": teacher_hidden, "teacher_weight": teacher_weight,
        "student_bias": student_bias, "teacher_bias": teacher_bias,
    })
    impl = _resolve_impl(impl, device)
    vs, vt = student_weight.shape[0], teacher_weight.shape[0]
    v = resolve_vocab_size(vocab_size, vs, vt)
    rows = normalize_rows(rows, n, device)
    check_weights(weights, rows, n, device)
    if labels is not None:
        check_labels(labels, rows, n, vs, device)
    idx, mask, w, y = _plan_rows(rows, weights, labels, n, device, opts.reduction)
    kl, ce, *_ = torch.ops.align_ti.fused_linear_kl(
        student_hidden, student_weight, student_bias,
        teacher_hidden.detach(), teacher_weight.detach(),
        None if teacher_bias is None else teacher_bias.detach(),
        idx, mask, w, y,
        opts.divergence, float(opts.beta), float(opts.temperature), int(v), opts.reduction, impl,
        _needs_grad(student_hidden), _needs_grad(student_weight), _needs_grad(student_bias),
        _heur.resolve_chunk_bytes(chunk_bytes) or 0, fp32_weight_grad,
    )
    return kl, (ce if labels is not None else None)


def fused_linear_kl(
    student_hidden,
    student_weight,
    teacher_hidden,
    teacher_weight,
    rows=None,
    weights=None,
    divergence="forward",
    beta=0.5,
    temperature=1.0,
    vocab_size=None,
    reduction="mean",
    student_bias=None,
    teacher_bias=None,
    impl="auto",
    chunk_bytes=None,
    fp32_weight_grad=True,
):
    """Vocabulary divergence between teacher and student at selected rows, fused with both LM heads.

    Computes, without ever holding [N, V] logits or probabilities,
    ``z_S = (h_S W_S[:V']^T + b_S[:V']) / T`` and ``z_T`` likewise (softmax over the first V'
    entries only, no T^2 factor) and per selected row i the divergence

    - ``"forward"``: ``D_i = KL(p_T || p_S)``
    - ``"reverse"``: ``D_i = KL(p_S || p_T)``
    - ``"jsd"``: ``D_i = beta KL(p_T || M) + (1 - beta) KL(p_S || M)``, ``M = beta p_T + (1 - beta) p_S``

    weighted by ``w_i`` and reduced: ``"none"`` -> ``[M]`` of ``w_i D_i``; ``"sum"`` ->
    ``sum w_i D_i``; ``"mean"`` -> ``sum w_i D_i / sum w_i``, and 0 (with zero gradients) when
    there are no rows or all weights are 0. The result is fp32.

    Args:
        student_hidden: ``[N, Hs]`` float (fp32/bf16/fp16); gets a gradient.
        student_weight: ``[Vs, Hs]``, same dtype as student_hidden; gets a gradient (rows >= V'
            get 0 from the divergence).
        teacher_hidden: ``[N, Ht]``; never gets a gradient (may differ in dtype from the student).
        teacher_weight: ``[Vt, Ht]``, same dtype as teacher_hidden; never gets a gradient.
        rows: None (all N rows), int64/int32 indices ``[M]`` into N (repeats allowed), or a
            bool mask ``[N]``. A mask needs no host sync from the caller.
        weights: float ``[M]`` (or ``[N]`` with a bool mask; ``[N]`` without rows), finite,
            >= 0; no gradient.
        divergence: ``"forward"`` | ``"reverse"`` | ``"jsd"``.
        beta: the JSD weight, ``0 < beta < 1`` (checked for ``"jsd"`` only).
        temperature: ``T > 0``; logits are divided by it.
        vocab_size: V'; None = ``min(Vs, Vt)``. Must not exceed either head.
        reduction: ``"mean"`` | ``"sum"`` | ``"none"``.
        student_bias, teacher_bias: optional ``[Vs]`` / ``[Vt]`` head biases.
        impl: ``"auto"`` (Triton on CUDA tensors, the chunked PyTorch path elsewhere),
            ``"triton"`` (CUDA, or CPU under ``TRITON_INTERPRET=1``) or ``"torch"``.
        chunk_bytes: scratch budget for one row chunk, in bytes or as a string such as
            "512M"; None = ``align_ti.ops.heuristics`` (``ALIGN_TI_CHUNK_BYTES`` overrides). Results do not depend on it beyond rounding.
        fp32_weight_grad: True (default): the student weight's gradient accumulates over the
            row chunks in an fp32 ``[Vs, Hs]`` buffer and is rounded to the weight's dtype
            once. False: it accumulates in the weight's own dtype (bf16/fp16), rounded once
            per row chunk, as Liger-Kernel's and torchtune's chunked losses do. That saves
            the fp32 buffer (890 MiB at Vs=151936, Hs=1536) and half the traffic of each
            chunk's accumulation, at a few roundings more in that gradient. No effect for
            fp32 weights.

    Returns:
        fp32 scalar, or ``[M]`` for ``reduction="none"``.

    Gradients: for ``"mean"`` and ``"sum"`` (a scalar upstream gradient) the gradients of
    student_hidden, student_weight and student_bias are computed during the forward, chunk by
    chunk, and the backward only scales them by the upstream scalar, in place: a
    second backward through the same graph raises RuntimeError, as does double backward
    (``create_graph=True``). For ``"none"``, and for fp16 inputs (a GradScaler's loss scale
    must reach the gradients before they are rounded to fp16), the forward computes only the
    losses and the backward recomputes the logits chunk by chunk with the upstream gradient.
    Teacher tensors made under ``torch.inference_mode()`` are fine.
    Memory: the fp32 logits of one row chunk for both heads plus the gradient accumulators
    (fp32; the weight's in its own dtype with ``fp32_weight_grad=False``);
    work: one pass of each head's matmul plus the two gradient matmuls (no recomputation,
    except the backward of ``"none"``).

    Numerics: logits are accumulated in fp32 straight from the matmul and never rounded to
    bf16/fp16 before the softmax; log-sum-exp is computed stably (the Triton kernel streams
    the vocabulary with an online log-sum-exp).

    Masks: a -inf logit (e.g. a -inf bias entry) masks its vocabulary column, with
    0 log 0 = 0: a column the teacher gives probability 0 adds nothing to ``"forward"`` (one
    the student gives 0, nothing to ``"reverse"``), a column masked in both adds nothing to
    any divergence, and ``"jsd"`` is always finite. A column the teacher allows and the
    student masks makes ``"forward"`` +inf (the mirror for ``"reverse"``); a row of weight 0
    still adds exactly 0. Where the loss is finite, so are the gradients, and masked student
    columns get 0 (where it is +inf they are finite and without meaning).

    NaN/inf: not detected; a NaN or inf in a selected row's hidden states or in the weights,
    a NaN or +inf in the biases that reach the first V' logits, or a row whose first V'
    logits are all -inf gives a NaN loss and NaN gradients, never a silently wrong finite
    loss. Unselected rows and rows outside ``rows`` do not influence the result. ``weights``
    are checked to be finite and >= 0 (a content check, see ``align_ti.set_value_checks``).

    Raises:
        ValueError / TypeError naming the argument for: temperature <= 0, beta outside (0, 1),
        an unknown divergence, reduction or impl, vocab_size larger than either head, rows out
        of range or of a wrong dtype, weights of the wrong length or negative/non-finite, a
        hidden/weight width or dtype mismatch within a model, tensors on different devices,
        fp32_weight_grad that is not a bool.
    """
    kl, _ = _linear_common(
        student_hidden, student_weight, teacher_hidden, teacher_weight, None, rows, weights,
        divergence, beta, temperature, vocab_size, reduction, student_bias, teacher_bias,
        impl, chunk_bytes, fp32_weight_grad,
    )
    return kl


def fused_linear_distill(
    student_hidden,
    student_weight,
    teacher_hidden,
    teacher_weight,
    labels,
    rows=None,
    weights=None,
    divergence="forward",
    beta=0.5,
    temperature=1.0,
    vocab_size=None,
    reduction="mean",
    student_bias=None,
    teacher_bias=None,
    impl="auto",
    chunk_bytes=None,
    fp32_weight_grad=True,
):
    """``(kl, ce)``: the divergence of `fused_linear_kl` and the student's SFT cross-entropy,
    from one pass over the student head.

    ``kl`` is exactly `fused_linear_kl` with the same arguments (see there for every argument,
    the divergences, weights, reductions, ``impl`` and the NaN/inf behaviour).
    ``ce`` is the cross-entropy of the *unscaled* student logits over all Vs entries
    (temperature and V' do not apply) at the selected rows, averaged over the rows whose label
    is not -100 (``weights`` do not apply), and 0 (with zero gradients) when there are none;
    +inf when a label's column is masked (a -inf logit). It is always an fp32 scalar,
    whatever ``reduction`` is.

    Args:
        labels: int64/int32 ``[M]`` (or ``[N]`` with a bool mask; ``[N]`` without rows): the
            target id of each selected row in ``[0, Vs)``, or -100 for no CE.
        (all others): as `fused_linear_kl`.

    Returns:
        ``(kl, ce)``: kl fp32 scalar or ``[M]`` (``reduction="none"``), ce fp32 scalar.

    Gradients: for ``"mean"``/``"sum"`` the forward computes the student gradients of kl and
    of ce separately (the upstream scalars of the two outputs are not known yet), which costs
    one more ``[Vs, Hs]`` accumulator (fp32, or the weight's dtype with
    ``fp32_weight_grad=False``) and two more gradient matmuls than
    `fused_linear_kl`; the backward combines them with the two upstream scalars. For
    ``"none"`` the backward recomputes the logits chunk by chunk with both upstream gradients.

    Raises:
        as `fused_linear_kl`, plus labels of a wrong length or dtype, or out of ``[0, Vs)``
        other than -100.
    """
    if labels is None:
        raise TypeError("labels must be an int64 tensor of target ids (-100 = no CE), got None")
    return _linear_common(
        student_hidden, student_weight, teacher_hidden, teacher_weight, labels, rows, weights,
        divergence, beta, temperature, vocab_size, reduction, student_bias, teacher_bias,
        impl, chunk_bytes, fp32_weight_grad,
    )


def fused_kl(
    student_logits,
    teacher_logits,
    rows=None,
    weights=None,
    divergence="forward",
    beta=0.5,
    temperature=1.0,
    vocab_size=None,
    reduction="mean",
    impl="auto",
    chunk_bytes=None,
):
    """Vocabulary divergence between given logits ``[N, Vs]`` and ``[N, Vt]`` at selected rows.

    For callers that already hold the logits. Same semantics as `fused_linear_kl` with
    ``z_S = student_logits[:, :V'] / T`` and ``z_T = teacher_logits[:, :V'] / T``: per row
    ``forward`` KL(p_T||p_S), ``reverse`` KL(p_S||p_T) or ``jsd``, weighted by ``weights``
    and reduced by ``reduction`` (``"mean"`` is 0 with zero gradients when there are no rows
    or all weights are 0). Rows are processed in chunks sized by bytes with fp32 upcasts of
    the chunk only; the two logits tensors may differ in dtype.

    Args:
        student_logits: ``[N, Vs]`` fp32/bf16/fp16; gets a gradient (0 in columns >= V').
        teacher_logits: ``[N, Vt]``; never gets a gradient.
        rows, weights, divergence, beta, temperature, vocab_size, reduction, impl,
        chunk_bytes: as `fused_linear_kl`.

    Returns:
        fp32 scalar, or ``[M]`` for ``reduction="none"``.

    Gradients: for ``"mean"``/``"sum"`` the gradient with respect to student_logits is
    computed in the forward (an ``[N, Vs]`` tensor in the logits dtype, which the backward
    scales by the upstream scalar); for ``"none"`` and fp16 logits the backward recomputes it
    chunk by chunk with the upstream gradient. As `fused_linear_kl`: one backward per graph
    for "mean"/"sum", no double backward.

    Masks (-inf logits, 0 log 0 = 0) and NaN/inf: as `fused_linear_kl`.

    Raises:
        ValueError / TypeError naming the argument, as `fused_linear_kl`.
    """
    opts = KLOptions(divergence, beta, temperature, reduction)
    check_logits(student_logits, teacher_logits)
    n = student_logits.shape[0]
    device = student_logits.device
    impl = _resolve_impl(impl, device)
    v = resolve_vocab_size(vocab_size, student_logits.shape[1], teacher_logits.shape[1])
    rows = normalize_rows(rows, n, device)
    check_weights(weights, rows, n, device)
    idx, mask, w, _ = _plan_rows(rows, weights, None, n, device, opts.reduction)
    loss, _ = torch.ops.align_ti.fused_kl(
        student_logits, teacher_logits.detach(), idx, mask, w,
        opts.divergence, float(opts.beta), float(opts.temperature), int(v), opts.reduction, impl,
        _needs_grad(student_logits), _heur.resolve_chunk_bytes(chunk_bytes) or 0,
    )
    return loss


__all__ = ["fused_linear_kl", "fused_linear_distill", "fused_kl", "IMPLS"]
