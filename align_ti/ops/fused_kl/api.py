"""The public functions: argument checks, then one custom op call (`autograd`)."""
from __future__ import annotations

import math

import torch

from align_ti.ops import heuristics as _heur
from align_ti.ops.dispatch import resolve_impl
from align_ti.ops.fused_kl import autograd as _autograd  # noqa: F401  (registers the ops)
from align_ti.ops.fused_kl.options import (
    FusedKLOptions,
    KLOptions,
    check_head,
    check_labels,
    check_logits,
    check_weights,
    resolve_vocab_size,
)
from align_ti.ops.fused_kl.rows import plan_rows
from align_ti.validation import (
    check_bool,
    check_same_device,
    describe,
    normalize_rows,
    value_checks_enabled,
)


def _needs_grad(t) -> bool:
    return t is not None and t.requires_grad and torch.is_grad_enabled()


def _detached(t):
    return None if t is None else t.detach()


def _linear(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, rows, weights,
            divergence, beta, temperature, vocab_size, reduction, student_bias, teacher_bias, impl,
            chunk_bytes, fp32_weight_grad, row_divergence=False, ce_weight=None):
    """`fused_linear_kl` and `fused_linear_distill`: (kl, ce or None, per-row D or None); with
    ``ce_weight`` c, kl is the differentiable ``kl + c * ce`` (see `fused_linear_distill`)."""
    kl_opts = KLOptions(divergence, beta, temperature, reduction)
    check_bool("fp32_weight_grad", fp32_weight_grad)
    check_head("student", student_hidden, student_weight, student_bias, None)
    n = student_hidden.shape[0]
    check_head("teacher", teacher_hidden, teacher_weight, teacher_bias, n)
    device = check_same_device({
        "student_hidden": student_hidden, "student_weight": student_weight,
        "teacher_hidden": teacher_hidden, "teacher_weight": teacher_weight,
        "student_bias": student_bias, "teacher_bias": teacher_bias,
    })
    impl = resolve_impl(impl, device)
    vs, vt = student_weight.shape[0], teacher_weight.shape[0]
    v = resolve_vocab_size(vocab_size, vs, vt)
    rows = normalize_rows(rows, n, device)
    check_weights(weights, rows, n, device)
    if labels is not None:
        check_labels(labels, rows, n, vs, device)
    plan = plan_rows(rows, weights, labels, n, device, reduction)
    opts = FusedKLOptions(kl_opts, v, impl, _heur.resolve_chunk_bytes(chunk_bytes) or 0)
    check_bool("row_divergence", row_divergence)
    if ce_weight is not None:
        ce_weight = _ce_weight(ce_weight, device)
    kl, ce, *_, row_d = torch.ops.align_ti.fused_linear_kl(
        student_hidden, student_weight, student_bias,
        teacher_hidden.detach(), teacher_weight.detach(), _detached(teacher_bias),
        plan.idx, plan.mask, plan.weights, plan.labels,
        need_dh=_needs_grad(student_hidden), need_dw=_needs_grad(student_weight),
        need_db=_needs_grad(student_bias), fp32_weight_grad=fp32_weight_grad, **opts.op_kwargs(),
        ce_weight=ce_weight,
    )
    if ce_weight is not None:
        # the sum the op's gradients are of (a weight of 0 adds 0, also where the CE is +inf)
        kl = kl + torch.where(ce_weight != 0, ce_weight * ce, torch.zeros_like(ce))
    return kl, (ce if labels is not None else None), (_rows_layout(row_d, rows, plan, n) if row_divergence else None)


