"""topk_align as torch.library custom ops: `align_ti::topk_align` (selection and loss in one op,
so the data-dependent number of selected rows stays inside it and torch.compile(fullgraph=True)
traces through) and its recomputing backward op, with fake tensors and autograd.

The forward selects the rows, then runs the fused KL's `linear_driver` on them ("auto" and
"torch": exactly `fused_linear_kl` with the selected rows and weights) or the Triton gather
driver (`gather`). Gradients as the fused KL's (`_autograd.grads_in_forward`): computed in the
forward and scaled in the backward, except in fp16, where the backward op selects again and
recomputes the chunks with the upstream gradient (the gather driver is not used in fp16).
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
from align_ti.ops.fused_kl.autograd import fake_grads
from align_ti.ops.fused_kl.driver import GradRequest, Head, linear_driver
from align_ti.ops.fused_kl.matmuls import StudentGrads
from align_ti.ops.fused_kl.options import FusedKLOptions
from align_ti.ops.fused_kl.rows import RowPlan, safe_div
from align_ti.ops.topk_align.gather import gather_driver
from align_ti.ops.topk_align.selection import selected_rows

_F32 = torch.float32
_TENSORS = 8  # hs, ws, bs, ht, wt, bt, mass, vision_mask


def _flat_heads(hs, ws, bs, ht, wt, bt) -> tuple[Head, Head]:
    """Both heads with the hidden states [B, L, H] flattened to [B*L, H]."""
    return (Head(hs.reshape(hs.shape[0] * hs.shape[1], hs.shape[2]), ws, bs),
            Head(ht.reshape(ht.shape[0] * ht.shape[1], ht.shape[2]), wt, bt))


def _loss_and_grads(student: Head, teacher: Head, rows, weights, opts: FusedKLOptions,
                    want: GradRequest, gather: bool):
    """(loss, StudentGrads of the flattened hidden states) on the selected rows: the Triton
    gather driver, or the fused KL's driver (exactly `fused_linear_kl` on those rows)."""
    if gather:
        coef = safe_div(weights, weights.sum()).contiguous()
        return gather_driver(student, teacher, rows, coef, opts, want)
    res = linear_driver(student, teacher, RowPlan(idx=rows, weights=weights), opts, want)
    return res.kl, res.grads or StudentGrads()


def _outputs(grads: StudentGrads, hs, ws, bs) -> list:
    """The gradients in the dtypes and shapes of what they are the gradients of; empty where
    absent (every output its own tensor)."""
    out = []
    for g, like in zip(grads, (hs, ws, bs)):
        out.append(torch.zeros(0, dtype=_F32, device=hs.device) if g is None
                   else g.to(like.dtype).view(like.shape))
    return out


