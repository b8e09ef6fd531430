"""Record the post-RoPE q / k that a transformers model hands to its attention function.

``capture_qk(model, layers=[...])`` wraps, for the duration of a ``with`` block, the
attention function the chosen decoder layers actually use, and records the query and key
states of those layers; outputs are unchanged and the model's configured implementation is
never touched.

How (transformers 5.x): each attention module's forward applies RoPE and then calls
``ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
eager_attention_forward)``, where ``eager_attention_forward`` is a global of the module's own
modeling file and "eager" is not a registry key (it is the fallback). So:

- implementation in the registry (sdpa, flash_attention_2/3/4, flex_attention, or a
  registered custom one): the registry entry of that *same* name is replaced, in the
  registry's local table, by a wrapper around the previous function. No new name is
  registered (a new name would have no matching mask function and silently lose the causal
  mask).
- "eager" (not in the registry): the ``eager_attention_forward`` global of the modeling
  file whose forward runs (found through the attention class's ``forward.__globals__``) is
  wrapped. Other modeling files (e.g. the SigLIP vision tower's) are untouched.

The wrapper matches calls by the identity of the chosen layers' attention modules, so the
vision tower (which goes through the same registry) and other models are never recorded.
Recording happens once per forward: calls made while autograd runs a backward pass
(gradient-checkpointing recomputation) are not recorded. A new forward overwrites the
previous record of each layer. Blocks may be nested or overlap and close in any order: an
entry gets one wrapper, which records for every open block. When the last block using it
closes, also on an exception, the entry is put back exactly as it was (a local-table entry
restored, or deleted if there was none).

The recorded tensors are the ones the model passes on (not copies, not detached), so a
loss built from them (e.g. ``attention_mass`` on a student) back-propagates into the model.
Pass ``detach=True`` to record detached tensors.
"""
from __future__ import annotations

import contextlib
import inspect

import torch

from align_ti.validation import check_bool

__all__ = ["capture_qk", "QKCapture", "decoder_attention_modules"]


def decoder_attention_modules(model) -> list:
    """The self-attention module of every decoder layer of a causal LM or of a supported
    vision-language model's language model, in order. The vision tower is never included.

    A model of a registered family (`align_ti.models.families`: LLaVA, LLaVA-OneVision,
    Qwen-VL, InternVL) names its language model's layers itself; any other model is searched for
    a decoder (``get_decoder()`` or ``model.model`` / ``language_model``) with ``layers``.
    """
    from align_ti.models.families import find_family

    family = find_family(model)
    if family is not None:
        return [layer.self_attn for layer in family.decoder_layers(model)]
    candidates = []
    get_decoder = getattr(model, "get_decoder", None)
    if callable(get_decoder):
        try:
            candidates.append(get_decoder())
        except Exception:  # some wrappers raise when no decoder is defined
            pass
    for path in ("model.language_model", "language_model", "model", ""):
        obj = model
        for part in filter(None, path.split(".")):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if obj is not None:
            candidates.append(obj)
    for dec in candidates:
        layers = getattr(dec, "layers", None)
        if isinstance(layers, torch.nn.ModuleList) and len(layers) > 0:
            attn = [getattr(layer, "self_attn", None) for layer in layers]
            if all(a is not None for a in attn):
                return attn
    raise ValueError(
        f"model: cannot find the decoder layers' self-attention modules of a "
        f"{type(model).__name__} (expected a language model with .layers[i].self_attn)"
    )


def _in_backward() -> bool:
    """True while autograd executes a backward pass (checkpoint recomputation runs there)."""
    fn = getattr(torch._C, "_current_graph_task_id", None)
    return fn is not None and fn() != -1


class QKCapture:
    """The records of one ``capture_qk`` block: ``cap[layer] -> (q, k)``.

    ``q`` is ``[B, Hq, L, D]`` and ``k`` is ``[B, Hkv, L, D]``, post-RoPE, as handed to the
    attention function. ``layers`` lists the chosen layers (normalised, non-negative);
    ``calls`` counts the recorded calls per layer (one per forward).
    """

    def __init__(self, layers: list[int], num_layers: int):
        self.layers = list(layers)
        self.num_layers = num_layers
        self.calls = {l: 0 for l in self.layers}
        self._records: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _key(self, layer) -> int:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise TypeError(f"layer must be an int, got {type(layer).__name__}")
        norm = layer + self.num_layers if layer < 0 else layer
        if norm not in self.calls:
            raise KeyError(f"layer {layer} was not captured (captured layers: {self.layers})")
        return norm

    def __getitem__(self, layer) -> tuple[torch.Tensor, torch.Tensor]:
        key = self._key(layer)
        if key not in self._records:
            raise KeyError(f"layer {layer} is captured but no forward has run through it yet")
        return self._records[key]

    def __contains__(self, layer) -> bool:
        try:
            return self._key(layer) in self._records
        except (KeyError, TypeError):
            return False

    def __len__(self) -> int:
        return len(self._records)

    def keys(self):
        return list(self._records)

    def items(self):
        return list(self._records.items())

    def clear(self) -> None:
        self._records.clear()


def _normalize_layers(layers, n: int) -> list[int]:
    if layers is None:
        return list(range(n))
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    try:
        layers = list(layers)
    except TypeError:
        raise TypeError(f"layers must be an int, a sequence of ints or None, got {type(layers).__name__}") from None
    if not layers:
        raise ValueError("layers is empty: choose at least one decoder layer")
    out = []
    for l in layers:
        if isinstance(l, bool) or not isinstance(l, int):
            raise TypeError(f"layers must hold ints, got {l!r} ({type(l).__name__})")
        if not -n <= l < n:
            raise ValueError(f"layers holds {l}, out of range for a model with {n} decoder layers "
                             f"(valid: 0..{n - 1} or -{n}..-1)")
        norm = l + n if l < 0 else l
        if norm not in out:
            out.append(norm)
    return out