def _ce_weight(value, device) -> torch.Tensor:
    """``ce_weight`` as an fp32 0-d tensor on ``device``: a number or a 0-d tensor, finite, >= 0,
    without gradient (a tensor stays on the device: no host sync)."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or not value.is_floating_point():
            raise TypeError(f"ce_weight must be a number or a 0-d float tensor, got {describe(value)}")
        if value.requires_grad:
            raise ValueError("ce_weight must not require a gradient (it weighs the CE's gradient, it gets none)")
        if value_checks_enabled() and not bool(torch.isfinite(value) & (value >= 0)):
            raise ValueError(f"ce_weight must be finite and >= 0, got {float(value)}")
        return value.to(device=device, dtype=torch.float32)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
        raise ValueError(f"ce_weight must be a finite number >= 0 or a 0-d tensor, got {value!r}")
    return torch.full((), float(value), dtype=torch.float32, device=device)


def _rows_layout(row_d, rows, plan, n: int):
    """The per-processed-row divergence in the caller's layout: [M] for index rows, [N] (0 at
    unselected rows) for None or a bool mask, whichever way the plan processed them."""
    if rows is None or rows.dtype != torch.bool:
        return row_d
    if plan.mask is not None:  # processed every row; the unselected ones on zeroed states
        return torch.where(plan.mask, row_d, torch.zeros((), dtype=row_d.dtype, device=row_d.device))
    return torch.zeros(n, dtype=row_d.dtype, device=row_d.device).index_copy_(0, plan.idx, row_d)


def fused_linear_kl(
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
    impl="auto",
    chunk_bytes=None,
    fp32_weight_grad=True,
    row_divergence=False,
):
    """Vocabulary divergence between teacher and student at selected rows, fused with both LM heads.

    With ``z_S = (h_S W_S[:V']^T + b_S[:V']) / T`` and ``z_T`` likewise (softmax over the first
    V' entries, no T^2 factor), per selected row ``D_i`` is ``"forward"`` KL(p_T || p_S),
    ``"reverse"`` KL(p_S || p_T) or ``"jsd"`` ``beta KL(p_T || M) + (1 - beta) KL(p_S || M)``,
    ``M = beta p_T + (1 - beta) p_S``. ``"none"`` returns ``w_i D_i`` ``[M]``, ``"sum"`` their
    sum, ``"mean"`` the sum over ``sum w_i`` (0, with zero gradients, when there are no rows or
    all weights are 0). Never holds ``[N, V]`` logits: one row chunk of fp32 logits at a time.

    Args:
        student_hidden, student_weight: ``[N, Hs]``, ``[Vs, Hs]``, one dtype (fp32/bf16/fp16);
            get gradients (weight rows >= V' get 0 from the divergence).
        teacher_hidden, teacher_weight: ``[N, Ht]``, ``[Vt, Ht]``, one dtype (may differ from
            the student's); never get a gradient.
        rows: None (all N rows), int64/int32 indices ``[M]`` (repeats allowed), or a bool mask
            ``[N]`` (no host sync needed from the caller).
        weights: float ``[M]`` (or ``[N]`` with a bool mask), finite, >= 0; no gradient.
        divergence: ``"forward"`` | ``"reverse"`` | ``"jsd"``; beta: ``0 < beta < 1`` (jsd).
        temperature: ``T > 0``. vocab_size: V', None = ``min(Vs, Vt)``.
        reduction: ``"mean"`` | ``"sum"`` | ``"none"``.
        student_bias, teacher_bias: optional ``[Vs]`` / ``[Vt]`` head biases.
        impl: ``"auto"`` (Triton on CUDA tensors, chunked PyTorch elsewhere), ``"triton"``
            (CUDA, or CPU under ``TRITON_INTERPRET=1``) or ``"torch"``.
        chunk_bytes: the row-chunk scratch budget, bytes or e.g. "512M" (None: the
            heuristics, ``ALIGN_TI_CHUNK_BYTES``); results do not depend on it beyond rounding.
        fp32_weight_grad: False accumulates the weight's gradient over the row chunks in its
            own dtype (one rounding per chunk, as Liger-Kernel does) instead of an fp32
            ``[Vs, Hs]`` buffer (890 MiB at Vs=151936, Hs=1536). No effect for fp32 weights.
        row_divergence: also return each row's unweighted divergence ``D_i`` (fp32, no
            gradient): ``[M]`` for index ``rows``, ``[N]`` (0 at unselected rows) for None or a
            bool mask. One call over the rows of several losses (each its own row weights) then
            still reports every loss on its own, at no extra pass.

    Returns:
        fp32 scalar, or ``[M]`` for ``reduction="none"``; with ``row_divergence``, the pair
        ``(loss, D)``.

    Gradients: for "mean"/"sum" they are computed in the forward and the backward only scales
    them in place, so a second backward through one graph raises RuntimeError (as does double
    backward); "none" and fp16 inputs (whose loss scale must reach the gradients before they are
    rounded) recompute the chunks in the backward. Teacher tensors made under
    ``torch.inference_mode()`` are fine.

    Masks: a -inf logit (e.g. in a bias) masks its column with 0 log 0 = 0: masked in both
    models it adds nothing, JSD stays finite, forward KL is +inf where the teacher allows a
    column the student masks (reverse: the mirror); a row of weight 0 adds exactly 0; where the
    loss is finite so are the gradients. NaN/inf elsewhere (a selected row's hidden states,
    the weights, a NaN or +inf bias entry below V', a row masked in every column) gives a NaN
    loss, never a wrong finite one; rows not selected never influence the result.

    Raises:
        ValueError / TypeError naming the argument: bad options (temperature, beta,
        divergence, reduction, impl, vocab_size, chunk_bytes, fp32_weight_grad), rows or
        weights of a wrong length, dtype or range (weights: a content check, see
        ``align_ti.set_value_checks``), a width or dtype mismatch within a model, tensors on
        different devices.
    """
    kl, _, row_d = _linear(
        student_hidden, student_weight, teacher_hidden, teacher_weight, None, rows, weights,
        divergence, beta, temperature, vocab_size, reduction, student_bias, teacher_bias,
        impl, chunk_bytes, fp32_weight_grad, row_divergence,
    )
    return (kl, row_d) if row_divergence else kl


def fused_linear_distill(
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
    impl="auto",
    chunk_bytes=None,
    fp32_weight_grad=True,
    row_divergence=False,
    ce_weight=None,
):
    """``(kl, ce)``: the divergence of `fused_linear_kl` and the student's SFT cross-entropy,
    from one pass over the student head.

    ``kl`` is exactly `fused_linear_kl` with the same arguments (see there for every argument
    but ``labels``). ``ce`` is the cross-entropy of the *unscaled* student logits over all Vs
    entries (temperature and V' do not apply) at the selected rows, averaged over the rows
    whose label is not -100 (``weights`` do not apply), and 0 (with zero gradients) when there
    are none; +inf when a label's column is masked (a -inf logit). Always an fp32 scalar.

    Args:
        labels: int64/int32 ``[M]`` (or ``[N]`` with a bool mask): each selected row's target
            id in ``[0, Vs)``, or -100 for no CE.

        ce_weight: a number or 0-d tensor c >= 0 (no gradient), for a caller that backpropagates
            ``kl + c * ce`` and nothing else: the op then folds the CE's gradient into the
            divergence's (one set of gradient matmuls instead of two, no separate CE
            accumulators) and returns that sum as its first output.

    Returns:
        ``(kl, ce)``: kl fp32 scalar or ``[M]`` (``reduction="none"``), ce fp32 scalar; with
        ``row_divergence``, ``(kl, ce, D)`` (see `fused_linear_kl`). With ``ce_weight`` c:
        ``(loss, ce)`` (or ``(loss, ce, D)``), ``loss = kl + c * ce`` carrying the gradient
        (0 * ce is 0, also where ce is +inf) and ce detached: backpropagate ``loss`` only.

    Gradients: for "mean"/"sum" the forward computes the gradients of kl and ce apart (their
    upstream scalars are not known yet): one more weight-gradient accumulator and two more
    gradient matmuls than `fused_linear_kl`. For "none" the backward recomputes the chunks
    with both upstream gradients.

    Raises:
        as `fused_linear_kl`, plus labels of a wrong length or dtype, or out of ``[0, Vs)``
        other than -100.
    """
    if labels is None:
        raise TypeError("labels must be an int64 tensor of target ids (-100 = no CE), got None")
    if ce_weight is not None and reduction == "none":
        raise ValueError("ce_weight needs reduction 'mean' or 'sum': the CE is a scalar, the per-row "
                         "divergences of 'none' cannot carry it")
    kl, ce, row_d = _linear(
        student_hidden, student_weight, teacher_hidden, teacher_weight, labels, rows, weights,
        divergence, beta, temperature, vocab_size, reduction, student_bias, teacher_bias,
        impl, chunk_bytes, fp32_weight_grad, row_divergence, ce_weight,
    )
    if ce_weight is not None:
        ce = ce.detach()
    return (kl, ce, row_d) if row_divergence else (kl, ce)


def fused_kl(
    student_logits,
    teacher_logits,
    rows=None,
    weights=None,
    divergence="forward",
    beta=0.5,
    temperature=1.0,
    vocab_size=None,
    reduction="mean",
    impl="auto",
    chunk_bytes=None,
):
    """Vocabulary divergence between given logits ``[N, Vs]`` and ``[N, Vt]`` at selected rows.

    For callers that already hold the logits: `fused_linear_kl`'s semantics (divergences,
    weights, reductions, masks, NaN/inf) with ``z_S = student_logits[:, :V'] / T`` and
    ``z_T = teacher_logits[:, :V'] / T``. Rows are processed in chunks with fp32 copies of the
    chunk only (the native CPU kernel reads the rows in place); the two may differ in dtype.

    Args:
        student_logits: ``[N, Vs]`` fp32/bf16/fp16; gets a gradient (0 in columns >= V').
        teacher_logits: ``[N, Vt]``; never gets a gradient.
        rows, weights, divergence, beta, temperature, vocab_size, reduction, impl,
        chunk_bytes: as `fused_linear_kl`.

    Returns:
        fp32 scalar, or ``[M]`` for ``reduction="none"``.

    Gradients: as `fused_linear_kl`; for "mean"/"sum" the forward computes the ``[N, Vs]``
    gradient (in the logits' dtype) that the backward scales.

    Raises:
        ValueError / TypeError naming the argument, as `fused_linear_kl`.
    """
    kl_opts = KLOptions(divergence, beta, temperature, reduction)
    check_logits(student_logits, teacher_logits)
    n = student_logits.shape[0]
    device = student_logits.device
    impl = resolve_impl(impl, device)
    v = resolve_vocab_size(vocab_size, student_logits.shape[1], teacher_logits.shape[1])
    rows = normalize_rows(rows, n, device)
    check_weights(weights, rows, n, device)
    plan = plan_rows(rows, weights, None, n, device, reduction)
    opts = FusedKLOptions(kl_opts, v, impl, _heur.resolve_chunk_bytes(chunk_bytes) or 0)
    loss, _ = torch.ops.align_ti.fused_kl(
        student_logits, teacher_logits.detach(), plan.idx, plan.mask, plan.weights,
        need_grad=_needs_grad(student_logits), **opts.op_kwargs(),
    )
    return loss