@torch.library.custom_op("align_ti::topk_align", mutates_args=())
@without_autocast
def _topk_align_op(
    hs: torch.Tensor, ws: torch.Tensor, bs: Optional[torch.Tensor],
    ht: torch.Tensor, wt: torch.Tensor, bt: Optional[torch.Tensor],
    mass: torch.Tensor, vision_mask: torch.Tensor,
    k: Optional[int], ratio: Optional[float], normalize: str,
    need_dh: bool, need_dw: bool, need_db: bool, fp32_weight_grad: bool, gather: bool,
    divergence: str, beta: float, temperature: float, reduction: str, vocab_size: int,
    impl: str, chunk_bytes: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, dh, dw, db): the gradients for a unit upstream gradient where requested and
    computed in the forward, else empty."""
    opts = FusedKLOptions.from_op_args(divergence, beta, temperature, reduction, vocab_size, impl,
                                       chunk_bytes)
    in_fwd = gather or grads_in_forward(reduction, hs.dtype)
    want = GradRequest(need_dh and in_fwd, need_dw and in_fwd, need_db and in_fwd, split_ce=False,
                       fp32_weight_grad=fp32_weight_grad)
    rows, weights = selected_rows(mass, vision_mask, k, ratio, normalize)
    loss, grads = _loss_and_grads(*_flat_heads(hs, ws, bs, ht, wt, bt), rows, weights, opts, want,
                                  gather)
    return (loss, *_outputs(grads, hs, ws, bs))


@_topk_align_op.register_fake
def _(hs, ws, bs, ht, wt, bt, mass, vision_mask, k, ratio, normalize, need_dh, need_dw, need_db,
      fp32_weight_grad, gather, divergence, beta, temperature, reduction, *options):
    in_fwd = gather or grads_in_forward(reduction, hs.dtype)
    needed = (need_dh and in_fwd, need_dw and in_fwd, need_db and in_fwd)
    return (hs.new_empty((), dtype=_F32), *fake_grads(hs, ws, bs, needed))


@torch.library.custom_op("align_ti::topk_align_backward", mutates_args=())
@without_autocast
def _topk_align_backward_op(
    grad: torch.Tensor, hs: torch.Tensor, ws: torch.Tensor, bs: Optional[torch.Tensor],
    ht: torch.Tensor, wt: torch.Tensor, bt: Optional[torch.Tensor],
    mass: torch.Tensor, vision_mask: torch.Tensor,
    k: Optional[int], ratio: Optional[float], normalize: str,
    need_dh: bool, need_dw: bool, need_db: bool, fp32_weight_grad: bool, gather: bool,
    divergence: str, beta: float, temperature: float, reduction: str, vocab_size: int,
    impl: str, chunk_bytes: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dh, dw, db) for the upstream gradient `grad`, recomputed (the rows selected again)."""
    opts = FusedKLOptions.from_op_args(divergence, beta, temperature, reduction, vocab_size, impl,
                                       chunk_bytes)
    want = GradRequest(need_dh, need_dw, need_db, split_ce=False, grad_kl=grad,
                       fp32_weight_grad=fp32_weight_grad)
    rows, weights = selected_rows(mass, vision_mask, k, ratio, normalize)
    _, grads = _loss_and_grads(*_flat_heads(hs, ws, bs, ht, wt, bt), rows, weights, opts, want,
                               gather=False)
    return tuple(_outputs(grads, hs, ws, bs))


@_topk_align_backward_op.register_fake
def _(grad, hs, ws, bs, ht, wt, bt, mass, vision_mask, k, ratio, normalize, need_dh, need_dw,
      need_db, *options):
    return tuple(fake_grads(hs, ws, bs, (need_dh, need_dw, need_db)))


def _setup_context(ctx, inputs, output):
    tensors, options = inputs[:_TENSORS], inputs[_TENSORS:]
    need_dh, need_dw, need_db, _, gather = options[3:8]
    ctx.options, ctx.n_inputs, ctx.device = options, len(inputs), tensors[0].device
    ctx.needed = (need_dh, need_dw, need_db and tensors[2] is not None)
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)  # no zero [Vs, Hs] upstream for the gradient outputs
    reduction = FusedKLOptions.from_op_args(*options[8:]).kl.reduction
    ctx.saved_mode = gather or grads_in_forward(reduction, tensors[0].dtype)
    if ctx.saved_mode:
        ctx.save_for_backward(*output[1:])
    else:
        save_inputs(ctx, tensors)


def _backward(ctx, grad, *_unused):
    refuse_double_backward("topk_align")
    if ctx.saved_mode:
        consume_saved_gradients(ctx, "topk_align")
        out = [scale_(g, grad) if need else None for g, need in zip(ctx.saved_tensors, ctx.needed)]
    else:
        if grad is None:
            grad = torch.zeros((), dtype=_F32, device=ctx.device)
        grads = torch.ops.align_ti.topk_align_backward(grad, *saved_inputs(ctx), *ctx.options)
        out = [g if need else None for g, need in zip(grads, ctx.needed)]
    return (*out, *([None] * (ctx.n_inputs - 3)))


torch.library.register_autograd("align_ti::topk_align", _backward, setup_context=_setup_context)
