"""Procedurally generated visual question answering, plus LLaVA-format I/O and encoding.

Why: tests, the `align-ti demo` and the CPU benchmarks need VQA data that is generated in
code (no downloads), is deterministic, is learnable by a tiny model in a few hundred CPU steps,
and *needs* the image: every answer depends on both the picture and the instruction, so the
same image with different instructions has different answers (what IRS measures).

Scenes are a few coloured shapes on a small grid. Questions are only asked when their answer
is well defined (e.g. "What colour is the circle?" only when there is exactly one circle).
Held-out scenes are chosen by a seed-independent hash of the scene, so no held-out image is
ever in any train split, whatever the seeds and sizes.

The encoding half (`encode_example`, `VQACollator`, `load_llava_json`) is generic: it works
with any LLaVA-style processor with a chat template, and any LLaVA-format JSON.
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw

IGNORE_INDEX = -100

COLOURS = {
    "red": (220, 50, 50),
    "green": (50, 190, 70),
    "blue": (60, 100, 240),
    "yellow": (240, 220, 50),
}
SHAPES = ("circle", "square", "triangle")
POSITION_NAMES = {
    2: (("top left", "top right"), ("bottom left", "bottom right")),
    3: (("top left", "top", "top right"), ("left", "center", "right"),
        ("bottom left", "bottom", "bottom right")),
}
BACKGROUND = (128, 128, 128)


@dataclass(frozen=True)
class SceneConfig:
    """Scene space. The defaults match the tiny models (48x48 images, 8x8 patches)."""

    image_size: int = 48
    grid: int = 3
    min_objects: int = 2
    max_objects: int = 4
    colours: tuple[str, ...] = tuple(COLOURS)
    shapes: tuple[str, ...] = SHAPES
    heldout_fraction: float = 0.2

    def __post_init__(self):
        if self.grid not in POSITION_NAMES:
            raise ValueError(f"grid must be one of {sorted(POSITION_NAMES)}, got {self.grid}")
        if not 1 <= self.min_objects <= self.max_objects <= self.grid**2:
            raise ValueError(
                f"need 1 <= min_objects ({self.min_objects}) <= max_objects ({self.max_objects}) "
                f"<= grid**2 ({self.grid ** 2})"
            )
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must be in (0, 1), got {self.heldout_fraction}")
        unknown = set(self.colours) - set(COLOURS)
        if unknown or set(self.shapes) - set(SHAPES):
            raise ValueError(f"unknown colours/shapes: {sorted(unknown | (set(self.shapes) - set(SHAPES)))}")


# A scene is a sorted tuple of objects (row, col, shape, colour); one object per cell.
Scene = tuple[tuple[int, int, str, str], ...]


def sample_scene(rng: random.Random, config: SceneConfig) -> Scene:
    n = rng.randint(config.min_objects, config.max_objects)
    cells = rng.sample([(r, c) for r in range(config.grid) for c in range(config.grid)], n)
    return tuple(sorted((r, c, rng.choice(config.shapes), rng.choice(config.colours)) for r, c in cells))


def scene_split(scene: Scene, config: SceneConfig) -> str:
    """'heldout' or 'train', from a stable hash of the scene (independent of any seed)."""
    digest = hashlib.md5(repr(scene).encode()).hexdigest()
    return "heldout" if int(digest[:8], 16) / 2**32 < config.heldout_fraction else "train"


def render_scene(scene: Scene, config: SceneConfig = SceneConfig()) -> Image.Image:
    """Draw the scene (no anti-aliasing, so the pixels are exactly reproducible)."""
    img = Image.new("RGB", (config.image_size, config.image_size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    cell = config.image_size / config.grid
    pad = cell * 0.15
    for r, c, shape, colour in scene:
        x0, y0 = c * cell + pad, r * cell + pad
        x1, y1 = (c + 1) * cell - pad - 1, (r + 1) * cell - pad - 1
        fill = COLOURS[colour]
        if shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            draw.polygon(((x0 + x1) / 2, y0, x1, y1, x0, y1), fill=fill)
    return img


def scene_questions(scene: Scene, config: SceneConfig = SceneConfig()) -> list[tuple[str, str, str]]:
    """All well-defined (question_type, question, answer) triples for a scene."""
    names = POSITION_NAMES[config.grid]
    out = []
    for shape in config.shapes:
        objs = [o for o in scene if o[2] == shape]
        out.append(("count", f"How many {shape}s are there?", str(len(objs))))
        if len(objs) == 1:
            out.append(("colour_of_shape", f"What colour is the {shape}?", objs[0][3]))
    for colour in config.colours:
        objs = [o for o in scene if o[3] == colour]
        if len(objs) == 1:
            r, c, shape, _ = objs[0]
            out.append(("shape_of_colour", f"What shape is {colour}?", shape))
            out.append(("position", f"Where is the {colour} shape?", names[r][c]))
    for r, c, shape, colour in scene:
        out.append(("colour_at", f"What colour is the {names[r][c]} shape?", colour))
    return out


def _pick_questions(rng: random.Random, qas: list, k: int | None) -> list:
    """Up to k questions, spreading over question types and preferring distinct answers."""
    if k is None or k >= len(qas):
        return list(qas)
    pool = list(qas)
    rng.shuffle(pool)
    picked, types, answers = [], set(), set()
    for rank in range(3):  # 0: new type and new answer; 1: new answer; 2: anything
        for qa in pool:
            if len(picked) == k:
                return picked
            fresh_type, fresh_answer = qa[0] not in types, qa[2] not in answers
            if qa not in picked and (rank == 2 or (fresh_answer and (rank == 1 or fresh_type))):
                picked.append(qa)
                types.add(qa[0])
                answers.add(qa[2])
    return picked


def _scenes(split: str, n_images: int, seed: int, config: SceneConfig) -> list[Scene]:
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    rng = random.Random(f"align-ti-synthetic/{seed}/{split}")
    scenes, seen, misses = [], set(), 0
    while len(scenes) < n_images:
        scene = sample_scene(rng, config)
        if scene not in seen and scene_split(scene, config) == split:
            seen.add(scene)
            scenes.append(scene)
            misses = 0
        elif (misses := misses + 1) > 20_000:
            raise ValueError(f"could not draw {n_images} distinct {split} scenes from {config} "
                             f"(got {len(scenes)}); allow more objects or a larger grid")
    return scenes


def synthetic_vqa(
    split: str = "train",
    n_images: int = 200,
    seed: int = 0,
    questions_per_image: int | None = 4,
    config: SceneConfig = SceneConfig(),
) -> list[dict]:
    """VQA items `{"id", "image", "image_id", "question", "answer"}`, deterministic in the args.

    `questions_per_image=None` keeps every well-defined question. Items of one image share
    one PIL image object and are consecutive.
    """
    items = []
    for i, scene in enumerate(_scenes(split, n_images, seed, config)):
        image_id = f"{split}-{seed}-{i:05d}"
        image = render_scene(scene, config)
        rng = random.Random(f"align-ti-questions/{seed}/{split}/{i}")
        for j, (_, question, answer) in enumerate(_pick_questions(rng, scene_questions(scene, config),
                                                                  questions_per_image)):
            items.append({"id": f"{image_id}-q{j}", "image": image, "image_id": image_id,
                          "question": question, "answer": answer})
    return items


def train_heldout_split(n_train: int, n_heldout: int, seed: int = 0, **kwargs) -> tuple[list, list]:
    """(train items, held-out items); held-out images are never in train."""
    return (synthetic_vqa("train", n_train, seed, **kwargs), synthetic_vqa("heldout", n_heldout, seed, **kwargs))


def calibration_pairs(
    n_pairs: int, seed: int = 0, split: str = "train", config: SceneConfig = SceneConfig()
) -> list[tuple[dict, dict]]:
    """IRS calibration pairs: same image, two instructions of different types and answers.

    Uses its own scene stream (seed offset), so it does not repeat the first training images.
    """
    pairs = []
    for i, scene in enumerate(_scenes(split, n_pairs, seed + 1_000_003, config)):
        image_id = f"calib-{split}-{seed}-{i:05d}"
        image = render_scene(scene, config)
        rng = random.Random(f"align-ti-calibration/{seed}/{split}/{i}")
        a, b = _pick_questions(rng, scene_questions(scene, config), 2)
        pairs.append(tuple({"id": f"{image_id}-q{j}", "image": image, "image_id": image_id,
                            "question": qa[1], "answer": qa[2]} for j, qa in enumerate((a, b))))
    return pairs


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


def write_llava_dataset(
    out_dir, n_images: int, seed: int = 0, split: str = "train",
    questions_per_image: int | None = 4, config: SceneConfig = SceneConfig(),
) -> Path:
    """Write `<out_dir>/<split>.json` (LLaVA format) and PNGs under `<out_dir>/images/`.

    Image paths in the JSON are relative to `out_dir`, so load with
    `load_llava_json(out_dir / f"{split}.json", image_folder=out_dir)`.
    """
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    records, written = [], set()
    for item in synthetic_vqa(split, n_images, seed, questions_per_image, config):
        rel = f"images/{item['image_id']}.png"
        if rel not in written:
            item["image"].save(out_dir / rel)
            written.add(rel)
        records.append({"id": item["id"], "image": rel, "conversations": [
            {"from": "human", "value": f"<image>\n{item['question']}"},
            {"from": "gpt", "value": item["answer"]},
        ]})
    path = out_dir / f"{split}.json"
    path.write_text(json.dumps(records, indent=1))
    return path


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


BAD_SAMPLES = ("error", "skip")


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
