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


# ---- the description task (align-ti demo, issue #21) ---------------------------------------

from align_ti.data.synthetic import (  # noqa: E402
    DescribeConfig,
    describe_vqa,
    parse_objects,
    score_answer,
)


def test_describe_splits_share_no_image_and_are_deterministic():
    splits = {name: describe_vqa(name, 60, seed=0) for name in ("train", "validation", "heldout")}
    pixels = {name: {_pixels(x["image"]) for x in items} for name, items in splits.items()}
    assert all(len(p) == 60 for p in pixels.values())
    assert not pixels["train"] & pixels["validation"] and not pixels["train"] & pixels["heldout"]
    assert not pixels["validation"] & pixels["heldout"]
    again = describe_vqa("heldout", 60, seed=0)
    assert [(x["id"], x["answer"]) for x in again] == [(x["id"], x["answer"]) for x in splits["heldout"]]
    with pytest.raises(ValueError, match="split"):
        describe_vqa("test", 3)


def test_describe_answers_are_object_lists_in_reading_order():
    items = describe_vqa("train", 80, seed=1)
    by_image = defaultdict(list)
    for x in items:
        by_image[x["image_id"]].append(x)
    lengths = []
    for qs in by_image.values():
        describe, any_order, region = qs
        assert (describe["kind"], any_order["kind"], region["kind"]) == ("describe", "any_order", "region")
        assert 1 <= len(describe["objects"]) <= 3
        assert sorted(any_order["objects"]) == sorted(describe["objects"])
        assert set(region["objects"]) <= set(describe["objects"])
        assert region["answer"] == (" and ".join(region["objects"]) or "none")
        # reading order: "top ..." before "center"/"left"/"right" before "bottom ..."
        rows = [0 if o.split()[2] == "top" else 2 if o.split()[2] == "bottom" else 1 for o in describe["objects"]]
        assert rows == sorted(rows)
        lengths.append(len(describe["answer"].split()))
    assert max(lengths) >= 10  # multi-token answers: up to three objects of 3-4 words joined by "and"
    # the same image asks about different regions of itself across images of the set
    assert len({x["question"] for x in items if x["kind"] == "region"}) == 4
    # any-order answers are not always in reading order (valid off-reference orders exist)
    assert any(x["objects"] != qs[0]["objects"] for qs in by_image.values() for x in qs[1:2])


def test_score_answer():
    item = {"kind": "describe", "objects": ["red circle top left", "blue square center"]}
    assert score_answer("red circle top left and blue square center", item) == (True, 1.0)
    assert score_answer("blue square center and red circle top left", item) == (False, 1.0)
    assert score_answer("blue square center and red circle top left", {**item, "kind": "any_order"}) == (True, 1.0)
    exact, f1 = score_answer("red circle top left", item)
    assert not exact and f1 == pytest.approx(2 * 1.0 * 0.5 / 1.5)
    assert score_answer("", item) == (False, 0.0)
    assert score_answer("red circle top left and red circle top left", {**item, "kind": "any_order"})[0] is False
    empty = {"kind": "region", "objects": []}
    assert score_answer("none", empty) == (True, 1.0)
    assert score_answer("", empty) == (False, 0.0)
    assert score_answer("red circle top left", empty) == (False, 0.0)
    assert parse_objects(" red  circle top left and none ") == ["red circle top left", "none"]


def test_describe_config_validation():
    with pytest.raises(ValueError, match="validation_fraction"):
        DescribeConfig(heldout_fraction=0.5, validation_fraction=0.5)
    with pytest.raises(ValueError, match="region_questions"):
        DescribeConfig(region_questions=5)
    with pytest.raises(ValueError, match="3x3"):
        DescribeConfig(scene=SceneConfig(grid=2, max_objects=3))
    two = describe_vqa("train", 10, config=DescribeConfig(region_questions=2))
    assert len(two) == 40 and len({x["question"] for x in two[2:4]}) == 2
