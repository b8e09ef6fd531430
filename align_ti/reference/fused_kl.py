"""fp32 plain-PyTorch definition of the vocabulary divergences (the test oracle).

Semantics (DESIGN.md, API contract):
- `z_S = (h_S W_S[:V']^T + b_S[:V']) / T`, `z_T` likewise; softmax over the first V' entries.
  No T^2 factor.
- forward `D = KL(p_T || p_S)`; reverse `D = KL(p_S || p_T)`;
  jsd `D = beta KL(p_T || M) + (1 - beta) KL(p_S || M)`, `M = beta p_T + (1 - beta) p_S`.
- Per selected row i: `w_i D_i`. "none" -> `[M]`; "sum" -> `sum w_i D_i`;
  "mean" -> `sum w_i D_i / sum w_i`, and 0 (zero gradients) with no rows or `sum w_i == 0`.
- -inf logits are vocabulary masks, with 0 log 0 = 0: a column of probability 0 adds nothing
  to a term that it weighs (forward KL: p_T; reverse: p_S; JSD: both), so a column masked in
  both models adds nothing, JSD stays finite, and p_T > 0 = p_S gives forward KL +inf (the
  mirror for reverse). A row of weight 0 adds exactly 0, +inf included. A row whose logits
  are all -inf, NaN or +inf has no distribution: NaN.
- CE: cross-entropy of the unscaled student logits over all Vs entries, mean over rows whose
  label is not -100, 0 when there are none.

Plain definitions, no argument checks (those live with the ops, align_ti.ops.fused_kl):
this module imports only torch, so that no code is shared between the oracle and what it
checks. It repeats the few helpers it needs (IGNORE_INDEX, the default V') on purpose.
"""
from __future__ import annotations

import math

import torch

IGNORE_INDEX = -100  # a twin of align_ti.constants.IGNORE_INDEX (the oracle shares no code)


def _vocab_size(vocab_size, vs: int, vt: int) -> int:
    """V' = min(Vs, Vt) unless given."""
    return min(vs, vt) if vocab_size is None else vocab_size


