"""IVA's visual-token selection: `select_topk` and what `topk_align` needs of it.

Two stable sorts of each sample's mass ([B, L], O(B L log L), a few microseconds on the GPU)
rank its vision tokens (largest mass first, ties to the lower position); the per-sample kept
count (k clamped, or ceil(ratio * Nv)) is a [B] tensor, so no host sync is needed to select.
The only host sync is the length of the *compact* output (one read of the number of kept rows
on CUDA, free on CPU); `pad=True` gives a fixed-size layout without any.
"""
from __future__ import annotations

import math

import torch

from align_ti.validation import (
    check_bool,
    check_finite_nonnegative,
    check_tensor,
    value_checks_enabled,
)

_F32 = torch.float32
NORMALIZE = ("sample", "token")


def check_selection_args(mass, vision_mask, k, ratio) -> None:
    """mass float [B, L], vision_mask bool [B, L] on one device, k or ratio (not both); the
    mass finite and >= 0 at vision tokens, the only entries read (a content check)."""
    check_tensor("mass", mass, ndim=2, floating=True)
    check_tensor("vision_mask", vision_mask, ndim=2, dtypes=(torch.bool,))
    if vision_mask.shape != mass.shape:
        raise ValueError(
            f"vision_mask must have the shape of mass: got {list(vision_mask.shape)} vs {list(mass.shape)}"
        )
    if vision_mask.device != mass.device:
        raise ValueError(f"vision_mask is on {vision_mask.device} but mass is on {mass.device}")
    if k is not None and ratio is not None:
        raise ValueError("give k or ratio, not both")
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k <= 0):
        raise ValueError(f"k must be a positive int, got {k!r}")
    if ratio is not None and (
        isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1
    ):
        raise ValueError(f"ratio must be a number in (0, 1], got {ratio!r}")
    if value_checks_enabled():
        zero = torch.zeros((), dtype=mass.dtype, device=mass.device)
        check_finite_nonnegative("mass (at vision tokens)", torch.where(vision_mask, mass, zero))


def kept_count(num_vision: int, k: int | None, ratio: float | None) -> int:
    """How many of a sample's num_vision tokens are kept."""
    if k is not None:
        return min(k, num_vision)
    if ratio is not None:
        return min(num_vision, math.ceil(ratio * num_vision - 1e-9))
    return num_vision


def _kept_counts(num_vision: torch.Tensor, k, ratio) -> torch.Tensor:
    """int64 [B]: tokens kept per sample, with `kept_count`'s rules, on the device."""
    if k is not None:
        return num_vision.clamp(max=k)
    if ratio is not None:
        # float64, like kept_count's Python float arithmetic: identical rounding
        n = torch.ceil(num_vision.to(torch.float64) * float(ratio) - 1e-9).to(torch.int64)
        return torch.minimum(n, num_vision)
    return num_vision


def _select_dense(mass, vision_mask, k, ratio):
    """(keep bool [B, L], weights fp32 [B, L] (0 off keep), n_keep int64 [B]); no host sync."""
    m = mass.float()
    length = m.shape[1]
    n_keep = _kept_counts(vision_mask.sum(1), k, ratio)
    # largest mass first, ties to the lower position (stable), then vision tokens first (stable)
    o1 = torch.sort(m, dim=1, descending=True, stable=True).indices
    vis = vision_mask.gather(1, o1).to(torch.int8)
    o2 = torch.sort(vis, dim=1, descending=True, stable=True).indices
    order = o1.gather(1, o2)
    rank = torch.arange(length, device=m.device)
    keep = torch.zeros_like(vision_mask).scatter_(1, order, rank[None, :] < n_keep[:, None])
    w = torch.where(keep, m, torch.zeros((), dtype=_F32, device=m.device))
    total = w.sum(1, keepdim=True)
    ok = total > 0
    w = torch.where(ok, w / torch.where(ok, total, torch.ones_like(total)), torch.zeros_like(w))
    return keep, w, n_keep


def _compact(keep, w):
    rows = keep.flatten().nonzero().squeeze(1)  # the one host sync (output length) on CUDA
    return rows, w.flatten().index_select(0, rows)


