"""Synthetic VQA: determinism, split hygiene, instruction-dependence, calibration pairs, and
the LLaVA-format writer (read back by align_ti.data.llava)."""
from collections import defaultdict

import numpy as np
import pytest

from align_ti.data.llava import load_llava_json
from align_ti.data.synthetic import (
    SceneConfig,
    calibration_pairs,
    synthetic_vqa,
    train_heldout_split,
    write_llava_dataset,
)


def _pixels(image):
    return np.asarray(image).tobytes()


def test_deterministic():
    a, b = synthetic_vqa("train", 20, seed=5), synthetic_vqa("train", 20, seed=5)
    assert [(x["id"], x["question"], x["answer"]) for x in a] == [(x["id"], x["question"], x["answer"]) for x in b]
    assert all(_pixels(x["image"]) == _pixels(y["image"]) for x, y in zip(a, b))
    c = synthetic_vqa("train", 20, seed=6)
    assert {_pixels(x["image"]) for x in a} != {_pixels(x["image"]) for x in c}
    assert set(a[0]) == {"id", "image", "image_id", "question", "answer"}
    assert a[0]["image"].size == (48, 48) and a[0]["image"].mode == "RGB"
    assert len({x["id"] for x in a}) == len(a)


def test_heldout_images_never_in_train():
    train, heldout = train_heldout_split(150, 40, seed=0)
    train_other_seed = synthetic_vqa("train", 150, seed=1)
    train_pixels = {_pixels(x["image"]) for x in train + train_other_seed}
    heldout_pixels = {_pixels(x["image"]) for x in heldout}
    assert len(heldout_pixels) == 40 and len({_pixels(x["image"]) for x in train}) == 150
    assert not train_pixels & heldout_pixels
    assert not {x["image_id"] for x in train} & {x["image_id"] for x in heldout}


def test_answers_depend_on_the_instruction_and_the_image():
    items = synthetic_vqa("train", 100, seed=0)
    by_image = defaultdict(list)
    for x in items:
        by_image[x["image_id"]].append(x)
    # Same image, different questions -> different answers (every image here).
    assert all(len({x["question"] for x in xs}) == len(xs) >= 2 for xs in by_image.values())
    assert all(len({x["answer"] for x in xs}) >= 2 for xs in by_image.values())
    # Same question, different images -> different answers: the question alone does not decide.
    by_question = defaultdict(set)
    for x in items:
        by_question[x["question"]].add(x["answer"])
    frequent = [q for q in by_question if sum(x["question"] == q for x in items) >= 5]
    assert frequent and all(len(by_question[q]) >= 2 for q in frequent)
    # Answers are short.
    assert all(1 <= len(x["answer"].split()) <= 2 for x in items)


def test_scene_config_validation():
    with pytest.raises(ValueError, match="grid"):
        SceneConfig(grid=5)
    with pytest.raises(ValueError, match="max_objects"):
        SceneConfig(grid=2, max_objects=5)
    items = synthetic_vqa("heldout", 5, seed=0, config=SceneConfig(image_size=32, grid=2, max_objects=3))
    assert items[0]["image"].size == (32, 32)


def test_calibration_pairs():
    pairs = calibration_pairs(12, seed=0)
    assert len(pairs) == 12
    for a, b in pairs:
        assert a["image"] is b["image"] and a["image_id"] == b["image_id"]
        assert a["question"] != b["question"] and a["answer"] != b["answer"]
    assert [p[0]["question"] for p in pairs] == [p[0]["question"] for p in calibration_pairs(12, seed=0)]


def test_llava_json_round_trip(tmp_path):
    path = write_llava_dataset(tmp_path, n_images=6, seed=2, split="heldout")
    assert path == tmp_path / "heldout.json"
    original = synthetic_vqa("heldout", 6, seed=2)
    loaded = load_llava_json(path, image_folder=tmp_path)
    assert len(loaded) == len(original)
    for a, b in zip(original, loaded):
        assert (a["id"], a["question"], a["answer"]) == (b["id"], b["question"], b["answer"])
        assert _pixels(a["image"]) == _pixels(b["image"])
        assert b["image_id"] == f"images/{a['image_id']}.png"
    # Items of one image share one loaded image.
    assert loaded[0]["image"] is loaded[1]["image"] and loaded[0]["image_id"] == loaded[1]["image_id"]


def test_small_scene_space_fails_clearly():
    with pytest.raises(ValueError, match="could not draw"):
        synthetic_vqa("train", 500, config=SceneConfig(grid=2, min_objects=1, max_objects=1))
