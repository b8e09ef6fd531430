"""The per-chunk step in PyTorch: log-sum-exps, the divergence, the CE term and the gradient
with respect to the raw student logits of one row chunk of fp32 logits, written in place.

It is the default implementation of the custom op `align_ti::kl_chunk` (`chunk_op`), which the
native CPU kernel overrides, and what impl="torch" runs. The Triton row kernel
(`chunk_triton`) computes the same in one program per row.

-inf logits are vocabulary masks, with 0 log 0 = 0. No elementwise pass of its own applies the
rule: a product p (log p - log q) at a column where p == 0 is 0 * -inf or 0 * NaN, and
nansum drops it (`_sum_terms`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from align_ti.constants import IGNORE_INDEX
from align_ti.ops import heuristics as _heur

_F32 = torch.float32


@dataclass(frozen=True)
class ChunkSpec:
    """What one chunk step computes (the scalar arguments of `align_ti::kl_chunk`):
    v: V', the divergence's columns; div_code: `options.DIVERGENCE_CODES`; beta: the JSD
    weight; inv_t: 1 / temperature; need_grad: write the gradient; split: the CE gradient
    apart from the divergence's (else summed into one)."""

    v: int
    div_code: int
    beta: float
    inv_t: float
    need_grad: bool
    split: bool = False