def select_rows(t: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """The rows of an [N, ...] tensor picked by `rows` (None = all, indices or a bool mask)."""
    return t if rows is None else t[rows]


def align_per_row(t: torch.Tensor | None, rows: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """A per-selected-row tensor (weights, labels) in the order of the selected rows.

    It is [M] already, except with a bool mask, where it may also be given as [N]."""
    if t is None or rows is None or rows.dtype != torch.bool or t.shape[0] != n:
        return t
    return t[rows]


def _p_log_ratio(lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """p (log p - log q) per column, with 0 log 0 = 0: 0 where p == 0 whatever log q is (a
    column masked by -inf), +inf where p > 0 == q. The difference is masked, not the product,
    so its gradient is 0 there too (not 0 * inf), and a NaN p stays NaN."""
    p = lp.exp()
    return p * torch.where(p > 0, lp - lq, torch.zeros_like(p))


def divergence_from_logits(zs: torch.Tensor, zt: torch.Tensor, divergence: str, beta: float) -> torch.Tensor:
    """Per-row divergence [M] from already scaled fp32 logits [M, V'] (-inf = masked column)."""
    ls = torch.log_softmax(zs, dim=-1)
    lt = torch.log_softmax(zt, dim=-1)
    if divergence == "forward":
        return _p_log_ratio(lt, ls).sum(-1)
    if divergence == "reverse":
        return _p_log_ratio(ls, lt).sum(-1)
    b = beta
    # log M = logaddexp(log b + lt, log(1-b) + ls), stable for any logits. The clamp gives a
    # column masked in both models a finite log M (its terms are 0 anyway), so no NaN reaches
    # the gradient through logaddexp's -inf - -inf.
    lo = torch.finfo(torch.float32).min
    lm = torch.logaddexp((lt + math.log(b)).clamp(min=lo), (ls + math.log1p(-b)).clamp(min=lo))
    return b * _p_log_ratio(lt, lm).sum(-1) + (1 - b) * _p_log_ratio(ls, lm).sum(-1)


def _live_rows_divergence(zs, zt, w, divergence: str, beta: float) -> torch.Tensor:
    """divergence_from_logits, with the rows of weight 0 computed on zero logits instead: their
    w D is 0 anyway, and an infinite D there would send 0 * inf = NaN into the gradients."""
    if w is not None:
        live = (w != 0)[:, None]
        zs = torch.where(live, zs, torch.zeros_like(zs))
        zt = torch.where(live, zt, torch.zeros_like(zt))
    return divergence_from_logits(zs, zt, divergence, beta)


def reduce_rows(d: torch.Tensor, w: torch.Tensor | None, reduction: str) -> torch.Tensor:
    """Apply the row weights and the reduction, with the 0 rules of the contract (a row of
    weight 0 adds 0, even when its divergence is +inf)."""
    wd = d if w is None else torch.where(w != 0, w * d, torch.zeros_like(d))
    if reduction == "none":
        return wd
    total = wd.sum()
    if reduction == "sum":
        return total
    denom = torch.tensor(float(d.shape[0]), device=d.device) if w is None else w.sum()
    # 0 (and zero gradients) when there are no rows or all weights are 0.
    safe = torch.where(denom > 0, denom, torch.ones_like(denom))
    return torch.where(denom > 0, total / safe, torch.zeros_like(total))


def fused_kl_reference(
    student_logits,
    teacher_logits,
    rows=None,
    weights=None,
    divergence="forward",
    beta=0.5,
    temperature=1.0,
    vocab_size=None,
    reduction="mean",
):
    """The divergence between two logits tensors [N, Vs], [N, Vt] at the selected rows."""
    n = student_logits.shape[0]
    v = _vocab_size(vocab_size, student_logits.shape[1], teacher_logits.shape[1])
    zs = select_rows(student_logits, rows)[:, :v].float() / temperature
    zt = select_rows(teacher_logits, rows)[:, :v].detach().float() / temperature
    w = align_per_row(weights, rows, n)
    w = None if w is None else w.detach().float()
    return reduce_rows(_live_rows_divergence(zs, zt, w, divergence, beta), w, reduction)


def _logits(hidden, weight, bias):
    z = hidden.float() @ weight.float().t()
    return z if bias is None else z + bias.float()


def fused_linear_kl_reference(
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
):
    """fused_linear_kl's definition: both LM heads applied in fp32, then fused_kl_reference."""
    kl, _ = fused_linear_distill_reference(
        student_hidden, student_weight, teacher_hidden, teacher_weight, labels=None,
        rows=rows, weights=weights, divergence=divergence, beta=beta, temperature=temperature,
        vocab_size=vocab_size, reduction=reduction, student_bias=student_bias,
        teacher_bias=teacher_bias,
    )
    return kl


def fused_linear_distill_reference(
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
):
    """(kl, ce): the divergence as fused_linear_kl, and the student's SFT cross-entropy.

    `labels` [M] (or [N] with a bool mask) holds the target id of each selected row, -100 for
    rows without CE. With labels=None only the divergence is computed and ce is None.
    """
    n = student_hidden.shape[0]
    v = _vocab_size(vocab_size, student_weight.shape[0], teacher_weight.shape[0])
    hs = select_rows(student_hidden, rows)
    ht = select_rows(teacher_hidden, rows).detach()
    zs_full = _logits(hs, student_weight, student_bias)
    with torch.no_grad():
        zt = _logits(ht, teacher_weight.detach(), None if teacher_bias is None else teacher_bias.detach())
    w = align_per_row(weights, rows, n)
    w = None if w is None else w.detach().float()
    d = _live_rows_divergence(zs_full[:, :v] / temperature, zt[:, :v] / temperature, w,
                              divergence, beta)
    kl = reduce_rows(d, w, reduction)
    if labels is None:
        return kl, None
    y = align_per_row(labels, rows, n).long()
    valid = y != IGNORE_INDEX
    nll = torch.nn.functional.cross_entropy(
        zs_full, torch.where(valid, y, torch.zeros_like(y)), reduction="none"
    )
    count = valid.sum()
    ce_sum = torch.where(valid, nll, torch.zeros_like(nll)).sum()
    ce = torch.where(count > 0, ce_sum / count.clamp(min=1), torch.zeros_like(ce_sum))
    return kl, ce


__all__ = [
    "fused_kl_reference",
    "fused_linear_kl_reference",
    "fused_linear_distill_reference",
    "divergence_from_logits",
    "reduce_rows",
]
