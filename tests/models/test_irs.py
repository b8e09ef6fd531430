"""IRS over a calibration set: against the eager output_attentions + reference pipeline,
calibration inputs (JSONL, LLaVA-format pairing, synthetic), and the `align-ti irs` CLI."""
import json

import pytest
import torch

from align_ti.data.llava import encode_example, pad_batch
from align_ti.data.synthetic import calibration_pairs, write_llava_dataset
from align_ti.models.irs import (
    irs_argmax,
    irs_scores,
    load_calibration_jsonl,
    load_calibration_pairs,
    pair_cosines,
    pairs_from_llava,
    select_vision_mass,
)
from align_ti.models.tiny import IMAGE_TOKEN_ID, build_processor, build_tiny_llava
from align_ti.reference import attention_mass as R
from align_ti.reference.attention_mass import irs_from_mass_reference
from tests.utils import assert_close, sharpen_attention


def _teacher(impl):
    model = build_tiny_llava("teacher", attn_implementation=impl).eval()
    sharpen_attention(model.model.language_model.layers)  # so that layers differ visibly
    return model


def _reference_irs(model, processor, pairs):
    """Eager attention with output_attentions, mass from the weights, reference IRS."""
    masses, vms = ([], []), ([], [])
    for pair in pairs:
        for side, item in enumerate(pair):
            enc = encode_example(processor, dict(item, answer=""), return_instruction_mask=True)
            batch = pad_batch([enc], processor.tokenizer.pad_token_id)
            qm = batch.pop("instruction_mask")
            batch.pop("labels")
            with torch.no_grad():
                out = model(**batch, output_attentions=True)
            sel = qm.float()
            per_layer = [
                ((w.float() * sel[:, None, :, None]).sum(2) / sel.sum()).mean(1)[0] for w in out.attentions
            ]
            masses[side].append(torch.stack(per_layer))  # [n_layers, L]
            vms[side].append(batch["input_ids"][0] == IMAGE_TOKEN_ID)
    scores = []
    for m1, m2, v1, v2 in zip(masses[0], masses[1], vms[0], vms[1]):
        scores.append(irs_from_mass_reference(m1[:, None], m2[:, None], v1[None], v2[None]))
    return 1 - torch.stack([1 - s for s in scores]).mean(0)  # mean of cosines -> IRS


def test_irs_matches_eager_reference_pipeline():
    pairs = calibration_pairs(3, seed=1)
    processor = build_processor()
    eager = _teacher("eager")
    want = _reference_irs(eager, processor, pairs)
    sdpa = _teacher("sdpa")
    got = irs_scores(sdpa, processor, pairs, batch_size=2)  # batched + padded, sdpa, captured
    assert got.num_pairs == 3 and len(got.scores) == 4
    assert_close(torch.tensor(got.scores), want, atol=2e-5, rtol=1e-3, name="IRS")
    assert got.layer == irs_argmax(torch.tensor(got.scores))
    assert max(got.scores) > 1e-3  # not trivially zero with sharpened attention
    assert sdpa.config.text_config._attn_implementation == "sdpa"


def test_same_instruction_gives_zero_irs():
    pairs = [(a, dict(a)) for a, _ in calibration_pairs(2)]
    res = irs_scores(_teacher("sdpa"), build_processor(), pairs)
    assert_close(torch.tensor(res.scores), torch.zeros(4), atol=1e-6)


def test_calibration_jsonl_and_llava_pairing(tmp_path):
    pairs = calibration_pairs(2)
    lines = []
    for i, (a, b) in enumerate(pairs):
        a["image"].save(tmp_path / f"img{i}.png")
        lines.append(json.dumps({"image": f"img{i}.png", "instructions": [a["question"], b["question"], "Describe it."]}))
    (tmp_path / "calib.jsonl").write_text("\n".join(lines) + "\n\n")
    got = load_calibration_jsonl(tmp_path / "calib.jsonl")
    assert len(got) == 6  # 3 instructions -> 3 pairs per image
    assert got[0][0]["question"] == pairs[0][0]["question"] and got[0][1]["question"] == pairs[0][1]["question"]
    assert got[0][0]["image"].size == pairs[0][0]["image"].size
    assert len(load_calibration_pairs(tmp_path / "calib.jsonl", samples=4)) == 4

    json_path = write_llava_dataset(tmp_path / "llava", n_images=3, questions_per_image=3)
    llava_pairs = load_calibration_pairs(json_path, samples=100)
    assert len(llava_pairs) == 6  # consecutive distinct questions of each image
    for a, b in llava_pairs:
        assert a["image_id"] == b["image_id"] and a["question"] != b["question"]
    assert pairs_from_llava([{"image": None, "image_id": None, "question": "q"}]) == []


