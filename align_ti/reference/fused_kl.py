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

This module also holds the option dataclass and the argument checks that the fast paths
share, so that the definition and its validation live in one place. It never imports triton.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from align_ti.validation import (
    check_choice,
    check_dim,
    check_finite_nonnegative,
    check_index_range,
    check_open_unit,
    check_positive,
    check_same_device,
    check_same_dtype,
    check_tensor,
    normalize_rows,
)

DIVERGENCES = ("forward", "reverse", "jsd")
REDUCTIONS = ("mean", "sum", "none")
IGNORE_INDEX = -100
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# temperature and 1 / temperature both normal float32 numbers (the kernels scale in fp32)
_TEMPERATURE_RANGE = (1e-37, 1e37)


@dataclass(frozen=True)
class KLOptions:
    """The non-tensor options of every vocabulary-divergence op, validated once."""

    divergence: str = "forward"
    beta: float = 0.5
    temperature: float = 1.0
    reduction: str = "mean"

    def __post_init__(self):
        check_choice("divergence", self.divergence, DIVERGENCES)
        check_choice("reduction", self.reduction, REDUCTIONS)
        check_positive("temperature", self.temperature)
        if not _TEMPERATURE_RANGE[0] <= self.temperature <= _TEMPERATURE_RANGE[1]:
            raise ValueError(f"temperature must be in [{_TEMPERATURE_RANGE[0]:.0e}, "
                             f"{_TEMPERATURE_RANGE[1]:.0e}] (the kernels scale by 1 / temperature in "
                             f"float32), got {self.temperature!r}")
        if self.divergence == "jsd":
            check_open_unit("beta", self.beta)


def resolve_vocab_size(vocab_size, vs: int, vt: int) -> int:
    """V' = min(Vs, Vt) by default; an explicit value must fit both heads."""
    if min(vs, vt) == 0:
        raise ValueError(f"the heads must have at least one vocabulary row: the student has {vs}, "
                         f"the teacher {vt} (student_weight / teacher_weight, or the logits' last dim)")
    if vocab_size is None:
        return min(vs, vt)
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= 0:
        raise ValueError(f"vocab_size must be a positive int or None, got {vocab_size!r}")
    if vocab_size > min(vs, vt):
        raise ValueError(
            f"vocab_size={vocab_size} is larger than a head: the student has {vs} rows, "
            f"the teacher {vt}"
        )
    return vocab_size


