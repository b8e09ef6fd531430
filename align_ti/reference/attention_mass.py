"""Plain-PyTorch fp32 definitions of the attention-mass op and of IRS: the test oracle.

Simple and obviously correct, not fast: the full ``[B, Hq, L, L]`` probability tensor is
materialised. A leaf: imports only torch, checks no argument (the ops and align_ti.models.irs
do), and keeps its own plain copy of the IRS maths that align_ti.models.irs also computes. Everything here is differentiable by plain autograd
(except the argmax helper), so gradient tests can use it as their oracle.

Numerics: inputs in fp16 / bf16 / fp32 are computed and returned in fp32. fp64 inputs are
computed and returned in fp64 (an extension of the fp32 contract so that
``torch.autograd.gradcheck`` can use the oracle).

Contents
--------
- ``attention_mass_reference``: DESIGN.md ``attention_mass`` (without the ``lse`` shortcut).
- ``select_vision_mass``: restrict per-sample masses to their own vision-token positions.
- ``irs_reference``: IRS(l) = 1 - mean over pairs of cos(alpha_l(x1), alpha_l(x2)), on
  vision-restricted masses ``[num_layers, P, Nv]``.
- ``irs_from_mass_reference``: the same from full-length masses plus vision masks.
- ``irs_argmax``: the chosen layer ``l* = argmax_l IRS(l)``.
"""
from __future__ import annotations

import torch


__all__ = [
    "attention_mass_reference",
    "select_vision_mass",
    "irs_reference",
    "irs_from_mass_reference",
    "irs_argmax",
]



def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp16/bf16/fp32, fp64 for fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------
# attention mass
# --------------------------------------------------------------------------------------


def attention_mass_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    query_mask: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    scale: float | None = None,
    average_heads: bool = True,
) -> torch.Tensor:
    """Instruction->key attention mass, exactly as DESIGN.md defines ``attention_mass``.

    Args:
        q: ``[B, Hq, L, D]`` post-RoPE queries (fp16 / bf16 / fp32 / fp64).
        k: ``[B, Hkv, L, D]`` post-RoPE keys, same dtype and device as ``q``; ``Hq`` must be
            a multiple of ``Hkv`` and query head ``h`` uses key head ``h // (Hq // Hkv)``.
        query_mask: bool ``[B, L]``: the queries to average over (instruction tokens).
        attention_mask: ``[B, L]`` bool or integer 0/1, 1 = real token; None = all real.
        scale: softmax scale, a number > 0; None = ``D ** -0.5``.
        average_heads: True -> ``[B, L]``; False -> ``[B, Hq, L]``.

    Semantics:
        Selected queries are ``query_mask & attention_mask`` (a padding token is never a
        selected query, even when ``query_mask`` marks it). Query ``i`` attends to keys
        ``j <= i`` with ``attention_mask[j] == 1``, and
        ``P[h, i, j] = softmax_j(scale * q_i . k_j)`` over those keys (fp32 logits).
        ``mass[b, h, j] = mean over selected i of P[h, i, j]``; then mean over heads.
        A sample with no selected query gets zeros. Padding keys, and keys after the last
        selected query, get exactly zero mass. A selected query always sees itself, so
        no NaN arises.

    Returns:
        fp32 ``[B, L]`` (or ``[B, Hq, L]``); fp64 when ``q`` is fp64. Differentiable in
        ``q`` and ``k``.
    """
    B, Hq, L, D = q.shape
    scale = D**-0.5 if scale is None else scale  # the op checks its arguments; an oracle does not
    Hkv = k.shape[1]

    cdt = _compute_dtype(q.dtype)
    device = q.device
    if attention_mask is None:
        real = torch.ones(B, L, dtype=torch.bool, device=device)
    else:
        real = attention_mask != 0  # [B, L]
    selected = query_mask & real  # [B, L]

    group = Hq // Hkv
    kx = k.to(cdt).repeat_interleave(group, dim=1)  # [B, Hq, L, D]; head h -> h // group
    logits = scale * torch.matmul(q.to(cdt), kx.transpose(-1, -2))  # [B, Hq, L(i), L(j)]

    causal = torch.ones(L, L, dtype=torch.bool, device=device).tril()  # j <= i
    allowed = causal[None, :, :] & real[:, None, :]  # [B, L(i), L(j)]
    # Rows with no allowed key (padding queries before the first real token) are never
    # selected; give them finite logits so that softmax stays NaN-free, then drop them.
    row_ok = allowed.any(dim=-1)  # [B, L(i)]
    neg_inf = torch.tensor(float("-inf"), dtype=cdt, device=device)
    zero = torch.tensor(0.0, dtype=cdt, device=device)
    logits = torch.where(allowed[:, None], logits, neg_inf)
    logits = torch.where(row_ok[:, None, :, None], logits, zero)
    probs = torch.softmax(logits, dim=-1)  # [B, Hq, L, L]

    keep = (selected & row_ok).to(cdt)  # [B, L(i)]; selected implies row_ok
    probs = probs * keep[:, None, :, None]
    n_sel = keep.sum(dim=-1).clamp(min=1.0)  # [B]
    mass = probs.sum(dim=2) / n_sel[:, None, None]  # [B, Hq, L(j)]
    if average_heads:
        mass = mass.mean(dim=1)
    return mass


