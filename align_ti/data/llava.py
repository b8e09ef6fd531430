"""LLaVA-format data, generic: any supported processor with a chat template, any LLaVA JSON.

- Encoding for supervised fine-tuning and distillation: `encode_example` (one item -> token ids,
  labels with -100 outside the answers, the image inputs its family's model takes, the
  instruction mask IVA/IRS average attention over), `pad_batch` (right padding), `VQACollator`
  (encodes on the fly).
- Reading a LLaVA-format JSON: `load_llava_json` (one item per conversation, single- or
  multi-turn, images opened once; errors name the file and the sample), `llava_sample_problem`
  (why a sample would not train as written: also video and multi-image samples, not supported
  yet), `open_image`.

Items are dicts ``{"id", "image" (PIL or None), "image_id", "question", "answer"}`` (the first
turn), plus ``"turns"``: ``[(question, answer), ...]`` of a multi-turn conversation and
``"image_turn"``, the turn whose user message holds the image (default 0): what
`load_llava_json` returns and what `align_ti.data.synthetic` generates (single turn).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from PIL import Image

from align_ti.constants import BAD_SAMPLES, IGNORE_INDEX

# ----------------------------------------------------------------------------- encoding


def build_messages(question: str, answer: str | None = None, image: bool = True) -> list[dict]:
    """Chat messages of one turn in the transformers multimodal format (image first, LLaVA style)."""
    return conversation([(question, answer)], image_turn=0 if image else None)


def conversation(turns, image_turn: int | None = 0) -> list[dict]:
    """Chat messages of ``turns`` [(question, answer or None), ...]: a user message per question
    (the image first in turn ``image_turn``; None: no image) and an assistant message per answer
    that is not None."""
    messages = []
    for k, (question, answer) in enumerate(turns):
        content = ([{"type": "image"}] if k == image_turn else []) + [{"type": "text", "text": question}]
        messages.append({"role": "user", "content": content})
        if answer is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


def _template(processor, messages, generation_prompt: bool) -> str:
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _text_ids(processor, text: str) -> list[int]:
    """Token ids of text with each image placeholder still a single token (no expansion)."""
    return processor.tokenizer(text, add_special_tokens=False)["input_ids"]


# sentinels for the questions and answers of a rendered conversation (private-use characters)
_QUESTION, _ANSWER = "\ue000{}\ue001", "\ue002{}\ue003"
_SENTINEL = re.compile("(\ue000\\d+\ue001|\ue002\\d+\ue003)")


def _item_turns(item: dict) -> list[tuple[str, str]]:
    turns = item.get("turns")
    return [tuple(t) for t in turns] if turns else [(item["question"], item["answer"])]


def _render(processor, turns, image_turn) -> tuple[str, list[tuple[int, int]], list[tuple[int, int]]]:
    """The conversation as the chat template renders it, cut after the last answer's end of turn
    (the template's eos; appended when it writes none), with the character spans of the questions
    and of the labelled text (each answer and the end-of-turn eos after it).

    The template renders the conversation once with sentinels in place of the questions and
    answers; the spans are where the sentinels stand. It must reproduce the message text as
    given: the real rendering is checked to be the sentinel one with the text put back."""
    eos = processor.tokenizer.eos_token
    marked = _template(processor, conversation(
        [(_QUESTION.format(k), _ANSWER.format(k)) for k in range(len(turns))], image_turn), False)
    pieces = _SENTINEL.split(marked)
    text, questions, labelled = "", [], []
    for i, piece in enumerate(pieces):
        if i % 2 == 0:  # template text
            text += piece
            continue
        k = int(piece[1:-1])
        content = turns[k][0] if piece[0] == "\ue000" else turns[k][1]
        start = len(text)
        text += content
        if piece[0] == "\ue000":
            questions.append((start, len(text)))
            continue
        after = pieces[i + 1]  # the template text that follows the answer: its end of turn
        end = len(text) + (after.index(eos) + len(eos) if eos in after else 0)
        labelled.append((start, end))
    real = _template(processor, conversation(turns, image_turn), False)
    if real != text:
        raise ValueError("chat template: it changes the message text (rendering with and without markers "
                         "differs), so the answer and question spans cannot be found")
    if len(questions) != len(turns) or len(labelled) != len(turns):
        raise ValueError("chat template: it does not render every question and answer of the conversation")
    start, last = labelled[-1]
    if text[:last].endswith(eos):
        return text[:last], questions, labelled
    labelled[-1] = (start, last + len(eos))  # the template ends the last answer without its eos
    return text[:last] + eos, questions, labelled


def encode_example(processor, item: dict, max_length: int | None = None,
                   return_instruction_mask: bool = False) -> dict[str, torch.Tensor]:
    """Tokenize one item with the processor's chat template for supervised fine-tuning.

    Returns 1-D `input_ids`, `attention_mask` and `labels`, and the image inputs that the
    processor's model family takes (`align_ti.models.families`: e.g. `pixel_values`
    [1, C, H, W] for LLaVA, `pixel_values` [patches, D] + `image_grid_thw` [1, 3] for Qwen-VL),
    as the processor returns them for this one sample (absent for an item whose image is None).
    The sequence is the whole conversation (every turn of ``item["turns"]``, else
    ``question``/``answer``) up to the end-of-turn eos after the last answer (e.g.
    `<|im_end|>`); labels are -100 everywhere except each answer and the eos that ends it.
    `return_instruction_mask=True` adds a bool `instruction_mask` marking the question text
    tokens of every turn (the queries IRS/IVA average attention over).

    The processor runs once, on the whole text (it expands the image placeholder into the model's
    number of image tokens). Span boundaries are found on the unexpanded token ids (checked to be
    prefixes of the whole) and shifted by the expansion before them.
    """
    from align_ti.models.families import family_of

    family = family_of(processor, "processor")
    image = item.get("image")
    has_image = image is not None
    turns = _item_turns(item)
    text, questions, labelled = _render(processor, turns, item.get("image_turn", 0) if has_image else None)

    enc = processor(images=[image] if has_image else None, text=[text], return_tensors="pt")
    input_ids = enc["input_ids"][0]
    if max_length is not None and input_ids.numel() > max_length:
        raise ValueError(f"item {item.get('id')!r}: {input_ids.numel()} tokens > max_length={max_length}")
    raw = _text_ids(processor, text)
    image_id = getattr(processor, "image_token_id", None)
    n_placeholders = sum(t == image_id for t in raw)
    extra = (input_ids.numel() - len(raw)) // max(n_placeholders, 1)  # added per placeholder

    def expanded_len(chars: int) -> int:
        ids = _text_ids(processor, text[:chars])
        if raw[: len(ids)] != ids:
            raise ValueError(f"tokenizer: {text[:chars]!r} does not tokenize to a prefix of the whole text")
        return len(ids) + extra * sum(t == image_id for t in ids)

    def span_mask(spans) -> torch.Tensor:
        mask = torch.zeros_like(input_ids, dtype=torch.bool)
        for start, end in spans:
            mask[expanded_len(start): expanded_len(end)] = True
        return mask

    labels = torch.where(span_mask(labelled), input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    out = {"input_ids": input_ids, "attention_mask": enc["attention_mask"][0], "labels": labels}
    if has_image:
        for key in family.image_inputs:
            if key in enc:
                out[key] = enc[key]
    if return_instruction_mask:
        out["instruction_mask"] = span_mask(questions)
    return out


_PAD_VALUES = {"attention_mask": 0, "labels": IGNORE_INDEX, "instruction_mask": False}


def _concat_padded(values: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate along dim 0, first zero-padding every other dim to the largest (LLaVA-OneVision's
    tiles per image: what its processor does for a batch)."""
    shape = [max(v.shape[d] for v in values) for d in range(1, values[0].dim())]
    padded = []
    for v in values:
        if list(v.shape[1:]) != shape:
            full = v.new_zeros((v.shape[0], *shape))
            full[(slice(None), *(slice(0, n) for n in v.shape[1:]))] = v
            v = full
        padded.append(v)
    return torch.cat(padded)