def check_head(prefix: str, hidden, weight, bias, n: int | None) -> None:
    """One model's hidden [N, H], weight [V, H] and optional bias [V] fit together."""
    check_tensor(f"{prefix}_hidden", hidden, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor(f"{prefix}_weight", weight, ndim=2, dtypes=FLOAT_DTYPES)
    check_same_dtype(f"{prefix}_hidden", hidden, f"{prefix}_weight", weight)
    check_dim(f"{prefix}_weight", weight, 1, hidden.shape[1], f"the width of {prefix}_hidden")
    if n is not None:
        check_dim(f"{prefix}_hidden", hidden, 0, n, "the number of rows of student_hidden")
    if bias is not None:
        check_tensor(f"{prefix}_bias", bias, ndim=1, dtypes=FLOAT_DTYPES)
        check_dim(f"{prefix}_bias", bias, 0, weight.shape[0], f"the rows of {prefix}_weight")


def check_logits(student_logits, teacher_logits) -> None:
    check_tensor("student_logits", student_logits, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("teacher_logits", teacher_logits, ndim=2, dtypes=FLOAT_DTYPES)
    check_dim("teacher_logits", teacher_logits, 0, student_logits.shape[0], "the rows of student_logits")
    check_same_device({"student_logits": student_logits, "teacher_logits": teacher_logits})


def check_weights(weights, rows, n: int, device) -> None:
    """weights: float [M] (M = len(rows) for indices, N without rows) or [N] with a bool mask."""
    if weights is None:
        return
    check_tensor("weights", weights, ndim=1, floating=True)
    if weights.device != device:
        raise ValueError(f"weights is on {weights.device} but the hidden states are on {device}")
    if rows is None:
        check_dim("weights", weights, 0, n, "the number of rows N (rows=None)")
    elif rows.dtype != torch.bool:
        check_dim("weights", weights, 0, rows.shape[0], "the number of indices in rows")
    elif weights.shape[0] != n:
        # [M] with a bool mask: M is only known by counting the mask (a host sync).
        m = int(rows.sum())
        if weights.shape[0] != m:
            raise ValueError(
                f"weights has {weights.shape[0]} entries; with a bool rows mask it must have "
                f"N = {n} or M = {m} (the number of True rows)"
            )
    # the ops weigh in float32: an fp64 weight that overflows it is as bad as an inf
    check_finite_nonnegative("weights", weights.float() if weights.dtype == torch.float64 else weights)


def check_labels(labels, rows, n: int, vs: int, device) -> None:
    check_tensor("labels", labels, ndim=1, dtypes=(torch.int64, torch.int32))
    if labels.device != device:
        raise ValueError(f"labels is on {labels.device} but the hidden states are on {device}")
    if rows is None:
        check_dim("labels", labels, 0, n, "the number of rows N (rows=None)")
    elif rows.dtype != torch.bool:
        check_dim("labels", labels, 0, rows.shape[0], "the number of indices in rows")
    elif labels.shape[0] != n and labels.shape[0] != int(rows.sum()):
        raise ValueError(
            f"labels has {labels.shape[0]} entries; with a bool rows mask it must have N = {n} "
            f"or M = {int(rows.sum())} entries"
        )
    check_index_range("labels", labels, vs, "the student vocabulary Vs", allow=IGNORE_INDEX)


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


def divergence_from_logits(zs: torch.Tensor, zt: torch.Tensor, opts: KLOptions) -> torch.Tensor:
    """Per-row divergence [M] from already scaled fp32 logits [M, V'] (-inf = masked column)."""
    ls = torch.log_softmax(zs, dim=-1)
    lt = torch.log_softmax(zt, dim=-1)
    if opts.divergence == "forward":
        return _p_log_ratio(lt, ls).sum(-1)
    if opts.divergence == "reverse":
        return _p_log_ratio(ls, lt).sum(-1)
    b = opts.beta
    # log M = logaddexp(log b + lt, log(1-b) + ls), stable for any logits. The clamp gives a
    # column masked in both models a finite log M (its terms are 0 anyway), so no NaN reaches
    # the gradient through logaddexp's -inf - -inf.
    lo = torch.finfo(torch.float32).min
    lm = torch.logaddexp((lt + math.log(b)).clamp(min=lo), (ls + math.log1p(-b)).clamp(min=lo))
    return b * _p_log_ratio(lt, lm).sum(-1) + (1 - b) * _p_log_ratio(ls, lm).sum(-1)


def _live_rows_divergence(zs, zt, w, opts: KLOptions) -> torch.Tensor:
    """divergence_from_logits, with the rows of weight 0 computed on zero logits instead: their
    w D is 0 anyway, and an infinite D there would send 0 * inf = NaN into the gradients."""
    if w is not None:
        live = (w != 0)[:, None]
        zs = torch.where(live, zs, torch.zeros_like(zs))
        zt = torch.where(live, zt, torch.zeros_like(zt))
    return divergence_from_logits(zs, zt, opts)


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
    opts = KLOptions(divergence, beta, temperature, reduction)
    check_logits(student_logits, teacher_logits)
    n = student_logits.shape[0]
    v = resolve_vocab_size(vocab_size, student_logits.shape[1], teacher_logits.shape[1])
    rows = normalize_rows(rows, n, student_logits.device)
    check_weights(weights, rows, n, student_logits.device)
    zs = select_rows(student_logits, rows)[:, :v].float() / temperature
    zt = select_rows(teacher_logits, rows)[:, :v].detach().float() / temperature
    w = align_per_row(weights, rows, n)
    w = None if w is None else w.detach().float()
    return reduce_rows(_live_rows_divergence(zs, zt, w, opts), w, opts.reduction)


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
    opts = KLOptions(divergence, beta, temperature, reduction)
    check_head("student", student_hidden, student_weight, student_bias, None)
    n = student_hidden.shape[0]
    check_head("teacher", teacher_hidden, teacher_weight, teacher_bias, n)
    device = check_same_device({
        "student_hidden": student_hidden, "student_weight": student_weight,
        "teacher_hidden": teacher_hidden, "teacher_weight": teacher_weight,
        "student_bias": student_bias, "teacher_bias": teacher_bias,
    })
    vs, vt = student_weight.shape[0], teacher_weight.shape[0]
    v = resolve_vocab_size(vocab_size, vs, vt)
    rows = normalize_rows(rows, n, device)
    check_weights(weights, rows, n, device)
    if labels is not None:
        check_labels(labels, rows, n, vs, device)

    hs = select_rows(student_hidden, rows)
    ht = select_rows(teacher_hidden, rows).detach()
    zs_full = _logits(hs, student_weight, student_bias)
    with torch.no_grad():
        zt = _logits(ht, teacher_weight.detach(), None if teacher_bias is None else teacher_bias.detach())
    w = align_per_row(weights, rows, n)
    w = None if w is None else w.detach().float()
    d = _live_rows_divergence(zs_full[:, :v] / temperature, zt[:, :v] / temperature, w, opts)
    kl = reduce_rows(d, w, opts.reduction)
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
    "KLOptions",
    "DIVERGENCES",
    "REDUCTIONS",
    "IGNORE_INDEX",
    "fused_kl_reference",
    "fused_linear_kl_reference",
    "fused_linear_distill_reference",
    "divergence_from_logits",
    "reduce_rows",
    "resolve_vocab_size",
]
