"""fp32 plain-PyTorch definition of IVA's visual-token selection (the test oracle).

Per sample b, among its vision tokens (vision_mask[b] True):
- k tokens are kept: `k` as a count, or `ceil(ratio * Nv_b)` (so a sample with vision tokens
  keeps at least one); neither given = all of them. k above Nv_b is clamped to Nv_b.
- the kept tokens are those with the largest mass; ties go to the lower position.
- their weights are the mass renormalised within the sample: w_j / sum_{i in S_b} w_i.
  A sample whose kept mass sums to 0 (e.g. it had no instruction query) gets weight 0 on
  every kept token: it contributes nothing, never NaN.
- samples without vision tokens contribute no rows.
Output: flat row indices into B*L (int64, sample-major, ascending position within a sample)
and fp32 weights of the same length.

Plain definitions that check no argument (the checks live with the ops, align_ti.ops.topk_align):
this module imports only torch and the fused KL reference. `kept_count` is a twin of the ops'
own on purpose: an oracle shares no code with what it checks.
"""
from __future__ import annotations

import math

import torch

from align_ti.reference.fused_kl import fused_linear_kl_reference


def kept_count(num_vision: int, k: int | None, ratio: float | None) -> int:
    """How many of a sample's num_vision tokens are kept."""
    if k is not None:
        return min(k, num_vision)
    if ratio is not None:
        return min(num_vision, math.ceil(ratio * num_vision - 1e-9))
    return num_vision


def select_topk_reference(mass, vision_mask, k=None, ratio=None):
    """-> (rows int64 [M] into B*L, weights fp32 [M]); see the module docstring."""
    b_size, length = mass.shape
    rows, weights = [], []
    for b in range(b_size):
        positions = vision_mask[b].nonzero().flatten().tolist()
        n_keep = kept_count(len(positions), k, ratio)
        if n_keep == 0:
            continue
        values = mass[b].float()
        # Largest mass first; among equal mass, the lower position first.
        ranked = sorted(positions, key=lambda j: (-values[j].item(), j))
        kept = sorted(ranked[:n_keep])
        w = values[kept]
        total = w.sum()
        w = w / total if total > 0 else torch.zeros_like(w)
        rows.extend(b * length + j for j in kept)
        weights.append(w)
    rows_t = torch.tensor(rows, dtype=torch.long, device=mass.device)
    weights_t = torch.cat(weights) if weights else torch.zeros(0, device=mass.device)
    return rows_t, weights_t


def topk_align_reference(
    student_hidden,
    student_weight,
    teacher_hidden,
    teacher_weight,
    mass,
    vision_mask,
    k=None,
    ratio=None,
    normalize="sample",
    divergence="forward",
    beta=0.5,
    temperature=1.0,
    vocab_size=None,
    student_bias=None,
    teacher_bias=None,
):
    """The IVA loss by definition: `select_topk_reference`, then `fused_linear_kl_reference`
    ("mean") on the flattened [B*L, H] hidden states at the selected rows with the selection
    weights; normalize="token" first scales each sample's weights by its kept-token count."""
    b_size, length = mass.shape
    rows, weights = select_topk_reference(mass.detach(), vision_mask, k=k, ratio=ratio)
    if normalize == "token" and rows.numel():
        sample = rows // length
        counts = torch.bincount(sample, minlength=b_size).float()
        weights = weights * counts[sample]
    return fused_linear_kl_reference(
        student_hidden.reshape(b_size * length, -1), student_weight,
        teacher_hidden.reshape(b_size * length, -1), teacher_weight,
        rows=rows, weights=weights, divergence=divergence, beta=beta, temperature=temperature,
        vocab_size=vocab_size, reduction="mean", student_bias=student_bias,
        teacher_bias=teacher_bias,
    )
