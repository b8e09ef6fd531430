"""Model families: everything Align-TI needs to know about one kind of vision-language model,
behind one small adapter per family, so the trainer, IRS, attention capture and TPA stay
model-agnostic.

An adapter (a `Family` subclass in a module of this package, registered with `register`) says:

- which transformers classes it serves (``model_types``: ``config.model_type`` values;
  ``processor_classes``: the processor class names);
- where the vision tokens are (`Family.vision_mask`; the instruction tokens come from the chat
  template, `align_ti.data.llava.encode_example`);
- the language model: its decoder layers (attention capture, never the vision tower's), its LM
  head, and the vision tower and projector (what the config may freeze);
- the position ids of the ground truth (`Family.position_ids`: [B, L], or [3, B, L] from the
  model's own rope-index function for multimodal RoPE) -- TPA's candidates take y_t's ids in
  every component;
- which processor outputs carry the images (``image_inputs``: pixel_values, image_grid_thw,
  image_sizes, ...), passed to the model as they are;
- whether its processor needs torchvision (the ``[vlm]`` extra), and how to build a tiny
  random-weight teacher / student with a local processor (`Family.tiny_config`,
  `Family.tiny_processor`).

Adding a family is one file: a module here whose adapter calls `register`; every module of the
package is imported on the first lookup. A model or processor of no registered family is an
error that lists the supported ones.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Optional

import torch

__all__ = [
    "Family",
    "register",
    "family_of",
    "find_family",
    "get_family",
    "family_names",
    "require_torchvision",
    "set_trainable",
    "VLM_EXTRA",
]

#: The pip extra that installs what the processors of some families need (torchvision).
VLM_EXTRA = "pip install 'align-ti[vlm]'"

_REGISTRY: dict[str, "Family"] = {}
_LOADED = False


class Family:
    """The adapter of one model family (subclass it; the defaults suit LLaVA-style models).

    Class attributes: ``name`` (registry key, e.g. ``"qwen2_5_vl"``), ``title`` (for people,
    e.g. ``"Qwen2.5-VL"``), ``model_types`` (``config.model_type`` values it serves),
    ``processor_classes`` (processor class names), ``image_inputs`` (the processor outputs that
    carry images, passed to the model under the same names), ``needs_torchvision`` (its
    processor does), ``multimodal_rope`` (position ids [3, B, L]).
    """

    name: str = ""
    title: str = ""
    model_types: tuple[str, ...] = ()
    processor_classes: tuple[str, ...] = ()
    image_inputs: tuple[str, ...] = ("pixel_values",)
    needs_torchvision: bool = False
    multimodal_rope: bool = False

    # ---- tokens ------------------------------------------------------------------------------
    def image_token_id(self, config) -> int:
        """The token id that the processor repeats once per vision feature."""
        for key in ("image_token_id", "image_token_index"):
            value = getattr(config, key, None)
            if isinstance(value, int):
                return value
        raise ValueError(f"model: {type(config).__name__} names no image token id")

    def vision_mask(self, config, input_ids: torch.Tensor) -> torch.Tensor:
        """bool [B, L]: the vision tokens (IVA's rows, IRS's keys): the image-token positions."""
        return input_ids == self.image_token_id(config)

    # ---- modules -------------------------------------------------------------------------------
    def language_model(self, model):
        """The decoder-only text model (embeddings, ``layers``, final norm) inside ``model``."""
        return model.get_decoder()

    def decoder_layers(self, model) -> torch.nn.ModuleList:
        """The language model's decoder layers (never the vision tower's)."""
        return self.language_model(model).layers

    def lm_head(self, model) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(weight [V, H], bias or None) of the LM head."""
        head = model.get_output_embeddings()
        return head.weight, getattr(head, "bias", None)

    def vision_tower(self, model) -> list[torch.nn.Module]:
        """The vision encoder's modules (frozen with ``train_vision_tower=false``)."""
        return [model.model.vision_tower]

    def projector(self, model) -> list:
        """The modules and parameters that map vision features into the language model
        (frozen with ``train_projector=false``)."""
        return [model.model.multi_modal_projector]

    # ---- inputs ----------------------------------------------------------------------------------
    def position_ids(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     images: dict) -> torch.Tensor:
        """The ground truth's position ids: int64 [B, L] (0.. over each sample's real tokens,
        right padding); [3, B, L] for multimodal RoPE."""
        from align_ti.ops.branches.batch import default_position_ids

        return default_position_ids(attention_mask)

    def model_images(self, batch: dict, dtype: torch.dtype) -> dict:
        """The image inputs of ``batch`` that the model takes, floating ones cast to ``dtype``
        (an empty dict for a batch without images)."""
        out = {}
        for key in self.image_inputs:
            value = batch.get(key)
            if value is not None:
                out[key] = value.to(dtype) if value.is_floating_point() else value
        return out

    # ---- tiny random-weight models -----------------------------------------------------------------
    def tiny_config(self, size: str, **overrides):
        """The config of a tiny teacher / student of this family (see `align_ti.models.tiny`)."""
        raise NotImplementedError(f"family {self.name!r} has no tiny builder")

    def tiny_processor(self, config):
        """A local processor (tokenizer, image processor, chat template) for a tiny config."""
        raise NotImplementedError(f"family {self.name!r} has no tiny processor")

    def model_class(self):
        """The transformers ``*ForConditionalGeneration`` class of this family."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<family {self.name}>"


def register(family: Family) -> Family:
    """Add a family adapter to the registry (by name; a second one of the same name is an error)."""
    if not family.name or not family.model_types:
        raise ValueError(f"family {family!r}: an adapter needs a name and its model_types")
    if family.name in _REGISTRY and type(_REGISTRY[family.name]) is not type(family):
        raise ValueError(f"family {family.name!r} is registered twice")
    _REGISTRY[family.name] = family
    return family


def _load_all() -> None:
    """Import every module of this package once: each registers its adapters."""
    global _LOADED
    if _LOADED:
        return
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
    _LOADED = True


def family_names() -> list[str]:
    """The registered families, by name."""
    _load_all()
    return sorted(_REGISTRY)


def get_family(name: str) -> Family:
    """The family registered as ``name``; ValueError listing the supported ones otherwise."""
    _load_all()
    if name not in _REGISTRY:
        raise ValueError(f"family {name!r} is not supported; supported: {', '.join(family_names())}")
    return _REGISTRY[name]


def _unwrap(model):
    """The transformers model inside DDP / FSDP / accelerate wrappers."""
    for _ in range(8):
        if hasattr(model, "config") or not hasattr(model, "module"):
            break
        model = model.module
    return model


def find_family(obj) -> Optional[Family]:
    """The family of a model, a config or a processor, or None when no family serves it."""
    _load_all()
    obj = _unwrap(obj)
    config = getattr(obj, "config", obj)
    model_type = getattr(config, "model_type", None)
    class_name = type(obj).__name__
    for family in _REGISTRY.values():
        if model_type in family.model_types or class_name in family.processor_classes:
            return family
    return None


def family_of(obj, what: str = "model") -> Family:
    """The family of a model, a config or a processor; ValueError naming ``what`` and listing the
    supported families when no adapter serves it."""
    family = find_family(obj)
    if family is None:
        inner = _unwrap(obj)
        config = getattr(inner, "config", inner)
        kind = getattr(config, "model_type", None)
        described = type(inner).__name__ + (f" (model_type {kind!r})" if kind else "")
        raise ValueError(f"{what}: {described} is not a supported model family; supported: "
                         f"{', '.join(family_names())}")
    return family


def require_torchvision(family: Family, what: str = "model") -> None:
    """ImportError naming the extra when ``family``'s processor needs torchvision and it is missing
    (transformers' own error is an AttributeError deep inside the processor registry)."""
    if not family.needs_torchvision:
        return
    try:
        import torchvision  # noqa: F401
    except ImportError:
        raise ImportError(f"{what}: the {family.title} processor needs torchvision, which is not installed: "
                          f"{VLM_EXTRA}") from None


def _parameters(parts) -> list[torch.nn.Parameter]:
    """The parameters of a list of modules and parameters."""
    out = []
    for part in parts:
        out.extend([part] if isinstance(part, torch.nn.Parameter) else part.parameters())
    return out


def set_trainable(model, vision_tower: bool = True, projector: bool = True) -> None:
    """Which parts of a student train, the same for every family: the language model (with its LM
    head) always; the vision tower and the projector (vision features -> language model) unless
    switched off here (their parameters get ``requires_grad=False``; the rest ``True``)."""
    family = family_of(model)
    model.requires_grad_(True)
    projector_params = {id(p) for p in _parameters(family.projector(model))}
    if not vision_tower:
        for p in _parameters(family.vision_tower(model)):
            if id(p) not in projector_params:  # Qwen-VL's merger sits inside its vision tower
                p.requires_grad_(False)
    if not projector:
        for p in _parameters(family.projector(model)):
            p.requires_grad_(False)
