"""Data glue of the trainer: models and processors from a config, the training dataset
(built-in synthetic VQA or a LLaVA-format JSON), the collator, and the checks that teacher
and student can be distilled into each other (shared vocabulary, the same encoding).

Models are local checkpoint folders of any supported family (`align_ti.models.families`:
LLaVA, LLaVA-OneVision, Qwen2-VL / 2.5-VL / 3-VL, InternVL), each with its own processor, or
the built-in tiny LLaVA pair. Every example is encoded once, up front, with the *student's*
processor and chat template (`align_ti.data.llava.encode_example`): token ids, labels (-100
outside the answers), image inputs and the instruction mask (the queries IVA averages attention
over). Teacher and student read the same token ids and image inputs, which is why their
tokenizers must agree on the shared vocabulary and their processors must encode every sample
alike; both are checked here, with errors that say what differs.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from typing import Any

import torch

from align_ti.data.llava import encode_example, load_llava_json, pad_batch

__all__ = [
    "TokenizerMismatchError",
    "load_model_and_processor",
    "check_tokenizers",
    "check_image_expansion",
    "check_same_encoding",
    "check_same_positions",
    "load_items",
    "EncodedDataset",
    "DistillCollator",
]


class TokenizerMismatchError(ValueError):
    """Teacher and student tokenizers disagree on the shared vocabulary or on special tokens."""


# --------------------------------------------------------------------------------------------
# models and processors
# --------------------------------------------------------------------------------------------

def language_model_attention(attn_implementation: str) -> dict:
    """The ``attn_implementation`` mapping for a LLaVA model whose language model uses
    ``attn_implementation`` while its vision tower keeps ``"sdpa"`` (its attention is unmasked,
    and FlexAttention on CUDA needs a head dim of at least 16)."""
    return {"": "sdpa", "vision_config": "sdpa", "text_config": attn_implementation}


def load_model_and_processor(name: str, tiny_text: str = "qwen2", seed: int = 0,
                             dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa",
                             processor_args: dict | None = None):
    """``(model, processor)`` for a config's ``teacher`` / ``student`` entry.

    ``"tiny-teacher"`` / ``"tiny-student"``: the built-in random-weight LLaVA models
    (`align_ti.models.tiny`, weights from ``seed``) with the built-in processor.
    Anything else: a local checkpoint folder of a supported family (its ``config.json`` names
    it; another family is an error listing the supported ones) and its processor
    (``AutoProcessor``, with ``processor_args`` such as Qwen-VL's ``min_pixels`` /
    ``max_pixels``); nothing is downloaded. A family whose processor needs torchvision says so,
    naming the extra, when it is missing.
    ``attn_implementation`` is the language model's (`language_model_attention`).
    """
    from align_ti.models.families import family_of, require_torchvision

    attn_implementation = language_model_attention(attn_implementation)
    if name in ("tiny-teacher", "tiny-student"):
        from align_ti.models.tiny import build_processor, build_tiny_llava

        if processor_args:
            raise ValueError(f"config processor_args {processor_args}: the built-in tiny models' processor "
                             "takes no settings")
        model = build_tiny_llava(name.split("-")[1], text=tiny_text, seed=seed, dtype=dtype,
                                 attn_implementation=attn_implementation)
        return model, build_processor(config=model.config)
    if not os.path.isdir(name):
        raise FileNotFoundError(f"model {name!r}: no such local checkpoint folder (nothing is downloaded)")
    family = family_of(_folder_config(name), f"model {name!r}")
    require_torchvision(family, f"model {name!r}")
    model = family.model_class().from_pretrained(
        name, dtype=dtype, local_files_only=True, attn_implementation=attn_implementation)
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(name, local_files_only=True, **(processor_args or {}))
    except Exception as e:  # a model folder without its processor
        raise FileNotFoundError(
            f"model {name!r}: cannot load its processor (tokenizer + image processor + chat template) "
            f"from the folder: {e}") from e
    if getattr(processor, "chat_template", None) is None and getattr(processor.tokenizer, "chat_template", None) is None:
        raise ValueError(f"model {name!r}: its processor has no chat template; add one to the checkpoint folder")
    family_of(processor, f"model {name!r}: its processor")
    return model, processor


def _folder_config(name: str):
    """The model config of a checkpoint folder, read before any weight (so an unsupported family
    fails at once)."""
    from transformers import AutoConfig

    path = os.path.join(name, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model {name!r}: the folder has no config.json (not a transformers checkpoint)")
    try:
        return AutoConfig.from_pretrained(name, local_files_only=True)
    except (ValueError, KeyError) as e:  # a model_type this transformers does not know
        with open(path, encoding="utf-8") as f:
            kind = json.load(f).get("model_type")
        from align_ti.models.families import family_names

        raise ValueError(f"model {name!r}: model_type {kind!r} is not a supported model family; supported: "
                         f"{', '.join(family_names())} ({e})") from None


def _head_rows(model) -> int:
    return int(model.get_output_embeddings().weight.shape[0])


def check_tokenizers(teacher_processor, student_processor, vocab_size: int | None = None) -> None:
    """Raise `TokenizerMismatchError` unless the two tokenizers map every token id below the
    shared vocabulary size V' (default: the smaller tokenizer) to the same token, and agree on
    the pad, eos and image tokens. KD compares the two models' distributions id by id, so any
    disagreement would silently align the wrong tokens."""
    tt = getattr(teacher_processor, "tokenizer", teacher_processor)
    ts = getattr(student_processor, "tokenizer", student_processor)
    vt, vs = tt.get_vocab(), ts.get_vocab()
    inv_t = {i: t for t, i in vt.items()}
    inv_s = {i: t for t, i in vs.items()}
    shared = min(len(tt), len(ts)) if vocab_size is None else min(vocab_size, len(tt), len(ts))
    bad = [(i, inv_t.get(i), inv_s.get(i)) for i in range(shared) if inv_t.get(i) != inv_s.get(i)]
    problems = []
    if bad:
        shown = ", ".join(f"id {i}: teacher {a!r} vs student {b!r}" for i, a, b in bad[:5])
        problems.append(f"{len(bad)} of the {shared} shared token ids differ ({shown}{', ...' if len(bad) > 5 else ''})")
    for name in ("pad_token", "eos_token"):
        a, b = getattr(tt, name, None), getattr(ts, name, None)
        if a != b:
            problems.append(f"{name}: teacher {a!r} vs student {b!r}")
    ia = getattr(teacher_processor, "image_token", None)
    ib = getattr(student_processor, "image_token", None)
    if ia != ib:
        problems.append(f"image_token: teacher {ia!r} vs student {ib!r}")
    if problems:
        raise TokenizerMismatchError(
            "incompatible tokenizers: teacher and student must share the vocabulary they are "
            "distilled over; " + "; ".join(problems)
            + ". Use a student and teacher from the same tokenizer family (e.g. Qwen2 with Qwen2.5).")


def check_image_expansion(teacher, student) -> None:
    """A first, config-level check before any sample is encoded: both models use the same image
    token id and, where their configs fix it (LLaVA's ``image_seq_length``, InternVL's per tile),
    the same number of image tokens per image (they read the same token ids).
    `check_same_encoding` then compares the encodings themselves."""
    from align_ti.models.families import family_of

    def seq(m):
        c = m.config
        n = getattr(c, "image_seq_length", None)
        if n is None and family_of(m).name == "llava":
            v = c.vision_config
            n = (v.image_size // v.patch_size) ** 2
        return n, family_of(m).image_token_id(c)

    (nt, it), (ns, is_) = seq(teacher), seq(student)
    if nt != ns or it != is_:
        raise ValueError(
            f"teacher and student expand an image differently (teacher {nt} image tokens, id {it}; "
            f"student {ns} image tokens, id {is_}); they must read the same token sequence")


def _processor_fingerprint(processor) -> str:
    """What decides a processor's encoding: its class, image processor settings, chat template and
    tokenizer (its whole definition where it is a fast tokenizer)."""
    tok = processor.tokenizer
    backend = getattr(tok, "backend_tokenizer", None)
    image_processor = getattr(processor, "image_processor", None)
    return json.dumps([type(processor).__name__, type(image_processor).__name__,
                       image_processor.to_dict() if image_processor is not None else None,
                       processor.chat_template if getattr(processor, "chat_template", None) else tok.chat_template,
                       backend.to_str() if backend is not None else sorted(tok.get_vocab().items())],
                      sort_keys=True, default=str)


def _encoding_difference(teacher_enc: dict, student_enc: dict) -> str | None:
    """How two encodings of one sample differ, or None."""
    a, b = teacher_enc["input_ids"], student_enc["input_ids"]
    if a.shape != b.shape or not torch.equal(a, b):
        first = next((i for i, (x, y) in enumerate(zip(a.tolist(), b.tolist())) if x != y), min(len(a), len(b)))
        return (f"token ids differ (teacher {a.numel()} tokens, student {b.numel()}; first difference at position "
                f"{first})")
    for key in sorted(set(teacher_enc) | set(student_enc)):
        if key in ("input_ids", "attention_mask", "labels", "instruction_mask"):
            continue
        x, y = teacher_enc.get(key), student_enc.get(key)
        if x is None or y is None:
            return f"{key}: only the {'teacher' if y is None else 'student'}'s processor gives it"
        if x.shape != y.shape:
            return f"{key}: teacher {list(x.shape)} vs student {list(y.shape)}"
        # a PIL and a torchvision backend of one image processor round apart (~1e-7)
        same = torch.allclose(x.double(), y.double(), rtol=0, atol=1e-5) if x.is_floating_point() else torch.equal(x, y)
        if not same:
            return f"{key}: different values (max |difference| {float((x.double() - y.double()).abs().max()):.3g})"
    return None


def check_same_encoding(teacher_processor, student_processor, items: list[dict]) -> None:
    """Raise ValueError unless the two processors encode every item to the same token ids and the
    same image inputs (floating values to 1e-5): teacher and student read one encoding (the
    student's), so a teacher whose processor tiles, resizes or normalises an image differently,
    or expands it into another number of tokens, would be distilled on inputs it never sees. The
    error names the first sample that differs and how. Processors of the same definition (class,
    image-processor settings, chat template, tokenizer) encode alike by construction: no sample
    is encoded twice."""
    if teacher_processor is student_processor or (
            _processor_fingerprint(teacher_processor) == _processor_fingerprint(student_processor)):
        return
    for item in items:
        t = encode_example(teacher_processor, item)
        s = encode_example(student_processor, item)
        why = _encoding_difference(t, s)
        if why is not None:
            raise ValueError(
                f"teacher and student encode sample {item.get('id')!r} differently: {why}. They must read the "
                "same token sequence: use processors with the same tokenizer, image processor and "
                "resolution settings (config processor_args applies to both)")


def check_same_positions(teacher, student, example: dict) -> None:
    """Raise ValueError unless both models give the encoded ``example`` the same position ids:
    one set (the student's family's) serves both models' forwards and TPA's candidates."""
    from align_ti.models.families import family_of

    batch = pad_batch([{k: v for k, v in example.items() if k != "sample_ids"}], 0)
    pos = []
    for model in (teacher, student):
        family = family_of(model)
        images = family.model_images(batch, torch.float32)
        pos.append(family.position_ids(model, batch["input_ids"], batch["attention_mask"], images))
    if pos[0].shape != pos[1].shape or not torch.equal(pos[0].cpu(), pos[1].cpu()):
        raise ValueError(f"teacher ({type(teacher).__name__}) and student ({type(student).__name__}) give the same "
                         f"tokens different position ids (shapes {list(pos[0].shape)} and {list(pos[1].shape)}): "
                         "distil within one family's position scheme (e.g. multimodal RoPE with multimodal RoPE)")


# --------------------------------------------------------------------------------------------
# datasets
# --------------------------------------------------------------------------------------------

def load_items(data: str, image_folder: str | None = None, synthetic_images: int = 200,
               seed: int = 0, bad_samples: str = "error") -> list[dict]:
    """Raw items ``{"id", "image", "question", "answer", ...}``: the synthetic training split
    (``data="synthetic"``, ``synthetic_images`` images, 4 questions each) or a LLaVA-format JSON
    (images relative to ``image_folder``, default the JSON's folder; text-only samples train
    too). Bad LLaVA samples (`align_ti.data.llava.llava_sample_problem`) are an error naming
    them, or with ``bad_samples="skip"`` left out and reported in one line on stderr."""
    if data == "synthetic":
        from align_ti.data.synthetic import synthetic_vqa

        return synthetic_vqa("train", synthetic_images, seed=seed)
    if not os.path.isfile(data):
        raise FileNotFoundError(f"data {data!r}: no such LLaVA-format JSON file")
    folder = image_folder if image_folder is not None else os.path.dirname(os.path.abspath(data))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"image_folder {folder!r}: no such folder")
    skipped: list[str] = []
    items = load_llava_json(data, folder, bad_samples=bad_samples, skipped=skipped)
    if skipped:
        _report_skipped(data, skipped)
    if not items:
        left = f" ({len(skipped)} bad samples skipped)" if skipped else ""
        raise ValueError(f"data {data!r}: no (human, gpt) conversation turn to train on{left}")
    return items


def _report_skipped(data: str, ids: list[str], shown: int = 20) -> None:
    """One line on stderr, from the first process only (every process loads the data)."""
    if os.environ.get("RANK", "0") != "0":
        return
    listed = ", ".join(ids[:shown]) + (f", ... ({len(ids) - shown} more)" if len(ids) > shown else "")
    print(f"align-ti: data {data!r}: skipped {len(ids)} bad samples: ids {listed} (bad_samples=skip)",
          file=sys.stderr, flush=True)


class EncodedDataset(torch.utils.data.Dataset):
    """Items encoded once (ids, labels, pixel values, instruction mask) plus their index
    ``sample_id`` (TPA keys its random numbers on it, so branches do not depend on batching)."""

    def __init__(self, items: list[dict], processor, max_length: int | None = None):
        self.examples = []
        for i, item in enumerate(items):
            enc = encode_example(processor, item, max_length=max_length, return_instruction_mask=True)
            enc["sample_ids"] = torch.tensor(i, dtype=torch.int64)
            self.examples.append(enc)
        self.items = items

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.examples[i]


@dataclass
class DistillCollator:
    """Right-pads encoded examples (``pad_batch``); ``sample_ids`` become an int64 [B] tensor."""

    pad_token_id: int

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids = torch.stack([f["sample_ids"] for f in features])
        batch = pad_batch([{k: v for k, v in f.items() if k != "sample_ids"} for f in features], self.pad_token_id)
        batch["sample_ids"] = ids
        return batch
