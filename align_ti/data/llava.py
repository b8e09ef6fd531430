"""LLaVA-format data, generic: any LLaVA-style processor with a chat template, any LLaVA JSON.

- Encoding for supervised fine-tuning and distillation: `encode_example` (one item -> token ids,
  labels with -100 outside the answer, pixel values, the instruction mask IVA/IRS average
  attention over), `pad_batch` (right padding), `VQACollator` (encodes on the fly).
- Reading a LLaVA-format JSON: `load_llava_json` (one item per (human, gpt) turn pair, images
  opened once; errors name the file and the sample), `llava_sample_problem` (why a sample would
  not train as written), `open_image`.

Items are dicts ``{"id", "image" (PIL or None), "image_id", "question", "answer"}``: what
`load_llava_json` returns and what `align_ti.data.synthetic` generates.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image

from align_ti.constants import BAD_SAMPLES, IGNORE_INDEX

# ----------------------------------------------------------------------------- encoding


def build_messages(question: str, answer: str | None = None, image: bool = True) -> list[dict]:
    """Chat messages in the transformers multimodal format (image first, LLaVA style)."""
    content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": question}]
    messages = [{"role": "user", "content": content}]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


def _template(processor, messages, generation_prompt: bool) -> str:
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _text_ids(processor, text: str) -> list[int]:
    """Token ids of text with each image placeholder still a single token (no expansion)."""
    return processor.tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_example(processor, item: dict, max_length: int | None = None,
                   return_instruction_mask: bool = False) -> dict[str, torch.Tensor]:
    """Tokenize one item with the processor's chat template for supervised fine-tuning.

    Returns 1-D `input_ids`, `attention_mask`, `labels` and `pixel_values` [C, H, W] (absent
    for an item whose image is None). The sequence is prompt + answer + eos (the first eos
    the template puts after the answer, e.g. `<|im_end|>`); labels are -100 everywhere except
    the answer and that eos. `return_instruction_mask=True` adds a bool `instruction_mask`
    marking the question text tokens (the queries IRS/IVA average attention over).

    The processor runs once, on the whole text (it expands each image placeholder into the
    model's number of image tokens). Span boundaries are found on the unexpanded token ids
    (checked to be prefixes of the whole) and shifted by the expansion before them.
    """
    image, question, answer = item.get("image"), item["question"], item["answer"]
    has_image = image is not None
    eos = processor.tokenizer.eos_token
    prompt = _template(processor, build_messages(question, image=has_image), True)
    full = _template(processor, build_messages(question, answer, image=has_image), False)
    if not full.startswith(prompt):
        raise ValueError("chat template: the rendered prompt is not a prefix of the full conversation")
    target = full[len(prompt):]
    text = prompt + (target[: target.index(eos) + len(eos)] if eos in target else target + eos)

    enc = processor(images=[image] if has_image else None, text=[text], return_tensors="pt")
    input_ids = enc["input_ids"][0]
    if max_length is not None and input_ids.numel() > max_length:
        raise ValueError(f"item {item.get('id')!r}: {input_ids.numel()} tokens > max_length={max_length}")
    raw = _text_ids(processor, text)
    image_id = getattr(processor, "image_token_id", None)
    n_placeholders = sum(t == image_id for t in raw)
    extra = (input_ids.numel() - len(raw)) // max(n_placeholders, 1)  # added per placeholder

    def expanded_len(prefix: str) -> int:
        ids = _text_ids(processor, prefix)
        if raw[: len(ids)] != ids:
            raise ValueError(f"tokenizer: {prefix!r} does not tokenize to a prefix of the whole text")
        return len(ids) + extra * sum(t == image_id for t in ids)

    labels = input_ids.clone()
    labels[: expanded_len(prompt)] = IGNORE_INDEX
    out = {"input_ids": input_ids, "attention_mask": enc["attention_mask"][0], "labels": labels}
    if has_image:
        out["pixel_values"] = enc["pixel_values"][0]
    if return_instruction_mask:
        sentinel = "\ue000"
        before = _template(processor, build_messages(sentinel, image=has_image), True).split(sentinel)[0]
        mask = torch.zeros_like(input_ids, dtype=torch.bool)
        mask[expanded_len(before): expanded_len(before + question)] = True
        out["instruction_mask"] = mask
    return out


_PAD_VALUES = {"attention_mask": 0, "labels": IGNORE_INDEX, "instruction_mask": False}


def pad_batch(examples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad encoded examples to the longest and stack. `pixel_values` holds the images of
    the examples that have one, in order (what Llava splices into its image tokens); a batch
    may mix image and text-only examples."""
    batch = {}
    longest = max(ex["input_ids"].numel() for ex in examples)
    keys = list(dict.fromkeys(k for ex in examples for k in ex))
    for key in keys:
        if key == "pixel_values":
            batch[key] = torch.stack([ex[key] for ex in examples if key in ex])
            continue
        values = [ex[key] for ex in examples]
        fill = pad_token_id if key == "input_ids" else _PAD_VALUES.get(key, 0)
        out = torch.full((len(values), longest), fill, dtype=values[0].dtype)
        for i, v in enumerate(values):
            out[i, : v.numel()] = v
        batch[key] = out
    return batch


class VQACollator:
    """`data_collator` for item dicts (encoded on the fly) or already-encoded examples."""

    def __init__(self, processor, max_length: int | None = None, return_instruction_mask: bool = False):
        self.processor = processor
        self.max_length = max_length
        self.return_instruction_mask = return_instruction_mask

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        encoded = [
            f if "input_ids" in f else encode_example(self.processor, f, self.max_length,
                                                      self.return_instruction_mask)
            for f in features
        ]
        return pad_batch(encoded, self.processor.tokenizer.pad_token_id)


# ----------------------------------------------------------------------------- LLaVA JSON


def _check_llava_record(rec, where: str) -> None:
    """A LLaVA sample: {"id", "image" (optional), "conversations": [{"from", "value"}, ...]}."""
    if not isinstance(rec, dict):
        raise ValueError(f"{where} must be a JSON object, got {type(rec).__name__}")
    missing = [key for key in ("id", "conversations") if key not in rec]
    if missing:
        raise ValueError(f"{where} has no {' / '.join(repr(m) for m in missing)} "
                         f"(LLaVA format: {{'id', 'image', 'conversations': [{{'from', 'value'}}, ...]}})")
    turns = rec["conversations"]
    if not isinstance(turns, list) or not all(
            isinstance(t, dict) and isinstance(t.get("from"), str) and isinstance(t.get("value"), str)
            for t in turns):
        raise ValueError(f"{where}: 'conversations' must be a list of {{'from': str, 'value': str}} turns")
    if rec.get("image") is not None and not isinstance(rec["image"], str):
        raise ValueError(f"{where}: 'image' must be a path string, got {rec['image']!r}")



def open_image(path, where: str) -> Image.Image:
    """The image file at ``path`` as RGB. A missing file raises FileNotFoundError, an unreadable
    one (a folder, not an image, no permission) ValueError; both name ``where`` (the sample) and
    the file."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise FileNotFoundError(f"{where}: image file {str(path)!r} does not exist") from None
    except OSError as e:  # IsADirectoryError, PermissionError, PIL.UnidentifiedImageError, truncated
        raise ValueError(f"{where}: cannot read image file {str(path)!r}: {e}") from None


def llava_sample_problem(rec: dict, image_token: str = "<image>") -> str | None:
    """Why a (well-formed) LLaVA sample would not train as written, or None.

    Its image placeholders must match its images: one ``image_token`` in its turns with an
    image, none without (a text-only sample is fine). Each answer must be non-empty, and it
    needs a (human, gpt) turn pair. Otherwise the loader would quietly train on something else:
    the image it re-inserts without the placeholder the data meant, a sample whose image is
    gone, or only the end-of-answer token.
    """
    turns = rec["conversations"]
    n_images = 0 if rec.get("image") is None else 1
    n_tokens = sum(t["value"].count(image_token) for t in turns)
    if n_tokens != n_images:
        return f"{n_tokens} {image_token} placeholder(s) for {n_images} image(s)"
    if any(t["from"] == "gpt" and not t["value"].strip() for t in turns):
        return "an empty answer"
    if not _turn_pairs(turns):
        return "no (human, gpt) turn pair"
    return None


def _turn_pairs(turns: list[dict]) -> list[tuple[dict, dict]]:
    return [(turns[k], turns[k + 1]) for k in range(0, len(turns) - 1, 2)
            if turns[k]["from"] == "human" and turns[k + 1]["from"] == "gpt"]


def load_llava_json(json_path, image_folder, image_token: str = "<image>", bad_samples: str = "error",
                    skipped: list | None = None) -> list[dict]:
    """Read a LLaVA-format JSON into item dicts `{"id", "image", "image_id", "question", "answer"}`.

    One item per (human, gpt) turn pair; an entry with several pairs gives ids `<id>-<k>`.
    The image placeholder is removed from the question (the chat template re-inserts the
    image). `image_id` is the image path as written in the JSON; entries without an image
    (and without a placeholder) are text-only items with `image=None`. Each image file is
    opened once and shared by its items.

    Errors name the file and the sample (index and id): a malformed file or sample raises
    ValueError, a missing image file FileNotFoundError. A sample that would not train as
    written (`llava_sample_problem`: placeholders that do not match its images, an empty
    answer) is an error with ``bad_samples="error"`` (all of them in one message) and left out
    with ``bad_samples="skip"``, its id appended to ``skipped`` when a list is given.
    """
    if bad_samples not in BAD_SAMPLES:
        raise ValueError(f"bad_samples must be one of {list(BAD_SAMPLES)}, got {bad_samples!r}")
    try:
        records = json.loads(Path(json_path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{json_path}: not valid JSON ({e})") from None
    if not isinstance(records, list):
        raise ValueError(f"{json_path}: a LLaVA-format file holds a JSON list of samples, got "
                         f"{type(records).__name__}")
    image_folder = Path(image_folder)
    cache: dict[str, Image.Image] = {}
    items, bad = [], []
    for i, rec in enumerate(records):
        where = f"{json_path}: sample {i}"
        _check_llava_record(rec, where)
        where += f" (id {rec['id']!r})"
        problem = llava_sample_problem(rec, image_token)
        if problem is not None:
            bad.append(f"sample {i} (id {rec['id']!r}): {problem}")
            if skipped is not None and bad_samples == "skip":
                skipped.append(str(rec["id"]))
            continue
        rel = rec.get("image")
        if rel is not None and rel not in cache:
            cache[rel] = open_image(image_folder / rel, where)
        image = None if rel is None else cache[rel]
        pairs = _turn_pairs(rec["conversations"])
        for k, (human, gpt) in enumerate(pairs):
            question = human["value"].replace(image_token, "").strip()
            items.append({"id": str(rec["id"]) if len(pairs) == 1 else f"{rec['id']}-{k}", "image": image,
                          "image_id": rel, "question": question, "answer": gpt["value"]})
    if bad and bad_samples == "error":
        shown = "; ".join(bad[:5]) + ("; ..." if len(bad) > 5 else "")
        raise ValueError(f"{json_path}: {len(bad)} bad sample(s): {shown} (fix them, or set bad_samples=skip "
                         "to leave them out)")
    return items
