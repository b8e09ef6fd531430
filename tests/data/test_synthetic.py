"""Synthetic VQA: determinism, split hygiene, instruction-dependence, encoding, LLaVA JSON I/O."""
from collections import defaultdict

import numpy as np
import pytest
import torch

from align_ti.data.synthetic import (
    IGNORE_INDEX,
    SceneConfig,
    VQACollator,
    calibration_pairs,
    encode_example,
    load_llava_json,
    pad_batch,
    synthetic_vqa,
    train_heldout_split,
    write_llava_dataset,
)
from align_ti.models.tiny import build_processor


@pytest.fixture(scope="module")
def processor():
    return build_processor()


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


def test_encode_labels_mask(processor):
    tok = processor.tokenizer
    item = synthetic_vqa("train", 1, seed=0)[0]
    ex = encode_example(processor, item, return_instruction_mask=True)
    ids, labels = ex["input_ids"], ex["labels"]
    target = ids[labels != IGNORE_INDEX]
    assert tok.decode(target) == item["answer"] + "<|im_end|>"
    assert target[-1] == tok.eos_token_id and labels[-1] == tok.eos_token_id  # <|im_end|> is a target
    n_target = target.numel()
    assert (labels[:-n_target] == IGNORE_INDEX).all()  # the answer is the contiguous tail
    assert tok.decode(ids[ex["instruction_mask"]]) == item["question"]
    assert (ids == tok.image_token_id).sum() == 36
    assert ex["pixel_values"].shape == (3, 48, 48) and ex["attention_mask"].eq(1).all()
    # Same ids as tokenizing prompt + answer + eos in one go.
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": item["question"]}]}],
        tokenize=False, add_generation_prompt=True,
    )
    whole = processor(images=[item["image"]], text=[prompt + item["answer"] + "<|im_end|>"], return_tensors="pt")
    assert torch.equal(whole["input_ids"][0], ids)
    with pytest.raises(ValueError, match="max_length"):
        encode_example(processor, item, max_length=10)


def test_collator_right_pads(processor):
    items = [x for x in synthetic_vqa("train", 10, seed=0)]
    items = [min(items, key=lambda x: len(x["answer"])), max(items, key=lambda x: len(x["answer"]))]
    batch = VQACollator(processor, return_instruction_mask=True)(items)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "pixel_values", "instruction_mask"}
    lengths = batch["attention_mask"].sum(1)
    assert lengths[0] < lengths[1]  # "top left" is two tokens
    short = int(lengths[0])
    assert (batch["input_ids"][0, short:] == processor.tokenizer.pad_token_id).all()
    assert (batch["labels"][0, short:] == IGNORE_INDEX).all()
    assert not batch["instruction_mask"][0, short:].any()
    assert batch["pixel_values"].shape == (2, 3, 48, 48)
    # Pre-encoded examples collate the same way.
    pre = pad_batch([encode_example(processor, x, return_instruction_mask=True) for x in items],
                    processor.tokenizer.pad_token_id)
    assert all(torch.equal(pre[k], batch[k]) for k in batch)


def test_text_only_item(processor):
    ex = encode_example(processor, {"id": "t", "image": None, "question": "Hi", "answer": "yes"})
    assert "pixel_values" not in ex
    assert processor.tokenizer.decode(ex["input_ids"][ex["labels"] != IGNORE_INDEX]) == "yes<|im_end|>"


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


def test_load_llava_json_general_entries(tmp_path):
    from PIL import Image

    Image.new("RGB", (20, 10), (1, 2, 3)).save(tmp_path / "a.png")
    records = [
        {"id": 7, "image": "a.png", "conversations": [
            {"from": "human", "value": "Describe.\n<image>"}, {"from": "gpt", "value": "A box."},
            {"from": "human", "value": "Colour?"}, {"from": "gpt", "value": "blue"},
        ]},
        {"id": "txt", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
    ]
    (tmp_path / "d.json").write_text(__import__("json").dumps(records))
    items = load_llava_json(tmp_path / "d.json", tmp_path)
    assert [(x["id"], x["question"], x["answer"]) for x in items] == [
        ("7-0", "Describe.", "A box."), ("7-1", "Colour?", "blue"), ("txt", "Hi", "Hello")]
    assert items[0]["image"].size == (20, 10) and items[2]["image"] is None


def test_small_scene_space_fails_clearly():
    with pytest.raises(ValueError, match="could not draw"):
        synthetic_vqa("train", 500, config=SceneConfig(grid=2, min_objects=1, max_objects=1))


def test_pad_batch_mixes_image_and_text_only_examples():
    from align_ti.models.tiny import build_processor, build_tiny_llava

    processor = build_processor()
    with_image = synthetic_vqa("train", 1, seed=3)[0]
    text_only = dict(with_image, image=None, question="Say hi.", answer="hi")
    batch = pad_batch([encode_example(processor, x) for x in (text_only, with_image)],
                      processor.tokenizer.pad_token_id)
    assert batch["pixel_values"].shape[0] == 1  # only the example that has an image
    model = build_tiny_llava("student").eval()
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    pixel_values=batch["pixel_values"])
    assert torch.isfinite(out.logits).all()


def test_load_llava_json_missing_or_unreadable_image_names_file_and_sample(tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "folder.png").mkdir()
    turns = [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "A."}]
    records = [{"id": "a", "image": "a.png", "conversations": turns},
               {"id": "b", "image": "gone.png", "conversations": turns}]
    (tmp_path / "d.json").write_text(__import__("json").dumps(records))
    with pytest.raises(FileNotFoundError) as e:
        load_llava_json(tmp_path / "d.json", tmp_path)
    assert str(e.value) == f"{tmp_path / 'd.json'}: sample 1 (id 'b'): image file {str(tmp_path / 'gone.png')!r} does not exist"
    records[1]["image"] = "folder.png"
    (tmp_path / "d.json").write_text(__import__("json").dumps(records))
    with pytest.raises(ValueError, match=r"sample 1 \(id 'b'\): cannot read image file .*folder.png"):
        load_llava_json(tmp_path / "d.json", tmp_path)
