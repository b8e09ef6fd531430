"""Tiny random-weight models of every supported family, their processors, and checkpoint folders.

`build_tiny(family, size)` / `build_tiny_processor(config)` build a teacher or student of any
family (`align_ti.models.families`: LLaVA, LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL, Qwen3-VL,
InternVL), modelled on transformers' default config and processor of that family at tiny widths;
`write_tiny_checkpoints` saves a teacher/student pair as local checkpoint folders (what
`align-ti synth-models` writes). The LLaVA builders below are the original ones (SigLIP vision
tower + Qwen2/Qwen3 text model), which the demo and most tests use.

Tests, the `align-ti demo` CLI and the CPU benchmarks need real transformers architectures
that build in milliseconds and train in minutes on two CPU cores. The shapes mimic a real
distillation pair: the teacher is wider/deeper and uses GQA, and the two LM heads have
different, padded row counts (1300 vs 1271; the tokenizer has far fewer tokens), like
Qwen2-7B's 152064 vs Qwen2.5's 151936 rows, so the "shared first V' entries" logic is exercised.

SigLIP has no CLS token, so the LLaVA config uses `vision_feature_select_strategy="full"`
and every patch becomes one image token: image_seq_length = (image_size // patch_size) ** 2.
"""
from __future__ import annotations

import torch
from transformers import (
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    SiglipVisionConfig,
)

from .tokenizer import IM_END, IMAGE_TOKEN, PAD_TOKEN, SPECIAL_TOKENS, build_tokenizer

IMAGE_SIZE = 48
PATCH_SIZE = 8
PAD_TOKEN_ID = SPECIAL_TOKENS.index(PAD_TOKEN)
EOS_TOKEN_ID = SPECIAL_TOKENS.index(IM_END)
IMAGE_TOKEN_ID = SPECIAL_TOKENS.index(IMAGE_TOKEN)

#: Text-model sizes. head_dim = hidden_size // num_attention_heads.
TEXT_SIZES = {
    "teacher": dict(
        vocab_size=1300, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2,
    ),
    "student": dict(
        vocab_size=1271, hidden_size=64, intermediate_size=176, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2,
    ),
}
#: Vision-tower sizes (the student gets its own, narrower tower, as in real student MLLMs).
VISION_SIZES = {
    "teacher": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
    "student": dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4),
}
_TEXT_CLASSES = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM)}
_VISION_KEYS = {"image_size", "patch_size", "vision_hidden_size", "vision_intermediate_size",
                "vision_num_hidden_layers", "vision_num_attention_heads"}
_LLAVA_KEYS = {"projector_hidden_act", "vision_feature_layer", "multimodal_projector_bias"}


def _check(size: str, text: str) -> None:
    if size not in TEXT_SIZES:
        raise ValueError(f"size must be one of {sorted(TEXT_SIZES)}, got {size!r}")
    if text not in _TEXT_CLASSES:
        raise ValueError(f"text must be one of {sorted(_TEXT_CLASSES)}, got {text!r}")