def _padded(keep, w, n_keep, k, ratio):
    b_size, length = keep.shape
    cap = kept_count(length, k, ratio)
    # kept positions ascending first, then the others ascending (stable sort on the flag)
    pos = torch.sort(keep.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :cap]
    valid = torch.arange(cap, device=keep.device)[None, :] < n_keep[:, None]
    rows = pos + (torch.arange(b_size, device=keep.device) * length)[:, None]
    weights = torch.where(valid, w.gather(1, pos), torch.zeros((), dtype=_F32, device=w.device))
    return rows.flatten(), weights.flatten(), valid.flatten()


def selected_rows(mass, vision_mask, k, ratio, normalize: str):
    """topk_align's rows: (int64 [M] flat indices into B*L, fp32 [M] weights), the weights of
    `select_topk` scaled by each sample's kept count for normalize="token"."""
    keep, w, n_keep = _select_dense(mass.detach(), vision_mask, k, ratio)
    if normalize == "token":  # sample b weighs its number of kept tokens
        w = w * n_keep[:, None].to(_F32)
    return _compact(keep, w)


def topk_weights(mass, vision_mask, k=None, ratio=None) -> torch.Tensor:
    """IVA's weight of every position, fp32 ``[B, L]``: `select_topk`'s renormalised weight at
    the kept vision tokens, 0 elsewhere. No host sync: a dense row-weight vector for
    `fused_linear_kl` (e.g. IVA's rows in one call with other losses' rows). Arguments and
    errors as `select_topk`."""
    check_selection_args(mass, vision_mask, k, ratio)
    return _select_dense(mass.detach(), vision_mask, k, ratio)[1]


def select_topk(mass, vision_mask, k=None, ratio=None, pad=False):
    """IVA's visual-token selection: per sample, the top-k vision tokens by teacher attention mass.

    Per sample b, among its vision tokens (``vision_mask[b]``): keep ``k`` of them (clamped to
    the sample's count Nv_b), or ``ceil(ratio * Nv_b)`` (at least one when Nv_b > 0), or all
    (neither given: the METHOD default "all, weighted"). The kept tokens are those with the
    largest mass; ties go to the lower position. Their weights are the mass renormalised within
    the sample (``w_j / sum_{i in S_b} w_i``); a sample whose kept mass sums to 0 gets weight 0
    on its kept tokens (never NaN); a sample without vision tokens contributes no rows.

    Args:
        mass: float ``[B, L]`` teacher attention mass (e.g. `align_ti.attention_mass` at the
            IRS layer); only vision positions are read, and those must be finite and >= 0.
        vision_mask: bool ``[B, L]``, True at vision (image) tokens; padding is False.
        k: positive int, or None.
        ratio: number in ``(0, 1]``, or None (not both k and ratio).
        pad: False -> the compact layout of the reference; True -> a fixed-size layout.

    Returns:
        ``pad=False``: ``(rows, weights)``: int64 ``[M]`` flat indices into ``B*L`` (sample-major,
        ascending position within a sample) and fp32 ``[M]`` weights; identical to
        `select_topk_reference`. On CUDA this costs one host sync (reading M).
        ``pad=True``: ``(rows, weights, valid)`` of fixed length ``B * cap`` with
        ``cap = min(k, L)``, ``ceil(ratio * L)`` or ``L``: sample b owns slots
        ``[b * cap, (b + 1) * cap)``, its kept rows first (ascending), then padding slots that
        point at other positions of the same sample with weight 0 and ``valid`` False. No host
        sync. ``rows[valid]``, ``weights[valid]`` equal the compact output. Padding rows are
        valid indices with weight 0, so the padded pair can be passed to `fused_linear_kl`
        (``reduction="mean"``) as is, at the cost of computing the padding rows.

    Raises:
        ValueError / TypeError naming the argument: mass not a 2-D float tensor, vision_mask not
        bool or of another shape or device, k <= 0 or not an int, ratio outside (0, 1], both k
        and ratio, NaN, inf or negative mass at a vision token (a content check, see
        `align_ti.set_value_checks`).
    """
    check_selection_args(mass, vision_mask, k, ratio)
    check_bool("pad", pad)
    keep, w, n_keep = _select_dense(mass, vision_mask, k, ratio)
    if pad:
        return _padded(keep, w, n_keep, k, ratio)
    return _compact(keep, w)