def pad_batch(examples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad encoded examples to the longest and stack. 1-D values are per-token sequences
    (ids, masks, labels), right-padded; the image inputs (2-D or more: each example's as its
    processor returned them) are concatenated over the examples that have them, in order (what
    the models splice into their image tokens); a batch may mix image and text-only examples."""
    batch = {}
    longest = max(ex["input_ids"].numel() for ex in examples)
    keys = list(dict.fromkeys(k for ex in examples for k in ex))
    for key in keys:
        values = [ex[key] for ex in examples if key in ex]
        if values[0].dim() != 1:
            batch[key] = _concat_padded(values)
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
    image = rec.get("image")
    if image is not None and not (isinstance(image, str) or (
            isinstance(image, list) and all(isinstance(x, str) for x in image))):
        raise ValueError(f"{where}: 'image' must be a path string (or a list of them), got {image!r}")


def _image_paths(rec: dict) -> list[str]:
    """The image paths of a sample: "image" as one path or a list of them."""
    image = rec.get("image")
    return [] if image is None else [image] if isinstance(image, str) else list(image)


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

    Video and multi-image samples are not supported yet. Its image placeholders must match its
    image: one ``image_token`` in its turns with an image, none without (a text-only sample is
    fine). Each answer must be non-empty, and it needs a (human, gpt) turn pair. Otherwise the
    loader would quietly train on something else: the image it re-inserts without the
    placeholder the data meant, a sample whose image is gone, or only the end-of-answer token.
    """
    turns = rec["conversations"]
    if rec.get("video") is not None or any("<video>" in t["value"] for t in turns):
        return "a video sample (video is not supported yet)"
    n_images = len(_image_paths(rec))
    if n_images > 1:
        return f"a multi-image sample ({n_images} images; one image per sample is supported for now)"
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
    """Read a LLaVA-format JSON into item dicts `{"id", "image", "image_id", "question", "answer",
    "turns", "image_turn"}`.

    One item per sample: its (human, gpt) turn pairs in order are ``turns`` [(question, answer),
    ...] (a multi-turn conversation trains as one sequence, labels on every answer), the first
    of them also ``question`` / ``answer``. The image placeholder is removed from the question
    (the chat template re-inserts the image at the start of that turn, ``image_turn``).
    `image_id` is the image path as written in the JSON; entries without an image (and without a
    placeholder) are text-only items with `image=None`. Each image file is opened once and
    shared by its items.

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
        rel = next(iter(_image_paths(rec)), None)
        if rel is not None and rel not in cache:
            cache[rel] = open_image(image_folder / rel, where)
        pairs = _turn_pairs(rec["conversations"])
        turns = [(human["value"].replace(image_token, "").strip(), gpt["value"]) for human, gpt in pairs]
        image_turn = next((k for k, (human, _) in enumerate(pairs) if image_token in human["value"]), 0)
        items.append({"id": str(rec["id"]), "image": None if rel is None else cache[rel], "image_id": rel,
                      "question": turns[0][0], "answer": turns[0][1], "turns": turns, "image_turn": image_turn})
    if bad and bad_samples == "error":
        shown = "; ".join(bad[:5]) + ("; ..." if len(bad) > 5 else "")
        raise ValueError(f"{json_path}: {len(bad)} bad sample(s): {shown} (fix them, or set bad_samples=skip "
                         "to leave them out)")
    return items