def text_kwargs(size: str = "student", **overrides) -> dict:
    """The text-model fields of a named size (a Qwen2/Qwen3 config's keyword arguments): widths,
    depth, the padded vocabulary, pad/eos ids and plain RoPE; any field can be overridden. Every
    family's tiny language model starts from these."""
    _check(size, "qwen2")
    kw = dict(TEXT_SIZES[size])
    kw.update(
        max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False,
        pad_token_id=PAD_TOKEN_ID, eos_token_id=EOS_TOKEN_ID, bos_token_id=None,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    kw.update(overrides)
    return kw


def tiny_text_config(size: str = "student", text: str = "qwen2", **overrides):
    """Qwen2Config / Qwen3Config for a named size; any config field can be overridden."""
    _check(size, text)
    kw = text_kwargs(size, **overrides)
    # Qwen3 defaults head_dim to 128; keep hidden = heads * head_dim unless told otherwise.
    kw.setdefault("head_dim", kw["hidden_size"] // kw["num_attention_heads"])
    if text == "qwen2":
        kw.pop("head_dim")
    return _TEXT_CLASSES[text][0](**kw)


def tiny_vision_config(size: str = "student", **overrides) -> SiglipVisionConfig:
    """SigLIP vision config; no pooling head (LLaVA never uses it, so it would be dead weight)."""
    _check(size, "qwen2")
    kw = dict(VISION_SIZES[size], image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, vision_use_head=False)
    kw.update(overrides)
    return SiglipVisionConfig(**kw)


def tiny_llava_config(size: str = "student", text: str = "qwen2", **overrides) -> LlavaConfig:
    """LlavaConfig for a named size.

    Overrides: text-model fields by their own name (`hidden_size=96`), vision fields as
    `image_size`, `patch_size` or `vision_<field>` (`vision_hidden_size=32`), and the LLaVA
    fields `projector_hidden_act`, `vision_feature_layer`, `multimodal_projector_bias`.
    """
    _check(size, text)
    vision_kw = {k.removeprefix("vision_"): overrides.pop(k) for k in list(overrides) if k in _VISION_KEYS}
    llava_kw = {k: overrides.pop(k) for k in list(overrides) if k in _LLAVA_KEYS}
    vision = tiny_vision_config(size, **vision_kw)
    text_cfg = tiny_text_config(size, text, **overrides)
    n_patches = (vision.image_size // vision.patch_size) ** 2
    kw = dict(
        vision_config=vision, text_config=text_cfg, image_token_index=IMAGE_TOKEN_ID,
        image_seq_length=n_patches, vision_feature_select_strategy="full",
        vision_feature_layer=-1, projector_hidden_act="gelu", tie_word_embeddings=False,
    )
    kw.update(llava_kw)
    return LlavaConfig(**kw)


def _seeded_build(model_cls, config, seed: int, attn_implementation: str, dtype: torch.dtype):
    """Build with a private RNG state: same seed -> same weights; the global RNG is untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls._from_config(config, attn_implementation=attn_implementation, dtype=dtype)
    model.generation_config.pad_token_id = PAD_TOKEN_ID
    model.generation_config.eos_token_id = EOS_TOKEN_ID
    return model


def build_tiny_llava(
    size: str = "student",
    text: str = "qwen2",
    seed: int = 0,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    **overrides,
) -> LlavaForConditionalGeneration:
    """A random-weight `LlavaForConditionalGeneration` (see `tiny_llava_config` for overrides)."""
    config = tiny_llava_config(size, text, **overrides)
    return _seeded_build(LlavaForConditionalGeneration, config, seed, attn_implementation, dtype)


def build_tiny_causal_lm(
    size: str = "student",
    text: str = "qwen2",
    seed: int = 0,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    **overrides,
):
    """A random-weight text-only Qwen2ForCausalLM / Qwen3ForCausalLM (for attention tests)."""
    config = tiny_text_config(size, text, **overrides)
    return _seeded_build(_TEXT_CLASSES[text][1], config, seed, attn_implementation, dtype)


def _image_processor_class():
    """SigLIP's PIL-backend processor: needs no torchvision and gives identical pixels either way.

    (In transformers 5, `SiglipImageProcessor` is the torchvision backend; without torchvision
    it falls back to the PIL one with a warning.)
    """
    try:
        from transformers import SiglipImageProcessorPil
    except ImportError:  # older transformers: one class, PIL/numpy based
        from transformers import SiglipImageProcessor as SiglipImageProcessorPil
    return SiglipImageProcessorPil


def build_processor(tokenizer=None, config: LlavaConfig | None = None) -> LlavaProcessor:
    """A `LlavaProcessor` whose `<image>` expansion matches a tiny model's config.

    LlavaProcessor (transformers 5) replaces each `<image>` by
    (H // patch_size) * (W // patch_size) copies computed from the *processed* pixel_values,
    minus one for strategy "default"; so image size, patch size and strategy must match the
    model's vision config, which is where they are read from (default: the tiny config).
    """
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer()
    config = config if config is not None else tiny_llava_config()
    vision = config.vision_config
    image_processor = _image_processor_class()(
        size={"height": vision.image_size, "width": vision.image_size},
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        chat_template=tokenizer.chat_template,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=0,
    )


# ------------------------------------------------------------------------------------------------
# every family
# ------------------------------------------------------------------------------------------------

def build_tiny(family: str = "llava", size: str = "student", seed: int = 0, attn_implementation="sdpa",
               dtype: torch.dtype = torch.float32, **overrides):
    """A random-weight teacher or student (``size``) of a registered ``family``: its
    ``tiny_config(size, **overrides)`` (text-model fields by name), built with weights from ``seed``."""
    from align_ti.models.families import get_family

    fam = get_family(family)
    _check(size, "qwen2")
    return _seeded_build(fam.model_class(), fam.tiny_config(size, **overrides), seed, attn_implementation, dtype)


def build_tiny_processor(config, **image_processor_args):
    """The local processor of a tiny model's ``config`` (any family): tokenizer with the family's
    special tokens, image processor, chat template. ``image_processor_args`` override the image
    processor's settings (e.g. Qwen-VL's ``min_pixels`` / ``max_pixels``). Families whose
    processor needs torchvision raise ImportError naming the extra without it."""
    from align_ti.models.families import family_of, require_torchvision

    fam = family_of(config)
    require_torchvision(fam, f"family {fam.name}")
    return fam.tiny_processor(config, **image_processor_args)


def write_tiny_checkpoints(family: str, out, seed: int = 0) -> tuple[str, str]:
    """Save a tiny teacher (seed ``seed + 1``) and student (seed ``seed``) of ``family``, each with
    its processor, as ``<out>/teacher`` and ``<out>/student`` checkpoint folders that
    ``from_pretrained`` / ``AutoProcessor`` load with ``local_files_only``; returns the two paths."""
    import os

    from align_ti.models.families import get_family, require_torchvision

    require_torchvision(get_family(family), f"family {family}")
    paths = []
    for size, model_seed in (("teacher", seed + 1), ("student", seed)):
        model = build_tiny(family, size, seed=model_seed)
        path = os.path.join(str(out), size)
        model.save_pretrained(path)
        build_tiny_processor(model.config).save_pretrained(path)
        paths.append(path)
    return paths[0], paths[1]
