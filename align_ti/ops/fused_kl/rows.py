"""Which rows a fused KL call processes, and the per-row sums around the chunk loop: row
weights, the coefficients of the gradients, and the reductions.

No host syncs: denominators stay on the device, and 0 / 0 is 0 by `safe_div` (the contract's
"no rows or all weights 0" rule).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from align_ti.constants import IGNORE_INDEX

_F32 = torch.float32

# A bool `rows` mask becomes indices (nonzero) on devices where that costs no host sync
# (CPU) and for reduction="none" (whose output length is the number of selected rows).
# Elsewhere (CUDA, mean/sum) the mask is applied inside the op: every row is processed and
# unselected rows contribute exactly 0, with no host sync. Tests flip this to check both.
MASK_AS_INDICES_DEVICES = ("cpu",)


@dataclass(frozen=True)
class RowPlan:
    """The selected rows as the drivers take them (at most one of idx and mask):

    idx:     int64 [M] indices into the N rows (repeats allowed), or None;
    mask:    bool [N], applied inside the op (every row processed, unselected ones add 0), or None;
    weights: fp32, one per processed row (M with idx, else N), or None (all 1);
    labels:  int64, one per processed row, or None (no CE).
    """

    idx: Optional[torch.Tensor] = None
    mask: Optional[torch.Tensor] = None
    weights: Optional[torch.Tensor] = None
    labels: Optional[torch.Tensor] = None

    def count(self, n: int) -> int:
        """The number of processed rows of an N-row input."""
        return n if self.idx is None else self.idx.shape[0]


def plan_rows(rows, weights, labels, n: int, device: torch.device, reduction: str) -> RowPlan:
    """Validated (rows, weights, labels) -> RowPlan. `rows` is already normalised (None, int64
    indices or a bool mask, `align_ti.validation.normalize_rows`)."""
    w = None if weights is None else weights.detach()
    y = labels
    if rows is None or rows.dtype != torch.bool:
        idx, mask = rows, None
    elif device.type in MASK_AS_INDICES_DEVICES or reduction == "none":
        idx, mask = rows.nonzero().squeeze(1), None
        if w is not None and w.shape[0] == n:
            w = w.index_select(0, idx)
        if y is not None and y.shape[0] == n:
            y = y.index_select(0, idx)
    else:
        idx, mask = None, rows
        if w is not None and w.shape[0] != n:  # [M] weights with an [N] mask
            w = torch.zeros(n, dtype=w.dtype, device=device).masked_scatter(rows, w)
        if y is not None and y.shape[0] != n:
            y = torch.full((n,), IGNORE_INDEX, dtype=y.dtype, device=device).masked_scatter(rows, y)
    return RowPlan(idx, mask, None if w is None else w.to(_F32), None if y is None else y.long())


def _zero(device) -> torch.Tensor:
    return torch.zeros((), dtype=_F32, device=device)


def row_weights(plan: RowPlan, n_proc: int, device) -> Optional[torch.Tensor]:
    """Effective fp32 weight of every processed row (None = all ones): the mask's zeros
    applied to the weights."""
    if plan.mask is None:
        return plan.weights
    base = plan.weights if plan.weights is not None else torch.ones(n_proc, dtype=_F32, device=device)
    return torch.where(plan.mask, base, _zero(device))


def _kl_denominator(w_eff, n_proc: int, device) -> torch.Tensor:
    if w_eff is None:
        # a fill, not torch.tensor(...): a host value copied to a CUDA tensor syncs the stream
        return torch.full((), float(n_proc), dtype=_F32, device=device)
    return w_eff.sum()


def safe_div(x: torch.Tensor, denom: torch.Tensor) -> torch.Tensor:
    """x / denom, and 0 where denom == 0 (the contract's empty / all-zero-weight rule)."""
    ok = denom > 0
    return torch.where(ok, x / torch.where(ok, denom, torch.ones_like(denom)), torch.zeros_like(x))


def _ce_valid(labels, mask):
    valid = labels != IGNORE_INDEX
    return valid if mask is None else valid & mask


def kl_coefficients(w_eff, mask, n_proc: int, device, reduction: str, grad_kl) -> torch.Tensor:
    """fp32 [n_proc]: the factor of dD_i/dz in d(loss)/dz for each processed row (0 off the
    mask); `grad_kl` is the upstream gradient (None: 1)."""
    if reduction == "none":
        g = grad_kl.to(_F32)
        a = g if w_eff is None else g * w_eff
    else:
        a = w_eff if w_eff is not None else torch.ones(n_proc, dtype=_F32, device=device)
        if reduction == "mean":
            a = safe_div(a, _kl_denominator(w_eff, n_proc, device))
        if grad_kl is not None:
            a = a * grad_kl.to(_F32)
    return a if mask is None else torch.where(mask, a, _zero(device))


def ce_coefficients(labels, mask, grad_ce) -> torch.Tensor:
    """fp32 [n_proc]: the factor of dCE_i/dz (the mean over rows with a label)."""
    valid = _ce_valid(labels, mask)
    c = safe_div(valid.to(_F32), valid.sum().to(_F32))
    return c if grad_ce is None else c * grad_ce.to(_F32)


def weigh_rows(d: torch.Tensor, w: Optional[torch.Tensor]) -> torch.Tensor:
    """w_i D_i per row, and exactly 0 where w_i == 0, even when D_i is +inf (0 * inf = NaN)."""
    return d if w is None else torch.where(w != 0, w * d, torch.zeros((), dtype=d.dtype, device=d.device))


def reduce_kl(d, w_eff, mask, reduction: str, n_proc: int, device) -> torch.Tensor:
    """Apply the row weights and the reduction to the per-row divergence d [n_proc]."""
    wd = weigh_rows(d, w_eff)
    if mask is not None:
        wd = torch.where(mask, wd, _zero(device))
    if reduction == "none":
        return wd
    total = wd.sum()
    if reduction == "sum":
        return total
    return safe_div(total, _kl_denominator(w_eff, n_proc, device))


def reduce_ce(nll, labels, mask) -> torch.Tensor:
    """The mean CE over the rows with a label (0 when there are none)."""
    valid = _ce_valid(labels, mask)
    total = torch.where(valid, nll, torch.zeros_like(nll)).sum()
    return safe_div(total, valid.sum().to(_F32))
