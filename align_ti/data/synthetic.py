"""Procedurally generated visual question answering: the built-in synthetic task.

Why: tests, the `align-ti demo` and the CPU benchmarks need VQA data that is generated in
code (no downloads), is deterministic, is learnable by a tiny model in a few hundred CPU steps,
and *needs* the image: every answer depends on both the picture and the instruction, so the
same image with different instructions has different answers (what IRS measures).

Scenes are a few coloured shapes on a small grid. Questions are only asked when their answer
is well defined (e.g. "What colour is the circle?" only when there is exactly one circle).
Held-out scenes are chosen by a seed-independent hash of the scene, so no held-out image is
ever in any train split, whatever the seeds and sizes.

`write_llava_dataset` writes the task as a LLaVA-format dataset; reading and encoding LLaVA
data (any, this one included) is `align_ti.data.llava`.
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

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


# ----------------------------------------------------------------------------- LLaVA JSON


def write_llava_dataset(
    out_dir, n_images: int, seed: int = 0, split: str = "train",
    questions_per_image: int | None = 4, config: SceneConfig = SceneConfig(),
) -> Path:
    """Write `<out_dir>/<split>.json` (LLaVA format) and PNGs under `<out_dir>/images/`.

    Image paths in the JSON are relative to `out_dir`, so load with
    `align_ti.data.llava.load_llava_json(out_dir / f"{split}.json", image_folder=out_dir)`.
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


# ----------------------------------------------------------------------------- description task
# The `align-ti demo` task (issue #21): multi-token answers that describe objects, so a response
# has prefixes for exposure bias to act on (TPA), and questions about different regions of the
# same image, so the teacher's instruction->vision attention depends on the instruction (IRS).

#: question -> (kind, region); region is a (row, col) -> bool test on a 3x3 grid or None (all)
DESCRIBE_QUESTIONS = {
    "Describe this picture.": ("describe", None),
    "List the shapes in any order.": ("any_order", None),
    "Describe the upper shapes.": ("region", lambda r, c, g: r == 0),
    "Describe the lower shapes.": ("region", lambda r, c, g: r == g - 1),
    "Describe the left shapes.": ("region", lambda r, c, g: c == 0),
    "Describe the right shapes.": ("region", lambda r, c, g: c == g - 1),
}
REGION_QUESTIONS = tuple(q for q, (kind, _) in DESCRIBE_QUESTIONS.items() if kind == "region")
NO_OBJECT = "none"        # the answer of a region with no object in it
OBJECT_SEPARATOR = " and "
DESCRIBE_SPLITS = ("train", "validation", "heldout")


@dataclass(frozen=True)
class DescribeConfig:
    """The description task: scenes of 1-3 objects on a 3x3 grid (48x48 pixels), and per image
    one question of each kind (`describe`: every object, in reading order; `any_order`: every
    object, trained in a random order and scored order-invariantly; `region`: the objects of
    one region, in reading order, or "none"). Splits by a stable hash of the scene: the first
    ``heldout_fraction`` of the hash range is held out, the next ``validation_fraction`` is the
    validation split (settings are chosen there), the rest trains."""

    scene: SceneConfig = SceneConfig(min_objects=1, max_objects=3)
    heldout_fraction: float = 0.2
    validation_fraction: float = 0.1
    region_questions: int = 1          # region questions per image
    empty_region_rate: float = 0.25    # chance that a region question may pick an empty region

    def __post_init__(self):
        if not (0 < self.heldout_fraction and 0 < self.validation_fraction
                and self.heldout_fraction + self.validation_fraction < 1):
            raise ValueError(f"need heldout_fraction, validation_fraction > 0 with a sum < 1, got "
                             f"{self.heldout_fraction}, {self.validation_fraction}")
        if not 0 <= self.region_questions <= len(REGION_QUESTIONS):
            raise ValueError(f"region_questions must be in [0, {len(REGION_QUESTIONS)}], got {self.region_questions}")
        if not 0 <= self.empty_region_rate <= 1:
            raise ValueError(f"empty_region_rate must be in [0, 1], got {self.empty_region_rate}")
        if self.scene.grid != 3:
            raise ValueError(f"the description task needs a 3x3 grid, got grid={self.scene.grid}")


def describe_split(scene: Scene, config: DescribeConfig) -> str:
    """'heldout', 'validation' or 'train', from a stable hash of the scene (no seed)."""
    h = int(hashlib.md5(repr(scene).encode()).hexdigest()[:8], 16) / 2**32
    if h < config.heldout_fraction:
        return "heldout"
    return "validation" if h < config.heldout_fraction + config.validation_fraction else "train"


