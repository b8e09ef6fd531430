"""LLaVA-format data: encoding (labels, instruction mask, text-only items, multi-turn), padding
and the collator, and reading LLaVA JSON (general entries, multi-turn, video and multi-image
samples refused, missing or unreadable images)."""
import json
import re

import pytest
import torch
from PIL import Image

from align_ti.constants import IGNORE_INDEX
from align_ti.data.llava import VQACollator, encode_example, load_llava_json, pad_batch
from align_ti.data.synthetic import synthetic_vqa
from align_ti.models.tiny import build_tiny_llava


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
    assert ex["pixel_values"].shape == (1, 3, 48, 48) and ex["attention_mask"].eq(1).all()
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


def test_load_llava_json_general_entries(tmp_path):
    Image.new("RGB", (20, 10), (1, 2, 3)).save(tmp_path / "a.png")
    records = [
        {"id": 7, "image": "a.png", "conversations": [
            {"from": "human", "value": "Describe.\n<image>"}, {"from": "gpt", "value": "A box."},
            {"from": "human", "value": "Colour?"}, {"from": "gpt", "value": "blue"},
        ]},
        {"id": "txt", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
    ]
    (tmp_path / "d.json").write_text(json.dumps(records))
    items = load_llava_json(tmp_path / "d.json", tmp_path)
    assert [(x["id"], x["question"], x["answer"]) for x in items] == [
        ("7", "Describe.", "A box."), ("txt", "Hi", "Hello")]
    assert items[0]["turns"] == [("Describe.", "A box."), ("Colour?", "blue")] and items[0]["image_turn"] == 0
    assert items[0]["image"].size == (20, 10) and items[1]["image"] is None


def test_pad_batch_mixes_image_and_text_only_examples(processor):
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
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "folder.png").mkdir()
    turns = [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "A."}]
    records = [{"id": "a", "image": "a.png", "conversations": turns},
               {"id": "b", "image": "gone.png", "conversations": turns}]
    (tmp_path / "d.json").write_text(json.dumps(records))
    with pytest.raises(FileNotFoundError) as e:
        load_llava_json(tmp_path / "d.json", tmp_path)
    assert str(e.value) == f"{tmp_path / 'd.json'}: sample 1 (id 'b'): image file {str(tmp_path / 'gone.png')!r} does not exist"
    records[1]["image"] = "folder.png"
    (tmp_path / "d.json").write_text(json.dumps(records))
    with pytest.raises(ValueError, match=r"sample 1 \(id 'b'\): cannot read image file .*folder.png"):
        load_llava_json(tmp_path / "d.json", tmp_path)


def test_multi_turn_labels_every_answer_and_marks_every_question(processor):
    item = dict(synthetic_vqa("train", 1, seed=0)[0], turns=[("What colour is it?", "red"), ("Where is it?", "top left")],
                image_turn=1)
    ex = encode_example(processor, item, return_instruction_mask=True)
    tok = processor.tokenizer
    ids, labels = ex["input_ids"], ex["labels"]
    assert tok.decode(ids[labels != IGNORE_INDEX]) == "red<|im_end|>top left<|im_end|>"
    assert tok.decode(ids[ex["instruction_mask"]]) == "What colour is it?Where is it?"
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": "What colour is it?"}]},
         {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
         {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Where is it?"}]},
         {"role": "assistant", "content": [{"type": "text", "text": "top left"}]}], tokenize=False)
    whole = processor(images=[item["image"]], text=[text.removesuffix("\n")], return_tensors="pt")
    assert torch.equal(whole["input_ids"][0], ids)  # the image in the second turn, the tail cut after the eos
    first_answer = int(torch.nonzero(labels != IGNORE_INDEX)[0])
    assert (ids[:first_answer] == tok.image_token_id).sum() == 0  # the image comes after the first answer


def test_pad_batch_concatenates_image_inputs_padding_tiles():
    a = {"input_ids": torch.tensor([5, 6, 7]), "pixel_values": torch.ones(1, 2, 3), "image_sizes": torch.tensor([[4, 4]])}
    b = {"input_ids": torch.tensor([5])}
    c = {"input_ids": torch.tensor([5, 6]), "pixel_values": torch.full((1, 4, 3), 2.0),
         "image_sizes": torch.tensor([[8, 4]])}
    batch = pad_batch([a, b, c], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0], [5, 6, 0]]
    assert batch["pixel_values"].shape == (2, 4, 3)  # the examples with an image; tiles padded to the most
    assert batch["pixel_values"][0, 2:].eq(0).all() and batch["pixel_values"][0, :2].eq(1).all()
    assert batch["image_sizes"].tolist() == [[4, 4], [8, 4]]


@pytest.mark.parametrize("record, problem", [
    ({"video": "v.mp4", "conversations": [{"from": "human", "value": "<video>\nQ?"}, {"from": "gpt", "value": "A."}]},
     "a video sample (video is not supported yet)"),
    ({"image": ["a.png", "a.png"], "conversations": [{"from": "human", "value": "<image><image>\nQ?"},
                                                     {"from": "gpt", "value": "A."}]},
     "a multi-image sample (2 images; one image per sample is supported for now)"),
])
def test_video_and_multi_image_samples_are_refused(tmp_path, record, problem):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    ok = {"id": "ok", "image": ["a.png"], "conversations": [{"from": "human", "value": "<image>\nQ?"},
                                                             {"from": "gpt", "value": "A."}]}
    (tmp_path / "d.json").write_text(json.dumps([ok, {"id": "x", **record}]))
    with pytest.raises(ValueError, match=rf"1 bad sample\(s\): sample 1 \(id 'x'\): {re.escape(problem)}"):
        load_llava_json(tmp_path / "d.json", tmp_path)
    skipped = []
    items = load_llava_json(tmp_path / "d.json", tmp_path, bad_samples="skip", skipped=skipped)
    assert [it["id"] for it in items] == ["ok"] and skipped == ["x"]  # a one-image list is one image
