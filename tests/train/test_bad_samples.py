"""LLaVA training samples that used to train silently (issue #17): an image without its
`<image>` placeholder, a placeholder without an image, two placeholders for one image, an
empty answer. Each is an error naming the sample by default, or left out with
`bad_samples=skip` (reported once); text-only samples (no image, no placeholder) are
legitimate and train, with IVA over the image samples only."""
import copy
import json

import pytest
import torch

from align_ti.cli import main
from align_ti.data.llava import load_llava_json
from align_ti.data.synthetic import write_llava_dataset
from align_ti.train.build import build_trainer
from align_ti.train.config import load_config
from align_ti.train.data import DistillCollator, load_items
from align_ti.train.loss import count_normalizers
from tests.utils import QUIET, run_config, tiny_pair


def _sample(sid, question, answer="red", image=True):
    rec = {"id": sid, "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}
    if image:
        rec["image"] = "images/train-0-00000.png"
    return rec


TEXT_ONLY = _sample("text-only", "Say the word red.", image=False)
BAD = {  # id -> (record, words of the reason)
    "no-token": (_sample("no-token", "What colour is it?"), "0 <image> placeholder(s) for 1 image(s)"),
    "no-image": (_sample("no-image", "<image>\nWhat colour is it?", image=False),
                 "1 <image> placeholder(s) for 0 image(s)"),
    "two-tokens": (_sample("two-tokens", "<image>\n<image>\nWhat colour is it?"),
                   "2 <image> placeholder(s) for 1 image(s)"),
    "empty-answer": (_sample("empty-answer", "<image>\nWhat colour is it?", answer="  "), "an empty answer"),
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """2 images x 4 questions from the synthetic set (records 0-7)."""
    path = tmp_path_factory.mktemp("llava")
    write_llava_dataset(path, n_images=2, seed=0)
    return path


def _write(folder, name, extra):
    records = json.loads((folder / "train.json").read_text()) + extra
    (folder / name).write_text(json.dumps(records))
    return folder / name


@pytest.mark.parametrize("bad_id", list(BAD))
def test_each_bad_kind_is_an_error_naming_the_sample(folder, bad_id):
    record, reason = BAD[bad_id]
    path = _write(folder, f"{bad_id}.json", [TEXT_ONLY, record])
    with pytest.raises(ValueError) as e:
        load_llava_json(path, folder)
    msg = str(e.value)
    assert f"sample 9 (id {bad_id!r}): {reason}" in msg and str(path) in msg and "bad_samples=skip" in msg
    assert "\n" not in msg


def test_skip_leaves_bad_samples_out_and_keeps_text_only(folder):
    path = _write(folder, "mixed.json", [TEXT_ONLY] + [rec for rec, _ in BAD.values()])
    skipped = []
    items = load_llava_json(path, folder, bad_samples="skip", skipped=skipped)
    assert skipped == list(BAD)
    assert [it["id"] for it in items][-1] == "text-only" and len(items) == 9
    assert items[-1]["image"] is None and items[-1]["question"] == "Say the word red."
    with pytest.raises(ValueError, match="bad_samples must be one of"):
        load_llava_json(path, folder, bad_samples="drop")


def test_config_key_bad_samples():
    assert load_config().bad_samples == "error"
    assert load_config(overrides=["bad_samples=skip"]).bad_samples == "skip"
    with pytest.raises(ValueError, match=r"config bad_samples must be one of \['error', 'skip'\], got 'drop'"):
        load_config(overrides=["bad_samples=drop"])


def test_skipped_samples_are_reported_once(folder, capsys):
    path = _write(folder, "mixed.json", [TEXT_ONLY] + [rec for rec, _ in BAD.values()])
    items = load_items(str(path), bad_samples="skip")
    assert len(items) == 9
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"align-ti: data {str(path)!r}: skipped 4 bad samples: ids no-token, no-image, two-tokens, "
                   "empty-answer (bad_samples=skip)"]
    only_bad = folder / "only-bad.json"
    only_bad.write_text(json.dumps([rec for rec, _ in BAD.values()]))
    with pytest.raises(ValueError, match=r"no \(human, gpt\) conversation turn to train on \(4 bad samples skipped\)"):
        load_items(str(only_bad), bad_samples="skip")


def test_distill_refuses_or_skips_bad_samples(folder, tmp_path, capsys):
    path = _write(folder, "mixed.json", [TEXT_ONLY] + [rec for rec, _ in BAD.values()])
    args = ["distill", f"data={path}", f"output_dir={tmp_path / 'run'}", "max_steps=1", "iva_layer=1",
            "per_device_train_batch_size=13", f"training_args={json.dumps(QUIET)}"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "4 bad sample(s)" in err
    assert all(f"(id {i!r})" in err for i in BAD)
    assert main(args + ["bad_samples=skip"]) == 0
    out, err = capsys.readouterr()
    assert err.count("skipped 4 bad samples: ids no-token, no-image, two-tokens, empty-answer") == 1
    assert "train_loss" in out and "nan" not in out


@pytest.fixture(scope="module")
def models():
    return tiny_pair()


def test_text_only_samples_train_and_iva_counts_image_samples(folder, tmp_path, models):
    teacher, student, processor = models
    texts = [dict(TEXT_ONLY, id=f"text-{i}", conversations=[
        {"from": "human", "value": q}, {"from": "gpt", "value": a}])
        for i, (q, a) in enumerate([("Say the word red.", "red"), ("Name a shape.", "circle")])]
    path = _write(folder, "with-text.json", texts)
    items = load_items(str(path))
    assert sum(it["image"] is None for it in items) == 2 and len(items) == 10
    cfg = run_config(tmp_path / "run", data=path, per_device_train_batch_size=5)
    trainer = build_trainer(cfg, student=copy.deepcopy(student), teacher=teacher, processor=processor,
                            teacher_processor=processor, items=items)
    module = trainer.model

    # a batch mixing text-only and image samples: pixel_values holds only the images present,
    # IVA counts and averages over the image samples alone (the same value without the texts)
    data = trainer.train_dataset
    collate = DistillCollator(processor.tokenizer.pad_token_id)
    mixed = collate([data[0], data[8], data[4], data[9]])
    images_only = collate([data[0], data[4]])
    assert mixed["pixel_values"].shape[0] == 2
    assert count_normalizers(mixed, module.spec, module.image_token_id)[1] == 2
    with torch.no_grad():
        both = module(**mixed)["terms"]
        alone = module(**images_only)["terms"]
        texts_only = module(**collate([data[8], data[9]]))["terms"]
    torch.testing.assert_close(both["iva"], alone["iva"], rtol=1e-5, atol=1e-6)
    assert texts_only["iva"] == 0 and all(torch.isfinite(v) and v > 0 for k, v in texts_only.items() if k != "iva")

    trainer.train()  # two steps of all four terms over data that includes text-only samples
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2
    for rec in logs:
        assert all(torch.isfinite(torch.tensor(rec[f"loss_{t}"])) for t in ("sft", "kd", "iva", "tpa"))
