"""TPA step selection: which response positions are branched (METHOD.md "TPA").

`branch_count` is the one rule for how many steps a sample gets; `select_branch_steps` picks
which, with counter-based randomness (`align_ti.ops.branches.rng`).
"""
from __future__ import annotations

from typing import Optional

import torch

from align_ti.constants import IGNORE_INDEX
from align_ti.ops.branches.rng import (
    INDEX_DTYPES,
    M32,
    STREAM_STEPS,
    position_keys,
    real_offset,
    sample_keys,
    uniform,
)
from align_ti.validation import check_tensor, describe


def eligible_steps(labels: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """bool [B, L]: the positions that may be branched: response tokens (``labels != -100``)
    that are real (``attention_mask == 1``) and not the first (``t >= 1``: a candidate for y_t
    is drawn from the student's output at row t - 1)."""
    eligible = (labels != IGNORE_INDEX) & (torch.arange(labels.shape[1], device=labels.device) >= 1)
    return eligible if attention_mask is None else eligible & attention_mask.bool()


def branch_count(n: torch.Tensor, fraction: float, max_per_sample: Optional[int] = None) -> torch.Tensor:
    """How many of a sample's n eligible positions are branched: ``ceil(fraction * n)`` with a
    1e-9 slack for float rounding (0.3 * 10 -> 3, not 4), at most ``max_per_sample``. The one
    rule for `select_branch_steps` and for anything that counts its steps in advance (the
    trainer's loss normalisers)."""
    k = n if fraction >= 1 else torch.ceil(n.to(torch.float64) * fraction - 1e-9).long()
    return k if max_per_sample is None else k.clamp(max=max_per_sample)


def select_branch_steps(
    labels: torch.Tensor,
    attention_mask: Optional[torch.Tensor] = None,
    fraction: float = 1.0,
    max_per_sample: Optional[int] = None,
    seed: int = 0,
    sample_ids: Optional[torch.Tensor] = None,
    epoch: int = 0,
) -> torch.Tensor:
    """The response positions to branch: int64 [B, S], ascending per sample, -1 = empty.

    A position t is eligible (`eligible_steps`) when ``labels[b, t] != -100``, it is a real
    token (``attention_mask[b, t] == 1``) and ``t >= 1`` (a candidate for y_t is drawn from the
    student's output at row t - 1). Per sample with n eligible positions,
    ``k = min(ceil(fraction * n), max_per_sample)`` of them are branched (ceil with a 1e-9
    slack for float rounding; every sample with a response gets at least one branch); all of
    them when ``fraction == 1`` and ``max_per_sample`` is None. Which k is a uniformly random subset keyed by
    (seed, sample id, epoch) and the position counted from the sample's first real token: it
    does not depend on the rest of the batch or on padding (left or right).
    S = the largest k in the batch (one host sync: the shape must be known).
    """
    check_tensor("labels", labels, ndim=2, dtypes=INDEX_DTYPES)
    b_size, length = labels.shape
    if attention_mask is not None:
        check_tensor("attention_mask", attention_mask, ndim=2)
        if attention_mask.shape != labels.shape:
            raise ValueError(f"attention_mask must have the shape of labels: got "
                             f"{describe(attention_mask)} vs {describe(labels)}")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ValueError(f"fraction must be a number with 0 < fraction <= 1, got {fraction!r}")
    if max_per_sample is not None and (isinstance(max_per_sample, bool) or not isinstance(max_per_sample, int)
                                       or max_per_sample < 1):
        raise ValueError(f"max_per_sample must be None or an int >= 1, got {max_per_sample!r}")
    device = labels.device
    pos = torch.arange(length, device=device)
    eligible = eligible_steps(labels, attention_mask)
    n = eligible.sum(1)
    k = branch_count(n, fraction, max_per_sample)
    keys = sample_keys(seed, sample_ids, epoch, b_size, device)  # validates them in any case
    if fraction >= 1 and max_per_sample is None:
        chosen = eligible
    else:
        rel = (pos[None, :] - real_offset(attention_mask, b_size, device)[:, None]) & M32
        h = position_keys(keys, rel, STREAM_STEPS)
        prio = torch.where(eligible, uniform(h), torch.full((), 2.0, device=device))
        rank = prio.argsort(dim=1, stable=True).argsort(dim=1)
        chosen = eligible & (rank < k[:, None])
    width = int(k.max()) if b_size else 0  # host sync: the output shape
    big = torch.full((), length, device=device)
    ordered = torch.where(chosen, pos[None, :], big).sort(1).values[:, :width]
    return torch.where(ordered < length, ordered, torch.full((), -1, device=device))
