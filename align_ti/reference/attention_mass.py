"""Plain-PyTorch fp32 definitions of the attention-mass op and of IRS: the test oracle.

Simple and obviously correct, not fast: the full ``[B, Hq, L, L]`` probability tensor is
materialised. Never imports triton. Everything here is differentiable by plain autograd
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

from align_ti.validation import (
    check_dim,
    check_same_device,
    check_same_shape,
    check_tensor,
    describe,
    value_checks_enabled,
)

__all__ = [
    "attention_mass_reference",
    "select_vision_mass",
    "irs_reference",
    "irs_from_mass_reference",
    "irs_argmax",
]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


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
    """Restrict each sample's mass to its own vision-token positions, in order.

    Args:
        mass: ``[..., B, L]`` (e.g. ``[num_layers, B, L]``) masses from
            ``attention_mass_reference``.
        vision_mask: bool ``[B, L]``: vision-token positions of each sample. Every sample
            must hold the same number ``Nv >= 1`` of vision tokens (positions may differ).

    Returns:
        ``[..., B, Nv]``: ``out[..., b, n]`` is the mass at sample b's n-th vision token.
    """
    return _select_vision_mass(mass, vision_mask, "mass", "vision_mask")


def _select_vision_mass(mass, vision_mask, mass_name: str, mask_name: str) -> torch.Tensor:
    check_tensor(mass_name, mass, dtypes=_FLOAT_DTYPES)
    if mass.dim() < 2:
        raise ValueError(f"{mass_name} must be at least 2-D [..., B, L], got shape {list(mass.shape)}")
    check_tensor(mask_name, vision_mask, ndim=2, dtypes=(torch.bool,))
    B, L = mass.shape[-2], mass.shape[-1]
    check_dim(mask_name, vision_mask, 0, B, f"the batch size of {mass_name} (dim -2)")
    check_dim(mask_name, vision_mask, 1, L, f"the sequence length of {mass_name} (dim -1)")
    check_same_device({mass_name: mass, mask_name: vision_mask})
    if B == 0:
        raise ValueError(f"{mass_name} holds no sample (B = 0, shape {list(mass.shape)})")
    counts = vision_mask.sum(dim=1)
    # A shape decision, so it must look at the contents whatever the value-check setting.
    if bool((counts != counts[0]).any()):
        raise ValueError(
            f"{mask_name} must mark the same number of vision tokens in every sample, "
            f"got counts {counts.tolist()}"
        )
    nv = int(counts[0])
    if nv == 0:
        raise ValueError(f"{mask_name} marks no vision token (Nv = 0): IRS is undefined")
    # Sort positions by (not vision, position): the vision positions come first, in order.
    pos = torch.arange(L, device=mass.device)
    order = torch.argsort((~vision_mask).to(torch.int64) * L + pos, dim=1)
    idx = order[:, :nv].expand(*mass.shape[:-2], B, nv)  # [..., B, Nv]
    return torch.gather(mass, -1, idx)


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
        returned in fp32 (fp64 for fp64 input). Lies in [0, 2]; in [0, 1] for
        non-negative masses.

    Zero-vector rule: cos(a, b) is defined as 0 when ``|a| * |b| == 0`` (a sample with no
    selected query has an all-zero mass), so such a pair contributes 1 to the mean; no NaN.
    Cosine is computed exactly as ``a . b / (|a| |b|)``, with no eps clamp, so it is
    invariant to scaling either vector by any positive factor.

    Raises ValueError for P == 0, Nv == 0, mismatched shapes, or NaN / inf entries.
    """
    check_tensor("alpha_1", alpha_1, ndim=(2, 3), dtypes=_FLOAT_DTYPES)
    check_tensor("alpha_2", alpha_2, ndim=(2, 3), dtypes=_FLOAT_DTYPES)
    check_same_shape("alpha_2", alpha_2, "alpha_1", alpha_1)
    check_same_device({"alpha_1": alpha_1, "alpha_2": alpha_2})
    if alpha_1.shape[-2] == 0:
        raise ValueError(f"alpha_1 holds no pair (P = 0, shape {list(alpha_1.shape)}): IRS is undefined")
    if alpha_1.shape[-1] == 0:
        raise ValueError(f"alpha_1 holds no vision token (Nv = 0, shape {list(alpha_1.shape)}): IRS is undefined")
    if value_checks_enabled():
        for name, t in (("alpha_1", alpha_1), ("alpha_2", alpha_2)):
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name} must be finite; it holds NaN or inf ({describe(t)})")

    out_dtype = _compute_dtype(torch.promote_types(alpha_1.dtype, alpha_2.dtype))
    a = alpha_1.to(torch.float64)
    b = alpha_2.to(torch.float64)
    dot = (a * b).sum(dim=-1)
    denom = a.norm(dim=-1) * b.norm(dim=-1)
    nonzero = denom > 0
    cos = torch.where(nonzero, dot / torch.where(nonzero, denom, torch.ones_like(denom)), torch.zeros_like(dot))
    return (1.0 - cos.mean(dim=-1)).to(out_dtype)


def irs_from_mass_reference(
    mass_1: torch.Tensor,
    mass_2: torch.Tensor,
    vision_mask_1: torch.Tensor,
    vision_mask_2: torch.Tensor,
) -> torch.Tensor:
    """IRS per layer from full-length masses of the two sides of each pair.

    Args:
        mass_1: ``[num_layers, P, L1]``: masses of the first samples (row p of every layer
            is pair p); ``[P, L1]`` for one layer.
        mass_2: ``[num_layers, P, L2]``: masses of the second samples; ``L2`` may differ
            from ``L1`` (different instruction lengths).
        vision_mask_1: bool ``[P, L1]``; vision_mask_2: bool ``[P, L2]``. Each side is
            restricted to its own vision positions in order; every sample on both sides must
            hold the same number of vision tokens.

    Returns: ``irs_reference`` of the restricted masses (``[num_layers]`` fp32).
    """
    check_tensor("mass_1", mass_1, ndim=(2, 3), dtypes=_FLOAT_DTYPES)
    check_tensor("mass_2", mass_2, ndim=(2, 3), dtypes=_FLOAT_DTYPES)
    if mass_1.dim() != mass_2.dim() or mass_1.shape[:-1] != mass_2.shape[:-1]:
        raise ValueError(
            "mass_1 and mass_2 must agree in every dim but the last (layers, pairs): got "
            f"{list(mass_1.shape)} vs {list(mass_2.shape)}"
        )
    a1 = _select_vision_mass(mass_1, vision_mask_1, "mass_1", "vision_mask_1")
    a2 = _select_vision_mass(mass_2, vision_mask_2, "mass_2", "vision_mask_2")
    if a1.shape[-1] != a2.shape[-1]:
        raise ValueError(
            "vision_mask_1 and vision_mask_2 must mark the same number of vision tokens "
            f"(the pair shares an image): got {a1.shape[-1]} vs {a2.shape[-1]}"
        )
    return irs_reference(a1, a2)


def irs_argmax(scores: torch.Tensor) -> int:
    """The chosen layer ``l* = argmax_l IRS(l)``; ties go to the lowest layer index.

    Args:
        scores: ``[num_layers]`` IRS scores (``irs_reference``), finite, num_layers >= 1.
    """
    check_tensor("scores", scores, ndim=1, dtypes=_FLOAT_DTYPES)
    if scores.numel() == 0:
        raise ValueError("scores is empty: no layer to choose")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError(f"scores must be finite; it holds NaN or inf ({describe(scores)})")
    best = scores.max()
    return int(torch.nonzero(scores == best)[0, 0])