class _Slot:
    """Where an attention function lives (a registry entry or a module global): install a
    replacement and later put back exactly what was there when the slot was made."""

    def __init__(self, current, install, restore):
        self.current, self.install, self.restore = current, install, restore


def _registry_slot(registry, impl: str) -> _Slot:
    # the registry's local table is patched; an entry that was not there is deleted again
    local = registry._local_mapping
    had_local, previous_local = impl in local, local.get(impl)

    def install(fn):
        registry[impl] = fn

    def restore():
        if had_local:
            registry[impl] = previous_local
        else:
            registry._local_mapping.pop(impl, None)

    return _Slot(registry[impl], install, restore)


def _namespace_slot(namespace: dict) -> _Slot:
    original = namespace["eager_attention_forward"]

    def install(fn):
        namespace["eager_attention_forward"] = fn

    def restore():
        namespace["eager_attention_forward"] = original

    return _Slot(original, install, restore)


# The patched slots of every open capture_qk block: one wrapper per slot, however many blocks
# record through it, so blocks may close in any order (a wrapper stacked on another block's
# wrapper would be put back by whichever closed last, stale).
_OPEN_PATCHES: dict[tuple, tuple[list, _Slot]] = {}


def _open_patch(key: tuple, slot: _Slot, recorder):
    """Make `recorder(module, query, key)` see every call through the slot named `key`;
    returns the function that stops it (the slot is restored when its last recorder stops)."""
    if key not in _OPEN_PATCHES:
        recorders = []
        original = slot.current

        def capturing_attention(module, query, key_states, value, attention_mask, *args, **kwargs):
            for rec in tuple(recorders):
                rec(module, query, key_states)
            return original(module, query, key_states, value, attention_mask, *args, **kwargs)

        capturing_attention.__wrapped__ = original
        slot.install(capturing_attention)
        _OPEN_PATCHES[key] = (recorders, slot)
    _OPEN_PATCHES[key][0].append(recorder)

    def close():
        recorders, first_slot = _OPEN_PATCHES[key]
        recorders.remove(recorder)
        if not recorders:
            del _OPEN_PATCHES[key]
            first_slot.restore()

    return close


@contextlib.contextmanager
def capture_qk(model, layers=None, detach: bool = False):
    """Record the post-RoPE q and k of the chosen decoder layers while the block runs.

    Args:
        model: a transformers causal LM (Qwen2 / Qwen3 / Llama-style) or a vision-language
            model of a supported family (LLaVA, LLaVA-OneVision, Qwen2-VL / 2.5-VL / 3-VL,
            InternVL: its language model's layers); its configured attention implementation
            (sdpa, eager, flash_attention_2/3/4, flex_attention) is used and left as is.
        layers: decoder layer indices (negative counts from the end), one int, or None for
            every layer. Out-of-range indices raise ``ValueError``.
        detach: record detached tensors (default: the live tensors, so gradients flow).

    Yields:
        ``QKCapture``: ``cap[l] -> (q [B, Hq, L, D], k [B, Hkv, L, D])`` of the last forward.

    Example::

        with capture_qk(model, layers=[l]) as cap:
            model(**batch)
        q, k = cap[l]
    """
    check_bool("detach", detach)
    attn_modules = decoder_attention_modules(model)
    chosen = _normalize_layers(layers, len(attn_modules))
    cap = QKCapture(chosen, len(attn_modules))
    by_id = {id(attn_modules[l]): l for l in chosen}

    def record(module, query, key):
        layer = by_id.get(id(module))
        if layer is None or _in_backward():
            return
        if detach:
            query, key = query.detach(), key.detach()
        cap._records[layer] = (query, key)
        cap.calls[layer] += 1

    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    closers = []  # one per patched target, run in reverse order
    try:
        impls = set()
        eager_namespaces = {}
        for l in chosen:
            module = attn_modules[l]
            config = getattr(module, "config", None)
            impl = getattr(config, "_attn_implementation", None) or "eager"
            if impl.startswith("paged|") and impl != "paged|eager":
                impl = impl.removeprefix("paged|")
            if impl == "eager" and "eager" not in ALL_ATTENTION_FUNCTIONS:
                forward = inspect.unwrap(type(module).forward)
                namespace = forward.__globals__
                if "eager_attention_forward" not in namespace:
                    raise ValueError(
                        f"model: layer {l} ({type(module).__name__}) runs eager attention but its "
                        f"modeling file {namespace.get('__name__')} has no eager_attention_forward"
                    )
                eager_namespaces[id(namespace)] = namespace
            else:
                if impl not in ALL_ATTENTION_FUNCTIONS:
                    raise ValueError(f"model: attention implementation {impl!r} is not registered "
                                     "in transformers' ALL_ATTENTION_FUNCTIONS")
                impls.add(impl)
        for impl in sorted(impls):
            closers.append(_open_patch(("registry", impl), _registry_slot(ALL_ATTENTION_FUNCTIONS, impl),
                                       record))
        for key, namespace in eager_namespaces.items():
            closers.append(_open_patch(("eager", key), _namespace_slot(namespace), record))
        yield cap
    finally:
        for close in reversed(closers):
            close()
