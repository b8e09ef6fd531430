"""The public `topk_align`: argument checks, then one `align_ti::topk_align` op call."""
from __future__ import annotations

import torch

from align_ti.ops import heuristics as _heur
from align_ti.ops._autograd import grads_in_forward
from align_ti.ops.dispatch import resolve_impl
from align_ti.ops.fused_kl.options import FusedKLOptions, KLOptions, check_head, resolve_vocab_size
from align_ti.ops.topk_align import autograd as _autograd  # noqa: F401  (registers the ops)
from align_ti.ops.topk_align.selection import NORMALIZE, check_selection_args
from align_ti.validation import check_bool, check_choice, check_same_device, check_tensor


def check_sequence_inputs(student_hidden, teacher_hidden, mass, vision_mask) -> None:
    """Hidden states [B, L, H] of both models with the [B, L] of mass and vision_mask."""
    check_tensor("student_hidden", student_hidden, ndim=3, floating=True)
    check_tensor("teacher_hidden", teacher_hidden, ndim=3, floating=True)
    if teacher_hidden.shape[:2] != student_hidden.shape[:2]:
        raise ValueError(
            "teacher_hidden must have the [B, L] of student_hidden: got "
            f"{list(teacher_hidden.shape)} vs {list(student_hidden.shape)}"
        )
    check_tensor("mass", mass, ndim=2, floating=True)
    if mass.shape != student_hidden.shape[:2]:
        raise ValueError(
            f"mass must be [B, L] = {list(student_hidden.shape[:2])} (the first two dims of "
            f"student_hidden), got {list(mass.shape)}"
        )
    check_tensor("vision_mask", vision_mask, ndim=2, dtypes=(torch.bool,))
    if vision_mask.shape != mass.shape:
        raise ValueError(
            f"vision_mask must have the shape of mass: got {list(vision_mask.shape)} vs {list(mass.shape)}"
        )


def _needs_grad(t) -> bool:
    return t is not None and t.requires_grad and torch.is_grad_enabled()