def log_softmax_into(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """out <- log_softmax(x, -1) without allocating (out must not alias x). A strided `out`
    (the first V' columns of wider student logits) gets a copy: aten's _log_softmax.out
    writes a non-contiguous out as if it were contiguous."""
    if not out.is_contiguous():
        return out.copy_(torch.log_softmax(x, -1))
    return torch.ops.aten._log_softmax.out(x, -1, False, out=out)


def scratch_buffer(scratch: dict, name: str, rows: int, cols: int, device) -> torch.Tensor:
    """A reusable fp32 [rows, cols] buffer from `scratch` (grown when too small)."""
    t = scratch.get(name)
    if t is None or t.shape[0] < rows or t.shape[1] != cols:
        t = scratch[name] = torch.empty(rows, cols, dtype=_F32, device=device)
    return t[:rows]


def chunk_torch(zs, zt, spec: ChunkSpec, labels=None, a=None, c=None, scratch=None):
    """The chunk step on fp32 logits.

    zs:     [r, ns] raw student logits (ns = V', or Vs when labels are given); overwritten
            with the gradient a * dD/dz (+ c * dCE/dz unless split) when spec.need_grad.
    zt:     [r, V'] raw teacher logits; used as scratch.
    labels: int64 [r] (IGNORE_INDEX = no CE) or None; a, c: fp32 [r] gradient coefficients.
    scratch: dict of reusable buffers; missing ones are allocated.
    Returns (d [r], nll [r] or None, g (= zs) or None, gce [r, ns] or None).

    The rows go through `_block` in sub-blocks sized by `heuristics.elementwise_rows`: its
    temporaries (log p_S, the CE log-probs, a JSD buffer) then take a few MiB instead of
    [r, V'] each, so they do not shrink the row chunk that the matmuls see, and the ~10
    elementwise passes run over cache-resident rows.
    """
    r, ns = zs.shape
    scratch = {} if scratch is None else scratch
    has_ce = labels is not None
    per_row = 4 * (spec.v + (spec.v if spec.div_code == 2 else 0) + (ns if has_ce else 0))
    step = _heur.elementwise_rows(per_row, zs.device)
    if r <= step:
        return _block(zs, zt, spec, labels, a, c, scratch)
    d = torch.empty(r, dtype=_F32, device=zs.device)
    nll = torch.empty(r, dtype=_F32, device=zs.device) if has_ce else None
    gce = None
    if spec.need_grad and has_ce and spec.split:  # the block's CE gradient lives in scratch: keep it
        gce = scratch_buffer(scratch, "gce", r, ns, zs.device)
    for s in range(0, r, step):
        e = min(s + step, r)
        d[s:e], nll_b, _, gce_b = _block(
            zs[s:e], zt[s:e], spec, labels[s:e] if has_ce else None,
            a[s:e] if spec.need_grad else None, c[s:e] if (spec.need_grad and has_ce) else None,
            scratch)
        if has_ce:
            nll[s:e] = nll_b
        if gce is not None:
            gce[s:e] = gce_b
    return d, nll, (zs if spec.need_grad else None), gce


def _no_distribution(ls: torch.Tensor, lt: torch.Tensor) -> torch.Tensor:
    """bool [r]: rows where either model has no distribution. A NaN or +inf logit, or a row
    masked in every column, makes the row's log-sum-exp NaN and so every log-probability of
    the row: column 0 shows it. Those rows must stay NaN, which nansum would hide."""
    return torch.isnan(ls[:, 0]) | torch.isnan(lt[:, 0])


def _sum_terms(terms: torch.Tensor, no_dist: torch.Tensor) -> torch.Tensor:
    """[r]: the row sums of p (log p - log q) products with 0 log 0 = 0 (see the module
    docstring); +inf where p > 0 and q == 0 stays; NaN for the rows without a distribution."""
    return terms.nansum(-1).masked_fill_(no_dist, math.nan)


def _gradient_core(terms: torch.Tensor, p: torch.Tensor, d: torch.Tensor, out: torch.Tensor):
    """out <- p (log p - log q - D) = terms - p D (the reverse KL and JSD gradients), with the
    masked columns' non-finite terms (0 * -inf, and +inf where only q is masked) as 0 and a
    +inf D as 0: a finite gradient for every row with a distribution, so a row of weight 0
    gets exactly 0 (one whose D is +inf gets a finite gradient without meaning). In two passes,
    as the plain `(log p - log q - D) * p` it replaces."""
    d = torch.where(d == math.inf, 0.0, d)
    return torch.addcmul(terms.nan_to_num_(0.0, 0.0, 0.0), p, d[:, None], value=-1.0, out=out)


def _ce_block(zs, labels, c, need_grad, lp):
    """The CE of the raw student logits: (nll [r], its gradient c * (p - onehot) or None),
    with lp ([r, ns] scratch) holding the log-probabilities, then the gradient."""
    log_softmax_into(lp, zs)
    valid = labels != IGNORE_INDEX
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    picked = lp.gather(1, safe[:, None]).squeeze(1)
    nll = torch.where(valid, -picked, torch.zeros_like(picked))
    if not need_grad:
        return nll, None
    cc = torch.where(valid, c, torch.zeros_like(c))
    gce = lp.exp_()
    gce.scatter_add_(1, safe[:, None], torch.full_like(picked[:, None], -1.0))
    return nll, gce.mul_(cc[:, None])


def _zero_weightless_rows(g: torch.Tensor, a: torch.Tensor, no_dist: torch.Tensor) -> None:
    """A row of weight 0 gets exactly 0 from the divergence, also where it has no distribution
    (its terms are NaN, and 0 * NaN is NaN), as in the Triton and native kernels. Only such rows
    are touched: on CPU found by nonzero (no host sync there); on other devices a masked fill,
    which needs none."""
    bad = no_dist & (a == 0)
    if g.device.type == "cpu":
        idx = bad.nonzero().squeeze(1)
        if idx.numel():
            g.index_fill_(0, idx, 0.0)
    else:
        g.masked_fill_(bad[:, None], 0.0)


def _block(zs, zt, spec: ChunkSpec, labels, a, c, scratch):
    """`chunk_torch` on one block of rows, in a fixed set of buffers from `scratch` ("s", "x":
    [>= r, V'], "ce": [>= r, ns])."""
    r = zs.shape[0]
    v, beta, need_grad = spec.v, spec.beta, spec.need_grad

    def buf(name, cols):
        return scratch_buffer(scratch, name, r, cols, zs.device)

    nll = gce = None
    if labels is not None:
        nll, gce = _ce_block(zs, labels, c, need_grad, buf("ce", zs.shape[1]))
    us = zs[:, :v]
    if spec.inv_t != 1.0:
        us.mul_(spec.inv_t)
        zt.mul_(spec.inv_t)
    ls = log_softmax_into(buf("s", v), us)  # log p_S
    lt = log_softmax_into(us, zt)           # log p_T, over the student's raw columns
    no_dist = _no_distribution(ls, lt)
    pt_or_free = zt                         # the teacher's raw logits are no longer needed
    if spec.div_code == 0:
        torch.exp(lt, out=pt_or_free)       # p_T
        lt.sub_(ls)                         # log p_T - log p_S
        if need_grad:
            ls.exp_().sub_(pt_or_free)      # p_S - p_T
        d = _sum_terms(pt_or_free.mul_(lt), no_dist)
        gk_scale = 1.0
    elif spec.div_code == 1:
        ps = torch.exp(ls, out=pt_or_free)  # p_S
        ls.sub_(lt)                         # log p_S - log p_T
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
        torch.logaddexp(lm, x, out=lm)      # log M
        torch.exp(lt, out=x)                # p_T
        lt.sub_(lm)
        dt = _sum_terms(x.mul_(lt), no_dist)
        torch.exp(ls, out=x)                # p_S
        ls.sub_(lm)                         # log p_S - log M
        terms = torch.mul(x, ls, out=lt)
        kls = _sum_terms(terms, no_dist)
        d = beta * dt + (1.0 - beta) * kls
        if need_grad:
            _gradient_core(terms, x, kls, out=ls)  # p_S (log p_S - log M - KL(p_S || M))
        gk_scale = 1.0 - beta
    if not need_grad:
        return d, nll, None, None
    torch.mul(ls, (a * (spec.inv_t * gk_scale))[:, None], out=us)  # gradient over the V' columns
    _zero_weightless_rows(us, a, no_dist)
    if zs.shape[1] > v:
        zs[:, v:].zero_()
    if gce is not None and not spec.split:
        zs.add_(gce)
        gce = None
    return d, nll, zs, gce
