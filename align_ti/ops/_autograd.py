"""What the ops' autograd formulas share: saving inputs that may be inference tensors, and the
refusal of double backward (the gradients come from fused kernels, not differentiable ops)."""
from __future__ import annotations

import torch


def save_inputs(ctx, tensors) -> None:
    """save_for_backward, except for inference tensors (e.g. teacher states computed under
    torch.inference_mode()), which autograd refuses to save: they never get a gradient and
    are never written, so the context keeps a plain reference to them."""
    ctx.inference_inputs = {i: t for i, t in enumerate(tensors) if t is not None and t.is_inference()}
    ctx.save_for_backward(*(None if i in ctx.inference_inputs else t for i, t in enumerate(tensors)))


def saved_inputs(ctx) -> list:
    saved = list(ctx.saved_tensors)
    for i, t in ctx.inference_inputs.items():
        saved[i] = t
    return saved


def refuse_double_backward(op: str) -> None:
    """A backward run with create_graph=True would return gradients with no graph behind them:
    say so instead."""
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        raise RuntimeError(f"{op}: double backward (create_graph=True) is not supported; its "
                           "gradients come from fused kernels, not from differentiable ops")
