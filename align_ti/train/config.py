"""The one configuration of a distillation run: a dataclass, loaded from YAML/JSON and
overridden from the command line with `key=value` pairs.

Every field has a default, so `DistillConfig()` is a complete run on the built-in tiny models
and synthetic data. Errors say what to fix: an unknown key lists the valid ones, a value of the
wrong type names the field and the type it needs.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Union

from align_ti.constants import (
    ATTN_IMPLEMENTATIONS,
    BAD_SAMPLES,
    DIVERGENCES,
    KL_PASSES,
    TPA_FORWARDS,
    TPA_STRATEGIES,
)
from align_ti.constants import TEACHER_SHARDINGS

BUILTIN_MODELS = ("tiny-teacher", "tiny-student")


@dataclass
class DistillConfig:
    # models: a local checkpoint folder, or a built-in tiny random-weight model
    teacher: str = "tiny-teacher"
    student: str = "tiny-student"
    tiny_text_model: str = "qwen2"          # text model of the built-in tiny models: qwen2 | qwen3
    # settings of both models' image processors (checkpoint folders), e.g. Qwen-VL's resolution
    # bounds {"min_pixels": 200704, "max_pixels": 1003520} or InternVL's {"max_patches": 6}
    processor_args: dict = field(default_factory=dict)
    # what trains, the same for every family: the student's language model and LM head always;
    # its vision tower and projector (vision features -> language model) unless set false
    train_vision_tower: bool = True
    train_projector: bool = True
    # attention of both language models (vision towers keep sdpa): sdpa | eager |
    # flex_attention (CUDA only: FlexAttention has no backward on CPU). With TPA, flex skips the
    # masked blocks of the expanded sequences, which SDPA computes densely under their mask.
    attn_implementation: str = "sdpa"
    # the frozen teacher with several processes: replicate (whole on every device) | fsdp (sharded
    # with FSDP2 over all processes, 1/N of its weights on each, for a teacher larger than one
    # device; any student engine: DDP, FSDP, DeepSpeed ZeRO)
    teacher_sharding: str = "replicate"
    # data: "synthetic" (built-in visual QA) or a LLaVA-format JSON file
    data: str = "synthetic"
    image_folder: str | None = None         # images of a LLaVA-format JSON (default: its folder)
    # LLaVA samples whose <image> placeholders do not match their images, or with an empty
    # answer: error (naming them) | skip (left out, their ids printed once at the start)
    bad_samples: str = "error"
    synthetic_images: int = 200             # data=synthetic: training images (4 questions each)
    max_length: int = 2048
    output_dir: str = "runs/distill"
    # loss weights: L = w_sft L_SFT + w_kd L_KD + w_iva L_IVA + w_tpa L_TPA (METHOD.md)
    w_sft: float = 1.0
    w_kd: float = 1.0
    w_iva: float = 1.0
    w_tpa: float = 1.0
    divergence: str = "forward"             # forward | reverse | jsd
    beta: float = 0.5                       # JSD weight
    temperature: float = 1.0                # of KD, IVA and TPA alike; no T^2 factor (scale w_* for it)
    # IVA
    iva_layer: Union[int, str] = "auto"     # teacher layer, or "auto" = IRS argmax (cached)
    iva_k: int | None = None                # top-k vision tokens; None with iva_ratio None = all
    iva_ratio: float | None = None          # or a fraction of each sample's vision tokens
    irs_samples: int = 32                   # calibration pairs for iva_layer="auto"
    # IVA's weights over the vision tokens: attention (the teacher's instruction->vision
    # attention at iva_layer, METHOD.md) | uniform (every vision token alike: vision KD without
    # instruction-aware weights, a control; takes no iva_k / iva_ratio)
    iva_weighting: str = "attention"
    # TPA
    tpa_d: int = 4                          # candidates per branched step
    tpa_strategy: str = "sample"            # sample (d distinct tokens, Gumbel-top-d) | topk
    tpa_exclude_ground_truth: bool = True   # candidates never y_t, whose transition KD aligns
    tpa_fraction: float = 0.25              # fraction of response positions branched
    tpa_temperature: float = 1.0            # sampling temperature of the candidates
    tpa_max_per_sample: int | None = None   # cap on branched steps per sample (None = no cap)
    # how the candidates run: prefix_cache (the training forward over the ground truth keeps its
    # keys/values, candidates are drawn from it, then only the candidate tokens run), expanded
    # (one forward over ground truth + candidates, after a no-grad pass that draws them), or
    # auto: prefix_cache where both models allow it (not under gradient checkpointing,
    # sliding-window attention, dynamic RoPE or FlexAttention), else expanded
    tpa_forward: str = "auto"
    # fused KL ops (SFT/KD, IVA, TPA) and TPA's candidate sampling: the scratch budget of one
    # row chunk, in bytes or with a K/M/G suffix ("512M"; null = align_ti.ops.heuristics: 1 GiB
    # on CUDA), and where the LM head's weight gradient accumulates over the chunks: fp32
    # (exact) or, with false, the weight's own dtype (one rounding per chunk, as Liger-Kernel
    # does; less memory and time)
    kl_chunk_bytes: Union[int, str, None] = None
    # single: SFT, KD, IVA and TPA from one fused KL call (one pass over both LM heads, one
    # weight-gradient accumulator); per_term: a call per term (the same loss and gradient)
    kl_pass: str = "single"
    fp32_weight_grad: bool = True
    # optimisation (passed on to transformers.TrainingArguments)
    learning_rate: float = 2e-5
    per_device_train_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    max_steps: int = -1
    num_train_epochs: float = 1.0
    bf16: bool = False
    seed: int = 0
    # anything else TrainingArguments accepts, e.g. {"logging_steps": 5}
    training_args: dict = field(default_factory=dict)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        choices = {
            "divergence": DIVERGENCES,
            "tpa_strategy": TPA_STRATEGIES,
            "tpa_forward": TPA_FORWARDS,
            "kl_pass": KL_PASSES,
            "tiny_text_model": ("qwen2", "qwen3"),
            "attn_implementation": ATTN_IMPLEMENTATIONS,
            "bad_samples": BAD_SAMPLES,
            "iva_weighting": ("attention", "uniform"),
            "teacher_sharding": TEACHER_SHARDINGS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"config {name} must be one of {list(allowed)}, got {getattr(self, name)!r}")
        for name in ("w_sft", "w_kd", "w_iva", "w_tpa"):
            if not 0 <= getattr(self, name) < math.inf:  # NaN fails too
                raise ValueError(f"config {name} must be a finite number >= 0, got {getattr(self, name)}")
        if not any(getattr(self, n) > 0 for n in ("w_sft", "w_kd", "w_iva", "w_tpa")):
            raise ValueError("config: at least one of w_sft, w_kd, w_iva, w_tpa must be > 0")
        if not 0 < self.beta < 1:
            raise ValueError(f"config beta must satisfy 0 < beta < 1, got {self.beta}")
        for name in ("temperature", "tpa_temperature", "learning_rate"):
            if not 0 < getattr(self, name) < math.inf:
                raise ValueError(f"config {name} must be a finite number > 0, got {getattr(self, name)}")
        if self.max_steps <= 0 and not 0 < self.num_train_epochs < math.inf:
            raise ValueError(f"config num_train_epochs must be a finite number > 0 (or set max_steps > 0), "
                             f"got {self.num_train_epochs}")
        if os.path.exists(self.output_dir) and not os.path.isdir(self.output_dir):
            raise ValueError(f"config output_dir: {self.output_dir!r} exists and is not a folder")
        if not 0 < self.tpa_fraction <= 1:
            raise ValueError(f"config tpa_fraction must be in (0, 1], got {self.tpa_fraction}")
        for name in ("tpa_d", "max_length", "per_device_train_batch_size", "gradient_accumulation_steps", "irs_samples",
                     "synthetic_images"):
            if getattr(self, name) <= 0:
                raise ValueError(f"config {name} must be a positive int, got {getattr(self, name)}")
        if self.tpa_max_per_sample is not None and self.tpa_max_per_sample <= 0:
            raise ValueError(f"config tpa_max_per_sample must be a positive int or null, got {self.tpa_max_per_sample}")
        if self.iva_k is not None and self.iva_k <= 0:
            raise ValueError(f"config iva_k must be a positive int or null, got {self.iva_k}")
        if self.iva_k is not None and self.iva_ratio is not None:
            raise ValueError("config: give iva_k or iva_ratio, not both")
        if self.iva_weighting == "uniform" and (self.iva_k is not None or self.iva_ratio is not None):
            raise ValueError("config iva_weighting=uniform weighs every vision token alike; iva_k / iva_ratio "
                             "(a top-k by attention) do not apply: leave them null")
        if self.iva_ratio is not None and not 0 < self.iva_ratio <= 1:
            raise ValueError(f"config iva_ratio must be in (0, 1], got {self.iva_ratio}")
        if self.kl_chunk_bytes is not None:
            from align_ti.ops.heuristics import resolve_chunk_bytes  # imports torch: only when set

            resolve_chunk_bytes(self.kl_chunk_bytes, "config kl_chunk_bytes")
        if isinstance(self.iva_layer, str) and self.iva_layer != "auto":
            raise ValueError(f"config iva_layer must be a layer index or 'auto', got {self.iva_layer!r}")
        for name in ("teacher", "student"):
            value = getattr(self, name)
            if value not in BUILTIN_MODELS and not os.path.isdir(value):
                raise ValueError(
                    f"config {name}: {value!r} is neither a built-in model {list(BUILTIN_MODELS)} "
                    "nor an existing local checkpoint folder"
                )
        if self.data != "synthetic" and not os.path.isfile(self.data):
            raise ValueError(f"config data: {self.data!r} is neither 'synthetic' nor an existing LLaVA-format JSON file")


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(DistillConfig)]


def _coerce(name: str, annotation, value: Any) -> Any:
    """Turn a YAML/JSON value or a command-line string into the field's type."""
    hint = typing.get_type_hints(DistillConfig)[name]
    options = typing.get_args(hint) if typing.get_origin(hint) in (Union, types.UnionType) else (hint,)
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
        if type(None) in options:
            return None
        raise ValueError(f"config {name} cannot be null")
    for kind in options:
        if kind is type(None):
            continue
        if kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
            continue
        if kind is dict:
            if isinstance(value, dict):
                return value
            if isinstance(value, str):
                try:
                    parsed = json.loads(value)
                except json.JSONDecodeError:
                    continue
                if isinstance(parsed, dict):
                    return parsed
            continue
        if kind in (int, float):
            if isinstance(value, bool):
                continue
            if isinstance(value, (int, float)) and (kind is float or float(value).is_integer()):
                return kind(value)
            if isinstance(value, str):
                try:
                    return kind(value)
                except ValueError:
                    continue
            continue
        if kind is str and isinstance(value, str):
            return value
    wanted = " or ".join(getattr(k, "__name__", str(k)) for k in options)
    raise ValueError(f"config {name} must be {wanted}, got {value!r}")


def _check_keys(keys, where: str) -> None:
    valid = field_names()
    unknown = [k for k in keys if k not in valid]
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown} in {where}; valid keys: {', '.join(valid)}")


def load_config(path: str | None = None, overrides: list[str] | None = None) -> DistillConfig:
    """A config from a YAML/JSON file (or the defaults), then `key=value` overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config file {path!r} does not exist")
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if path.endswith(".json"):
            try:
                loaded = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"config file {path!r} is not valid JSON: {e}") from None
        else:
            import yaml

            try:
                loaded = yaml.safe_load(text)
            except yaml.YAMLError as e:
                raise ValueError(f"config file {path!r} is not valid YAML: {e}") from None
        loaded = loaded or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {path!r} must hold a mapping of key: value")
        _check_keys(loaded, path)
        values.update(loaded)
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value")
        key, raw = item.split("=", 1)
        _check_keys([key], "the command line")
        values[key] = raw
    hints = {f.name: f.type for f in dataclasses.fields(DistillConfig)}
    coerced = {k: _coerce(k, hints[k], v) for k, v in values.items()}
    return DistillConfig(**coerced)


def save_config(config: DistillConfig, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(dataclasses.asdict(config), f, indent=2)
