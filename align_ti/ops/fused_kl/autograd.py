"""The fused KL's torch.library custom ops and their autograd formulas.

`align_ti::fused_linear_kl` (hidden states in) and `align_ti::fused_kl` (logits in), each with
a backward op, fake implementations and `register_autograd`, so `torch.compile(fullgraph=True)`
traces a function calling them without a graph break.

Gradients (`_autograd.grads_in_forward`): for a scalar loss the forward computes them for a unit
upstream gradient and the backward scales them in place; for reduction="none" and fp16 the
forward computes only the losses and the backward op recomputes the chunks with the upstream
gradient. Every op takes its tensors, then its flags, then `FusedKLOptions.op_kwargs()`.
"""
from __future__ import annotations

from typing import Optional

import torch

from align_ti.ops._autograd import (
    consume_saved_gradients,
    grads_in_forward,
    refuse_double_backward,
    save_inputs,
    saved_inputs,
    scale_,
    without_autocast,
)
from align_ti.ops.fused_kl.driver import GradRequest, Head, linear_driver, logits_driver
from align_ti.ops.fused_kl.matmuls import StudentGrads
from align_ti.ops.fused_kl.options import FusedKLOptions
from align_ti.ops.fused_kl.rows import RowPlan

_F32 = torch.float32
_LINEAR_TENSORS = 10  # hs, ws, bs, ht, wt, bt, idx, mask, w, labels
_LOGITS_TENSORS = 5   # zs, zt, idx, mask, w


def _empty(device) -> torch.Tensor:
    return torch.zeros(0, dtype=_F32, device=device)


def fake_grads(hs, ws, bs, needed) -> list:
    """Fake (dh, dw, db): the shape and dtype of what each is the gradient of where needed (a
    bias only where there is one), else an empty fp32 tensor."""
    return [like.new_empty(like.shape) if (need and like is not None) else hs.new_empty((0,), dtype=_F32)
            for need, like in zip(needed, (hs, ws, bs))]


def _cast(grads: StudentGrads, hs, ws, bs) -> list:
    """The accumulators in the dtypes of what they are the gradients of; empty where absent."""
    device = hs.device
    return [_empty(device) if g is None else g.to(like.dtype)
            for g, like in zip(grads, (hs, ws, bs))]


# --------------------------------------------------------------------------------------------
# fused with both LM heads
# --------------------------------------------------------------------------------------------

def _heads_and_rows(hs, ws, bs, ht, wt, bt, idx, mask, w, labels):
    return Head(hs, ws, bs), Head(ht, wt, bt), RowPlan(idx, mask, w, labels)


