"""What the ops' autograd formulas share: saving inputs that may be inference tensors, the
refusal of double backward (the gradients come from fused kernels, not differentiable ops), and
the policy of gradients computed in the forward and scaled in the backward."""
from __future__ import annotations

import contextlib
import functools
import inspect

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


# --------------------------------------------------------------------------------------------
# gradients computed in the forward (fused_kl's ops and topk_align)
# --------------------------------------------------------------------------------------------

def grads_in_forward(reduction: str, dtype: torch.dtype) -> bool:
    """Whether an op computes its gradients in the forward, for a unit upstream gradient that
    the backward then scales: for a scalar loss ("mean", "sum"), except in fp16, whose narrow
    range needs the upstream gradient (e.g. a GradScaler's loss scale) applied before the
    gradients are rounded. Otherwise the backward recomputes with the upstream gradient."""
    return reduction != "none" and dtype != torch.float16


def consume_saved_gradients(ctx, op: str) -> None:
    """The first backward scales the gradients the forward computed in place; a second one
    through the same graph would find them consumed: refuse it with the remedy."""
    if getattr(ctx, "consumed", False):
        raise RuntimeError(
            f"{op}: the gradients of this graph were computed in the forward and the first "
            "backward consumed them (scaled in place, no copy); a second backward through it "
            "(retain_graph=True, or kl and ce backpropagated one after the other) is not "
            "supported. Backpropagate one combined loss, or use reduction='none', whose "
            "backward recomputes the chunks each time.")
    ctx.consumed = True


def scale_(t: torch.Tensor, s: torch.Tensor | None) -> torch.Tensor:
    """t *= s in place (s None: no upstream gradient reached the output, t becomes 0): a saved
    gradient is only read by this backward, and one kernel over it (a [Vs, Hs] weight
    gradient) is all the backward costs. For a bf16 t the upstream s is rounded to bf16 first
    (within 0.2%: exact for the usual 1, 0.5, 0.25, ...); scaling in fp32 would take three more
    passes over t, ~1 ms (2%) of the fused KL on an H200 by a bandwidth estimate."""
    return t.zero_() if s is None else t.mul_(s.to(t.dtype))


def without_autocast(body):
    """An op body that computes in its own documented precision inside any autocast region:
    the fused ops keep fp32 logits and fp32 gradient accumulators, which autocast would break
    by running their inner matmuls in bf16/fp16 (and mixing dtypes in the accumulators).
    Apply below ``@torch.library.custom_op`` (the schema comes from the wrapped signature)."""
    @functools.wraps(body)
    def run(*args, **kwargs):
        with contextlib.ExitStack() as stack:
            for device in ("cpu", "cuda"):
                if torch.is_autocast_enabled(device):
                    stack.enter_context(torch.autocast(device, enabled=False))
            return body(*args, **kwargs)

    # the schema is read off the signature: with its annotations evaluated in the body's module
    # (under `from __future__ import annotations` they are strings naming that module's types)
    run.__signature__ = inspect.signature(body, eval_str=True)
    return run
