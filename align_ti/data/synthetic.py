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
