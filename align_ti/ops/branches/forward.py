"""Running a transformers model over TPA's candidates, and the decoder's final hidden states
(never logits), in one of two ways that give the same hidden states and gradients:

- the expanded forward (`expanded_hidden_states`): one forward over the ground truth with the
  candidates appended, under the 4-D mask in the form of the model's attention implementation;
- the prefix-cached pair (`ground_truth_pass`, then `candidate_hidden_states`): the ground-truth
  sequences once with each layer's keys and values kept, then only the candidate tokens, each
  attending to its own sample's cached ground-truth keys before its step and to itself. The
  ground-truth pass is the training forward itself, so TPA's candidates are drawn from it and
  its attention never spans the [T, T] square of the expanded one. `prefix_cache_unsupported`
  says when a model cannot be run this way.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
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


def _decoder_hidden_states(model, who: str, **kwargs) -> torch.Tensor:
    """Call ``model`` (through any wrapper, so gradient synchronisation and sharding hooks run)
    with ``logits_to_keep=1`` (no [B, T, V] logits) and return its decoder's final hidden states,
    caught by a forward hook."""
    decoder = _unwrap(model).get_decoder()
    captured = {}

    def hook(_module, _args, output):
        captured["h"] = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

    handle = decoder.register_forward_hook(hook)
    try:
        model(logits_to_keep=1, **kwargs)
    finally:
        handle.remove()
    if "h" not in captured:
        raise RuntimeError(f"{who}: the model's decoder was not called")
    return captured["h"]


def _attn_implementation(model) -> str:
    decoder = _unwrap(model).get_decoder()
    return getattr(decoder.config, "_attn_implementation", None) or "eager"


def expanded_hidden_states(
    model,
    batch: ExpandedBatch,
    pixel_values: Optional[torch.Tensor] = None,
    attn_implementation: Optional[str] = None,
    **model_kwargs,
) -> torch.Tensor:
    """Final (normed) hidden states [B, T, H] of a transformers model on an expanded batch.

    Works for decoder-only causal LMs (Qwen2/Qwen3/Llama-like) and the vision-language models of
    `align_ti.models.families` without copying model code: the model is called as usual
    (through any DDP/FSDP wrapper, so gradient synchronisation and sharding hooks run) with
    ``input_ids``, the 4-D mask form of its attention implementation
    (:meth:`ExpandedBatch.attention_mask_for`; transformers uses a 4-D mask or a BlockMask as
    given), ``position_ids``, ``use_cache=False`` and ``logits_to_keep=1`` (so no [B, T, V]
    logits are made); a forward hook on the decoder captures its last hidden state. For a vision-language model pass ``pixel_values`` (and the
    family's other image inputs, e.g. ``image_grid_thw``, as keywords): image splicing replaces
    the image-token positions of ``input_ids``, which are in the untouched ground-truth stream
    (candidates are never image tokens: see :func:`forbidden_token_ids`). Multimodal RoPE
    (Qwen-VL) takes the batch's [3, B, T] position ids as they are.

    attn_implementation: the mask form follows the implementation read from the model's
    decoder config ("sdpa" | "eager" | "flex_attention"); when given, it must name that same
    implementation (a mask of another form is silently wrong, e.g. a bool mask under eager),
    else ValueError. The eager mask uses the decoder's parameter dtype.
    The LM heads are applied by the losses (fused_linear_kl), never here.
    """
    if not isinstance(batch, ExpandedBatch):
        raise TypeError(f"batch must be an ExpandedBatch (from build_expanded_batch), got {type(batch).__name__}")
    impl = _attn_implementation(model)
    if attn_implementation is not None and attn_implementation != impl:
        raise ValueError(f"attn_implementation={attn_implementation!r} does not match the model's "
                         f"decoder, which runs {impl!r}: the 4-D mask must be of its form")
    dtype = next(_unwrap(model).get_decoder().parameters()).dtype
    kwargs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask_for(impl, dtype),
                  position_ids=batch.position_ids, use_cache=False)
    if pixel_values is not None:
        kwargs["pixel_values"] = pixel_values
    kwargs.update(model_kwargs)
    return _decoder_hidden_states(model, "expanded_hidden_states", **kwargs)


# --------------------------------------------------------------------------------------------
# the prefix-cached way
# --------------------------------------------------------------------------------------------

@dataclass
class PrefixPass:
    """A model's pass over the ground-truth sequences, its per-layer keys and values kept.

    hidden: [B, L, H] final hidden states (with grad when the pass had it); cache: the
    transformers ``DynamicCache`` of every decoder layer's keys and values at the L positions
    (the graph is kept: gradients from the candidates' pass reach them); position_ids: the
    [B, L] (or [3, B, L], multimodal RoPE) position ids the pass used, which the expanded batch
    must carry too."""

    hidden: torch.Tensor
    cache: object
    position_ids: torch.Tensor

    @property
    def length(self) -> int:
        return self.hidden.shape[1]


_DYNAMIC_ROPE = ("dynamic", "longrope")


def prefix_cache_unsupported(model) -> Optional[str]:
    """Why ``model`` cannot run TPA's candidates over a cached prefix (None when it can):

    - gradient checkpointing in training: transformers drops the cache then;
    - sliding-window attention: its cache keeps only the last window of keys;
    - "dynamic"/"longrope" RoPE: the frequencies follow the call's own length;
    - an attention implementation other than sdpa or eager: the candidates' 4-D mask rows
      cannot be handed to it (FlexAttention skips the masked blocks of the expanded forward
      instead).
    """
    inner = _unwrap(model)
    decoder = inner.get_decoder()
    config = decoder.config
    # transformers >= 5.2x says "activation checkpointing" (the old name warns); 5.17 has only the old
    checkpointing = getattr(inner, "is_activation_checkpointing", None)
    if checkpointing is None:
        checkpointing = getattr(inner, "is_gradient_checkpointing", False)
    if inner.training and checkpointing:
        return "gradient checkpointing is on (transformers keeps no cache in a checkpointed training forward)"
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None) or ()
    if any("sliding" in str(t) for t in layer_types) or (window and getattr(config, "use_sliding_window", True)
                                                         and not layer_types):
        return f"its decoder uses sliding-window attention (window {window}): the cache keeps only the last keys"
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type")) if isinstance(rope, dict) else None
    if rope_type in _DYNAMIC_ROPE:
        return f"its RoPE is {rope_type!r}, whose frequencies depend on the length of each call"
    impl = _attn_implementation(model)
    if impl not in ("sdpa", "eager"):
        return f"its decoder runs {impl!r} attention (the candidates' pass needs sdpa or eager)"
    return None


def _cache_keyword(model) -> str:
    """The forward keyword that takes a cache: ``cache`` (transformers >= 5.2x) or
    ``past_key_values`` (older 5.x, e.g. 5.17)."""
    params = inspect.signature(_unwrap(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def ground_truth_pass(model, input_ids, attention_mask, position_ids, pixel_values=None,
                      **model_kwargs) -> PrefixPass:
    """The model over the ground-truth sequences [B, L], keeping every layer's keys and values
    in a fresh ``DynamicCache`` (a static cache would be written in place). Runs with grad when
    the caller has it: this is the training forward. See `prefix_cache_unsupported` first."""
    from transformers import DynamicCache

    inner = _unwrap(model)
    cache = DynamicCache(config=inner.config)
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                  use_cache=True, **{_cache_keyword(model): cache})
    if pixel_values is not None:
        kwargs["pixel_values"] = pixel_values
    kwargs.update(model_kwargs)
    hidden = _decoder_hidden_states(model, "ground_truth_pass", **kwargs)
    if cache.get_seq_length() != input_ids.shape[1]:
        why = prefix_cache_unsupported(model) or "the model did not fill the cache"
        raise RuntimeError(f"ground_truth_pass: the cache holds {cache.get_seq_length()} positions, not the "
                           f"{input_ids.shape[1]} of the sequence ({why}); use TPA's expanded forward")
    return PrefixPass(hidden=hidden, cache=cache, position_ids=position_ids)


def candidate_hidden_states(model, batch: ExpandedBatch, prefix: PrefixPass) -> torch.Tensor:
    """Final hidden states [B, C, H] of the candidate slots of ``batch``, each candidate of step t
    attending to its sample's real ground-truth keys before t (from ``prefix``'s cache) and to
    itself, at the position id of y_t: the candidate rows of `expanded_hidden_states` on the
    same batch. Every call runs the model, also when no slot is filled (under FSDP / ZeRO-3
    every process must run the same forwards). The cache grows by the C candidate positions:
    use a prefix once."""
    if not isinstance(batch, ExpandedBatch):
        raise TypeError(f"batch must be an ExpandedBatch (from build_expanded_batch), got {type(batch).__name__}")
    if not isinstance(prefix, PrefixPass):
        raise TypeError(f"prefix must be a PrefixPass (from ground_truth_pass), got {type(prefix).__name__}")
    length = batch.length
    if prefix.length != length or prefix.cache.get_seq_length() != length:
        raise ValueError(f"prefix covers {prefix.cache.get_seq_length()} cached positions, but the batch's ground "
                         f"truth has L = {length}: a prefix serves one candidates' pass of its own batch")
    impl = _attn_implementation(model)
    dtype = next(_unwrap(model).get_decoder().parameters()).dtype
    mask = batch.attention_mask_for(impl, dtype, first_query=length)  # [B, 1, C, L + C]
    return _decoder_hidden_states(model, "candidate_hidden_states", input_ids=batch.input_ids[:, length:],
                                  position_ids=batch.position_ids[..., length:], attention_mask=mask,
                                  use_cache=True, **{_cache_keyword(model): prefix.cache})