# --------------------------------------------------------------------------------------
# IRS
# --------------------------------------------------------------------------------------


def select_vision_mass(mass: torch.Tensor, vision_mask: torch.Tensor) -> torch.Tensor:
    """Restrict each sample's mass ``[..., B, L]`` to its own vision-token positions, in order:
    ``[..., B, Nv]`` (every sample of the bool ``vision_mask [B, L]`` marks the same Nv)."""
    B = vision_mask.shape[0]
    rows = [mass[..., b, vision_mask[b]] for b in range(B)]  # each [..., Nv]
    return torch.stack(rows, dim=-2)


def irs_reference(alpha_1: torch.Tensor, alpha_2: torch.Tensor) -> torch.Tensor:
    """Instruction relevance score of every layer (METHOD.md, Definition 3.1).

    Args:
        alpha_1: ``[num_layers, P, Nv]``: layer l's vision-restricted attention mass for
            the first sample x1 of each of P pairs (see ``select_vision_mass``).
        alpha_2: ``[num_layers, P, Nv]``: the same for the second sample x2 (same image,
            another instruction). A ``[P, Nv]`` input on both sides is read as one layer.

    Returns:
        ``[num_layers]`` (or a 0-d tensor for 2-D input):
        ``IRS(l) = 1 - mean_p cos(alpha_1[l, p], alpha_2[l, p])``, computed in fp64 and
        returned in fp32 (fp64 for fp64 input).

    Zero-vector rule: cos(a, b) is 0 when ``|a| * |b| == 0`` (a sample with no selected query
    has an all-zero mass), so such a pair contributes 1 to the mean. Cosine is exactly
    ``a . b / (|a| |b|)``, with no eps clamp.
    """
    out_dtype = _compute_dtype(torch.promote_types(alpha_1.dtype, alpha_2.dtype))
    a = alpha_1.to(torch.float64)
    b = alpha_2.to(torch.float64)
    cos = []
    for x, y in zip(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])):
        norms = x.norm() * y.norm()
        cos.append(torch.dot(x, y) / norms if norms > 0 else torch.zeros((), dtype=torch.float64))
    cos = torch.stack(cos).reshape(a.shape[:-1])
    return (1.0 - cos.mean(dim=-1)).to(out_dtype)


def irs_from_mass_reference(
    mass_1: torch.Tensor,
    mass_2: torch.Tensor,
    vision_mask_1: torch.Tensor,
    vision_mask_2: torch.Tensor,
) -> torch.Tensor:
    """IRS per layer from full-length masses of the two sides of each pair: ``mass_1``
    ``[num_layers, P, L1]`` and ``mass_2`` ``[num_layers, P, L2]`` (``[P, L]`` for one layer),
    each restricted to its own side's vision positions (bool ``[P, L1]``, ``[P, L2]``)."""
    return irs_reference(select_vision_mass(mass_1, vision_mask_1), select_vision_mass(mass_2, vision_mask_2))


def irs_argmax(scores: torch.Tensor) -> int:
    """The chosen layer ``l* = argmax_l IRS(l)``; ties go to the lowest layer index."""
    values = scores.tolist()
    return values.index(max(values))