def test_bad_calibration_input(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"image": "x.png"}\n')
    with pytest.raises(ValueError, match="instructions"):
        load_calibration_jsonl(tmp_path / "bad.jsonl")
    (tmp_path / "broken.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match="broken.jsonl:1"):
        load_calibration_jsonl(tmp_path / "broken.jsonl")
    (tmp_path / "x.txt").write_text("")
    with pytest.raises(ValueError, match="data"):
        load_calibration_pairs(tmp_path / "x.txt")
    with pytest.raises(ValueError, match="data"):
        load_calibration_pairs(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="samples"):
        load_calibration_pairs(None, samples=0)
    with pytest.raises(ValueError, match="pairs"):
        irs_scores(None, None, [])
    (tmp_path / "gone.jsonl").write_text('{"image": "a.png", "instructions": ["p", "q"]}\n'
                                         '{"image": "gone.png", "instructions": ["p", "q"]}\n')
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    with pytest.raises(FileNotFoundError) as e:
        load_calibration_jsonl(tmp_path / "gone.jsonl")
    assert str(e.value) == f"data: {tmp_path / 'gone.jsonl'}:2: image file {str(tmp_path / 'gone.png')!r} does not exist"


def test_cli_irs_on_tiny_teacher(tmp_path, capsys):
    from align_ti.cli import main

    assert main(["irs", "--samples", "2", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    record = json.loads((tmp_path / "irs.json").read_text())
    assert len(record["scores"]) == 4 and record["num_pairs"] == 2
    assert f"chosen layer: {record['layer']}" in printed
    assert record["attn_implementation"] == "sdpa" and "versions" in record
    png = (tmp_path / "irs.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    assert main(["irs", "--model", str(tmp_path / "nope"), "--out", str(tmp_path)]) == 2


# --------------------------------------------------------------------------------------
# the IRS maths of align_ti.models.irs against the reference's own copy, and bad input
# --------------------------------------------------------------------------------------


def test_irs_maths_match_the_reference():
    n_layers, P, L1, L2 = 3, 4, 12, 15
    vm1, vm2 = torch.zeros(P, L1, dtype=torch.bool), torch.zeros(P, L2, dtype=torch.bool)
    for p in range(P):
        vm1[p, p:p + 5] = True
        vm2[p, torch.randperm(L2)[:5]] = True
    m1, m2 = torch.rand(n_layers, P, L1), torch.rand(n_layers, P, L2)
    m2[1, 2] = 0  # an all-zero mass: cos 0 on both sides
    a1, a2 = select_vision_mass(m1, vm1), select_vision_mass(m2, vm2)
    assert torch.equal(a1, R.select_vision_mass(m1, vm1)) and torch.equal(a2, R.select_vision_mass(m2, vm2))
    scores = (1 - pair_cosines(a1, a2).mean(-1)).float()
    assert_close(scores, irs_from_mass_reference(m1, m2, vm1, vm2), atol=1e-7, rtol=0)
    for s in (scores, torch.tensor([0.3, 0.7, 0.7, 0.1]), torch.tensor([0.0])):
        assert irs_argmax(s) == R.irs_argmax(s)
    assert irs_argmax(torch.tensor([0.3, 0.7, 0.7, 0.1])) == 1  # ties -> lowest layer


def test_select_vision_mass_bad_input():
    m = torch.rand(2, 3, 9)
    vm = torch.zeros(3, 9, dtype=torch.bool)
    vm[:, 2:6] = True
    with pytest.raises(TypeError, match="vision_mask must have dtype"):
        select_vision_mass(m, vm.long())
    with pytest.raises(ValueError, match="vision_mask has size 8 in dim 1"):
        select_vision_mass(m, vm[:, :8])
    uneven = vm.clone()
    uneven[1, 8] = True
    with pytest.raises(ValueError, match="vision_mask must mark the same number.*counts"):
        select_vision_mass(m, uneven)
    with pytest.raises(ValueError, match="vision_mask marks no vision token"):
        select_vision_mass(m, torch.zeros_like(vm))
    with pytest.raises(ValueError, match="mass must be at least 2-D"):
        select_vision_mass(torch.rand(9), vm[0])
    with pytest.raises(TypeError, match="mass must be a floating-point tensor"):
        select_vision_mass(m.long(), vm)


def test_irs_argmax_bad_input():
    with pytest.raises(ValueError, match="scores is empty"):
        irs_argmax(torch.zeros(0))
    with pytest.raises(ValueError, match="scores must be finite"):
        irs_argmax(torch.tensor([0.1, float("nan")]))
    with pytest.raises(ValueError, match="scores must be 1-D"):
        irs_argmax(torch.zeros(2, 2))