def topk_align(
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
    impl="auto",
    chunk_bytes=None,
    fp32_weight_grad=True,
):
    """The IVA loss: vocabulary divergence between teacher and student at the vision tokens
    selected by the teacher's instruction->vision attention mass, weighted by that mass.

    Per sample b, `select_topk` keeps the top-k vision tokens S_b by ``mass`` (``k`` tokens,
    ``ceil(ratio * Nv_b)``, or all: the default) with weights ``w_j = mass_j / sum_{S_b} mass``.
    At each kept position j, ``D_j`` is the divergence of `fused_linear_kl` between the two LM
    heads' softmaxes (first V' entries, temperature T, no T^2 factor). The loss is

    - ``normalize="sample"`` (default): ``(1 / S) sum_b sum_{j in S_b} w_j D_j``, S = the number
      of samples that contribute (vision tokens with positive kept mass): each sample weighs
      the same, and within a sample each token weighs its share of the mass (METHOD.md's
      L_IVA, averaged over samples);
    - ``normalize="token"``: ``sum_b n_b sum_j w_j D_j / sum_b n_b`` with n_b = |S_b|: each
      sample weighs its number of kept tokens.

    It is 0 (with zero gradients) when no sample contributes (no image in the batch, or all
    kept mass 0). Positions outside the selection never influence the result, whatever their
    hidden states hold. Logits are never held for more than one row chunk.

    Args:
        student_hidden: ``[B, L, Hs]`` fp32/bf16/fp16, the student's final hidden states (the
            LM-head input); gets a gradient.
        student_weight: ``[Vs, Hs]`` student LM head, same dtype; gets a gradient.
        teacher_hidden, teacher_weight: ``[B, L, Ht]``, ``[Vt, Ht]`` (one dtype, may differ
            from the student's); never get a gradient.
        mass: float ``[B, L]``, the teacher's instruction->vision attention mass at the IRS
            layer (`align_ti.attention_mass`); finite and >= 0 at vision tokens (the only
            entries read), no gradient.
        vision_mask: bool ``[B, L]``, True at vision tokens (padding False).
        k: tokens kept per sample (positive int, clamped to the sample's vision tokens), or
        ratio: fraction of each sample's vision tokens in ``(0, 1]`` (``ceil``); neither = all.
        normalize: ``"sample"`` (default) | ``"token"``, see above.
        divergence, beta, temperature, vocab_size, student_bias, teacher_bias, chunk_bytes,
        fp32_weight_grad: as `fused_linear_kl`.
        impl: ``"auto"`` and ``"torch"``: `fused_linear_kl` on the selected rows with that impl;
            ``"triton"``: the row gather fused into Triton matmul kernels (CUDA, or CPU under
            ``TRITON_INTERPRET=1``; slower than "auto" on an H100, see
            ``align_ti.ops.topk_align.gather``).

    Returns:
        fp32 scalar.

    Cost: the selection runs on the device; reading the number of kept rows is the one host
    sync (free on CPU). Work: each head's matmul over the kept rows plus the two gradient
    matmuls; the gradients are computed in the forward (fp16: recomputed in the backward,
    after a loss scale), so a second backward through one graph is refused. One op
    (``align_ti::topk_align``): torch.compile traces through it.

    Masks and NaN/inf: as `fused_linear_kl` (a kept token of weight 0 adds 0 even where its
    divergence is +inf; NaN in a selected row gives a NaN loss).

    Raises:
        ValueError / TypeError naming the argument: k, ratio, normalize, mass or vision_mask
        (shape, dtype, device; NaN, inf or negative mass at a vision token: a content check,
        see `align_ti.set_value_checks`), hidden states that are not [B, L, H] or disagree in
        [B, L], and every error of `fused_linear_kl`.
    """
    check_sequence_inputs(student_hidden, teacher_hidden, mass, vision_mask)
    check_choice("normalize", normalize, NORMALIZE)
    kl_opts = KLOptions(divergence, beta, temperature, "mean")
    b_size, length, hs_width = student_hidden.shape
    n = b_size * length
    check_head("student", student_hidden.reshape(n, hs_width), student_weight, student_bias, None)
    check_head("teacher", teacher_hidden.reshape(n, teacher_hidden.shape[2]), teacher_weight,
               teacher_bias, n)
    device = check_same_device({
        "student_hidden": student_hidden, "student_weight": student_weight,
        "teacher_hidden": teacher_hidden, "teacher_weight": teacher_weight,
        "student_bias": student_bias, "teacher_bias": teacher_bias,
        "mass": mass, "vision_mask": vision_mask,
    })
    check_selection_args(mass, vision_mask, k, ratio)
    check_bool("fp32_weight_grad", fp32_weight_grad)
    chunk_impl = resolve_impl(impl, device)
    v = resolve_vocab_size(vocab_size, student_weight.shape[0], teacher_weight.shape[0])
    # the gather kernels compute the gradients in the forward: fp16 takes fused_linear_kl's
    # path, whose backward applies the upstream gradient (a loss scale) before rounding
    gather = impl == "triton" and grads_in_forward("mean", student_hidden.dtype)
    opts = FusedKLOptions(kl_opts, v, chunk_impl, _heur.resolve_chunk_bytes(chunk_bytes) or 0)
    loss, *_ = torch.ops.align_ti.topk_align(
        student_hidden, student_weight, student_bias, teacher_hidden.detach(),
        teacher_weight.detach(), None if teacher_bias is None else teacher_bias.detach(),
        mass.detach(), vision_mask, k=k, ratio=None if ratio is None else float(ratio),
        normalize=normalize, need_dh=_needs_grad(student_hidden),
        need_dw=_needs_grad(student_weight), need_db=_needs_grad(student_bias),
        fp32_weight_grad=fp32_weight_grad, gather=gather, **opts.op_kwargs(),
    )
    return loss