@torch.library.custom_op("align_ti::fused_linear_kl", mutates_args=())
@without_autocast
def _fused_linear_kl_op(
    hs: torch.Tensor, ws: torch.Tensor, bs: Optional[torch.Tensor],
    ht: torch.Tensor, wt: torch.Tensor, bt: Optional[torch.Tensor],
    idx: Optional[torch.Tensor], mask: Optional[torch.Tensor],
    w: Optional[torch.Tensor], labels: Optional[torch.Tensor],
    need_dh: bool, need_dw: bool, need_db: bool, fp32_weight_grad: bool,
    divergence: str, beta: float, temperature: float, reduction: str, vocab_size: int,
    impl: str, chunk_bytes: int, ce_weight: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(kl, ce, dh, dw, db, dh_ce, dw_ce, db_ce, row_d). The gradients (for a unit upstream
    gradient of kl, and of ce apart when labels are given) are computed only for scalar
    reductions and only where need_* is set; otherwise they are empty. With ``ce_weight`` (an
    fp32 0-d tensor c) the CE's gradient is folded into the divergence's: dh, dw, db are those
    of ``kl + c * ce`` and the CE's own are empty (the caller backpropagates exactly that sum:
    `api.fused_linear_distill`'s ce_weight). row_d: the unweighted divergence D_i of every
    processed row (M with idx, else N; no gradient)."""
    opts = FusedKLOptions.from_op_args(divergence, beta, temperature, reduction, vocab_size, impl,
                                       chunk_bytes)
    in_fwd = grads_in_forward(reduction, hs.dtype)
    folded = ce_weight is not None and labels is not None
    want = GradRequest(need_dh and in_fwd, need_dw and in_fwd, need_db and in_fwd,
                       split_ce=not folded, grad_ce=ce_weight if folded else None,
                       fp32_weight_grad=fp32_weight_grad)
    res = linear_driver(*_heads_and_rows(hs, ws, bs, ht, wt, bt, idx, mask, w, labels), opts, want)
    out = [res.kl, res.ce if res.ce is not None else torch.zeros((), dtype=_F32, device=hs.device)]
    for grads in (res.grads, res.grads_ce):
        out += _cast(grads or StudentGrads(), hs, ws, bs)
    # with reduction="none" and no weights, kl *is* the per-row divergence: a copy, not an alias
    out.append(res.row_d.clone() if reduction == "none" else res.row_d)
    # every output must be its own tensor for torch.library
    return tuple(t.clone() if t.numel() == 0 else t for t in out)


@_fused_linear_kl_op.register_fake
def _(hs, ws, bs, ht, wt, bt, idx, mask, w, labels, need_dh, need_dw, need_db, fp32_weight_grad,
      divergence, beta, temperature, reduction, vocab_size, impl, chunk_bytes, ce_weight=None):
    m = hs.shape[0] if idx is None else idx.shape[0]
    kl = hs.new_empty((m,) if reduction == "none" else (), dtype=_F32)
    ce = hs.new_empty((), dtype=_F32)

    in_fwd = grads_in_forward(reduction, hs.dtype)
    needed = (need_dh and in_fwd, need_dw and in_fwd, need_db and in_fwd)
    needed_ce = needed if (labels is not None and ce_weight is None) else (False,) * 3  # the CE's apart
    row_d = hs.new_empty((m,), dtype=_F32)
    return (kl, ce, *fake_grads(hs, ws, bs, needed), *fake_grads(hs, ws, bs, needed_ce), row_d)


@torch.library.custom_op("align_ti::fused_linear_kl_backward", mutates_args=())
@without_autocast
def _fused_linear_kl_backward_op(
    grad_kl: torch.Tensor, grad_ce: Optional[torch.Tensor],
    hs: torch.Tensor, ws: torch.Tensor, bs: Optional[torch.Tensor],
    ht: torch.Tensor, wt: torch.Tensor, bt: Optional[torch.Tensor],
    idx: Optional[torch.Tensor], mask: Optional[torch.Tensor],
    w: Optional[torch.Tensor], labels: Optional[torch.Tensor],
    need_dh: bool, need_dw: bool, need_db: bool, fp32_weight_grad: bool,
    divergence: str, beta: float, temperature: float, reduction: str, vocab_size: int,
    impl: str, chunk_bytes: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Recompute the chunks with the given upstream gradients: (dh, dw, db), empty where not
    needed."""
    opts = FusedKLOptions.from_op_args(divergence, beta, temperature, reduction, vocab_size, impl,
                                       chunk_bytes)
    want = GradRequest(need_dh, need_dw, need_db, split_ce=False, grad_kl=grad_kl, grad_ce=grad_ce,
                       fp32_weight_grad=fp32_weight_grad)
    res = linear_driver(*_heads_and_rows(hs, ws, bs, ht, wt, bt, idx, mask, w, labels), opts, want)
    return tuple(_cast(res.grads or StudentGrads(), hs, ws, bs))


@_fused_linear_kl_backward_op.register_fake
def _(grad_kl, grad_ce, hs, ws, bs, ht, wt, bt, idx, mask, w, labels, need_dh, need_dw, need_db,
      *options):
    return tuple(fake_grads(hs, ws, bs, (need_dh, need_dw, need_db)))


def _linear_setup_context(ctx, inputs, output):
    # the tensors, then the flags and options the backward op takes too (not ce_weight, last)
    tensors, flags = inputs[:_LINEAR_TENSORS], inputs[_LINEAR_TENSORS:-1]
    need_dh, need_dw, need_db = flags[:3]
    ctx.flags, ctx.n_inputs = flags, len(inputs)
    ctx.needed = (need_dh, need_dw, need_db and tensors[2] is not None)
    ctx.has_labels = tensors[9] is not None
    ctx.mark_non_differentiable(*output[2:])
    # The gradient outputs get no upstream gradient; without this autograd would hand the
    # backward zero tensors of their shapes ([Vs, Hs] among them: a fill and an allocation the
    # size of the weight gradient, 45 ms on the CPU target shape). The backward handles None.
    ctx.set_materialize_grads(False)
    ctx.saved_mode = grads_in_forward(FusedKLOptions.from_op_args(*flags[4:]).kl.reduction,
                                      tensors[0].dtype)
    if ctx.saved_mode:
        ctx.save_for_backward(*output[2:8])  # the gradients; not row_d
    else:
        save_inputs(ctx, tensors)


def _linear_backward(ctx, grad_kl, grad_ce, *_unused):
    refuse_double_backward("fused_linear_kl")
    if ctx.saved_mode:
        consume_saved_gradients(ctx, "fused_linear_kl")
        saved = ctx.saved_tensors
        out = []
        # by the flags, not by numel: with N = 0 rows dh is [0, Hs], a real (empty) gradient
        for g, g_ce, need in zip(saved[:3], saved[3:], ctx.needed):
            if not need:
                out.append(None)
                continue
            res = scale_(g, grad_kl)
            if g_ce.numel() and grad_ce is not None:
                res.add_(scale_(g_ce, grad_ce))
            out.append(res)
    else:
        tensors = saved_inputs(ctx)
        hs, idx = tensors[0], tensors[6]
        reduction = FusedKLOptions.from_op_args(*ctx.flags[4:]).kl.reduction
        if grad_kl is None:
            m = hs.shape[0] if idx is None else idx.shape[0]
            grad_kl = torch.zeros((m,) if reduction == "none" else (), dtype=_F32, device=hs.device)
        if ctx.has_labels and grad_ce is None:
            grad_ce = torch.zeros((), dtype=_F32, device=hs.device)
        grads = torch.ops.align_ti.fused_linear_kl_backward(
            grad_kl, grad_ce if ctx.has_labels else None, *tensors, *ctx.flags)
        out = [g if need else None for g, need in zip(grads, ctx.needed)]
    return (*out, *([None] * (ctx.n_inputs - 3)))


torch.library.register_autograd("align_ti::fused_linear_kl", _linear_backward,
                                setup_context=_linear_setup_context)


# --------------------------------------------------------------------------------------------
# logits in
# --------------------------------------------------------------------------------------------

@torch.library.custom_op("align_ti::fused_kl", mutates_args=())
@without_autocast
def _fused_kl_op(
    zs: torch.Tensor, zt: torch.Tensor, idx: Optional[torch.Tensor], mask: Optional[torch.Tensor],
    w: Optional[torch.Tensor], need_grad: bool,
    divergence: str, beta: float, temperature: float, reduction: str, vocab_size: int,
    impl: str, chunk_bytes: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, d loss / d student_logits for a unit upstream gradient, or empty)."""
    opts = FusedKLOptions.from_op_args(divergence, beta, temperature, reduction, vocab_size, impl,
                                       chunk_bytes)
    with_grad = need_grad and grads_in_forward(reduction, zs.dtype)
    loss, g = logits_driver(zs, zt.detach(), RowPlan(idx, mask, w), opts, with_grad)
    return loss, (g if g is not None else _empty(zs.device))


@_fused_kl_op.register_fake
def _(zs, zt, idx, mask, w, need_grad, divergence, beta, temperature, reduction, *options):
    m = zs.shape[0] if idx is None else idx.shape[0]
    loss = zs.new_empty((m,) if reduction == "none" else (), dtype=_F32)
    g = (zs.new_empty(zs.shape) if (need_grad and grads_in_forward(reduction, zs.dtype))
         else zs.new_empty((0,), dtype=_F32))
    return loss, g


@torch.library.custom_op("align_ti::fused_kl_backward", mutates_args=())
@without_autocast
def _fused_kl_backward_op(
    grad: torch.Tensor, zs: torch.Tensor, zt: torch.Tensor, idx: Optional[torch.Tensor],
    mask: Optional[torch.Tensor], w: Optional[torch.Tensor],
    divergence: str, beta: float, temperature: float, reduction: str, vocab_size: int,
    impl: str, chunk_bytes: int,
) -> torch.Tensor:
    opts = FusedKLOptions.from_op_args(divergence, beta, temperature, reduction, vocab_size, impl,
                                       chunk_bytes)
    return logits_driver(zs, zt, RowPlan(idx, mask, w), opts, need_grad=True, grad=grad)[1]


@_fused_kl_backward_op.register_fake
def _(grad, zs, *rest):
    return zs.new_empty(zs.shape)


def _kl_setup_context(ctx, inputs, output):
    ctx.need_grad = inputs[_LOGITS_TENSORS]
    ctx.options, ctx.n_inputs = inputs[_LOGITS_TENSORS + 1:], len(inputs)
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # no zero [N, Vs] for the gradient output (as above)
    ctx.saved_mode = grads_in_forward(FusedKLOptions.from_op_args(*ctx.options).kl.reduction,
                                      inputs[0].dtype)
    if ctx.saved_mode:
        ctx.save_for_backward(output[1])
    else:
        save_inputs(ctx, inputs[:_LOGITS_TENSORS])


def _kl_backward(ctx, grad, _unused):
    if not ctx.need_grad or grad is None:
        return (None,) * ctx.n_inputs
    refuse_double_backward("fused_kl")
    if ctx.saved_mode:
        consume_saved_gradients(ctx, "fused_kl")
        (g,) = ctx.saved_tensors
        g = scale_(g, grad)
    else:
        g = torch.ops.align_ti.fused_kl_backward(grad, *saved_inputs(ctx), *ctx.options)
    return (g, *([None] * (ctx.n_inputs - 1)))


torch.library.register_autograd("align_ti::fused_kl", _kl_backward, setup_context=_kl_setup_context)
