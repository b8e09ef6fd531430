"""Running a transformers model over TPA's expanded batch: one forward, the 4-D mask in the form
of the model's attention implementation, and the decoder's final hidden states (never logits).
"""
from __future__ import annotations

from typing import Optional

import torch

from align_ti.ops.branches.batch import ExpandedBatch


def _unwrap(model):
    """The transformers PreTrainedModel inside DDP/FSDP/accelerate wrappers."""
    seen = 0
    while not hasattr(model, "get_decoder") and hasattr(model, "module") and seen < 8:
        model = model.module
        seen += 1
    return model


def expanded_hidden_states(
    model,
    batch: ExpandedBatch,
    pixel_values: Optional[torch.Tensor] = None,
    attn_implementation: Optional[str] = None,
    **model_kwargs,
) -> torch.Tensor:
    """Final (normed) hidden states [B, T, H] of a transformers model on an expanded batch.

    Works for decoder-only causal LMs (Qwen2/Qwen3/Llama-like) and LlavaForConditionalGeneration
    without copying model code: the model is called as usual (through any DDP/FSDP wrapper, so
    gradient synchronisation and sharding hooks run) with ``input_ids``, the 4-D mask form of
    its attention implementation (:meth:`ExpandedBatch.attention_mask_for`; transformers uses a
    4-D mask or a BlockMask as given), ``position_ids``, ``use_cache=False`` and
    ``logits_to_keep=1`` (so no [B, T, V] logits are made); a forward hook on the decoder
    captures its last hidden state. For Llava pass ``pixel_values``: image splicing replaces
    the image-token positions of ``input_ids``, which are in the untouched ground-truth stream
    (candidates are never image tokens: see :func:`forbidden_token_ids`).

    attn_implementation: the mask form follows the implementation read from the model's
    decoder config ("sdpa" | "eager" | "flex_attention"); when given, it must name that same
    implementation (a mask of another form is silently wrong, e.g. a bool mask under eager),
    else ValueError. The eager mask uses the decoder's parameter dtype.
    The LM heads are applied by the losses (fused_linear_kl), never here.
    """
    if not isinstance(batch, ExpandedBatch):
        raise TypeError(f"batch must be an ExpandedBatch (from build_expanded_batch), got {type(batch).__name__}")
    inner = _unwrap(model)
    decoder = inner.get_decoder()
    impl = getattr(decoder.config, "_attn_implementation", None) or "eager"
    if attn_implementation is not None and attn_implementation != impl:
        raise ValueError(f"attn_implementation={attn_implementation!r} does not match the model's "
                         f"decoder, which runs {impl!r}: the 4-D mask must be of its form")
    dtype = next(decoder.parameters()).dtype
    mask = batch.attention_mask_for(impl, dtype)
    captured = {}

    def hook(_module, _args, output):
        captured["h"] = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

    handle = decoder.register_forward_hook(hook)
    try:
        kwargs = dict(input_ids=batch.input_ids, attention_mask=mask, position_ids=batch.position_ids,
                      use_cache=False, logits_to_keep=1)
        if pixel_values is not None:
            kwargs["pixel_values"] = pixel_values
        kwargs.update(model_kwargs)
        model(**kwargs)
    finally:
        handle.remove()
    if "h" not in captured:
        raise RuntimeError("expanded_hidden_states: the model's decoder was not called")
    return captured["h"]