def describe_object(obj, grid: int = 3) -> str:
    """'red circle top left': colour, shape, position."""
    r, c, shape, colour = obj
    return f"{colour} {shape} {POSITION_NAMES[grid][r][c]}"


def describe_answer(objects: list[str]) -> str:
    return OBJECT_SEPARATOR.join(objects) if objects else NO_OBJECT


def parse_objects(text: str) -> list[str]:
    """The objects an answer names ("none" -> []); anything else splits on " and ", so an
    empty or malformed answer names objects that match nothing."""
    text = " ".join(text.split())
    return [] if text == NO_OBJECT else text.split(OBJECT_SEPARATOR)


def score_answer(prediction: str, item: dict) -> tuple[bool, float]:
    """(exact match, object-level F1) of a generated answer. Exact: the same objects in the
    reference's order, or in any order for an `any_order` item. F1 over the multisets of named
    objects (1 when both name none)."""
    from collections import Counter

    pred, ref = parse_objects(prediction), list(item["objects"])
    exact = Counter(pred) == Counter(ref) if item["kind"] == "any_order" else pred == ref
    if not pred and not ref:
        return exact, 1.0
    hits = sum((Counter(pred) & Counter(ref)).values())
    if hits == 0:
        return exact, 0.0
    precision, recall = hits / len(pred), hits / len(ref)
    return exact, 2 * precision * recall / (precision + recall)


def _describe_scenes(split: str, n_images: int, seed: int, config: DescribeConfig) -> list[Scene]:
    if split not in DESCRIBE_SPLITS:
        raise ValueError(f"split must be one of {list(DESCRIBE_SPLITS)}, got {split!r}")
    rng = random.Random(f"align-ti-describe/{seed}/{split}")
    scenes, seen, misses = [], set(), 0
    while len(scenes) < n_images:
        scene = sample_scene(rng, config.scene)
        if scene not in seen and describe_split(scene, config) == split:
            seen.add(scene)
            scenes.append(scene)
            misses = 0
        elif (misses := misses + 1) > 20_000:
            raise ValueError(f"could not draw {n_images} distinct {split} scenes (got {len(scenes)})")
    return scenes


def _region_questions(rng: random.Random, scene: Scene, config: DescribeConfig) -> list[str]:
    """``config.region_questions`` distinct regions, each non-empty unless the draw allows an
    empty one (``empty_region_rate``) or no non-empty region is left."""
    g = config.scene.grid
    left = list(REGION_QUESTIONS)
    rng.shuffle(left)
    picked = []
    for _ in range(config.region_questions):
        allow_empty = rng.random() < config.empty_region_rate
        test = lambda q: any(DESCRIBE_QUESTIONS[q][1](r, c, g) for r, c, _, _ in scene)  # noqa: E731
        q = next((q for q in left if allow_empty or test(q)), left[0])
        left.remove(q)
        picked.append(q)
    return picked


def describe_vqa(split: str = "train", n_images: int = 200, seed: int = 0,
                 config: DescribeConfig = DescribeConfig()) -> list[dict]:
    """Items of the description task, deterministic in the arguments: ``{"id", "image",
    "image_id", "question", "answer", "kind", "objects"}`` (``objects``: the reference's object
    descriptions in its order). Per image: `describe`, `any_order` (a random order drawn per
    image), then the region questions; items of one image share one PIL image."""
    g = config.scene.grid
    items = []
    for i, scene in enumerate(_describe_scenes(split, n_images, seed, config)):
        image_id = f"describe-{split}-{seed}-{i:05d}"
        image = render_scene(scene, config.scene)
        rng = random.Random(f"align-ti-describe-questions/{seed}/{split}/{i}")
        every = [describe_object(o, g) for o in scene]  # scenes are sorted: reading order
        shuffled = rng.sample(every, len(every))
        qas = [("Describe this picture.", every), ("List the shapes in any order.", shuffled)]
        for q in _region_questions(rng, scene, config):
            qas.append((q, [describe_object(o, g) for o in scene if DESCRIBE_QUESTIONS[q][1](o[0], o[1], g)]))
        for j, (question, objects) in enumerate(qas):
            items.append({"id": f"{image_id}-q{j}", "image": image, "image_id": image_id, "question": question,
                          "answer": describe_answer(objects), "kind": DESCRIBE_QUESTIONS[question][0],
                          "objects": objects})
    return items
