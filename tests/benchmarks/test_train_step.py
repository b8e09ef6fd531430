"""The train-step benchmark: its sections come from the trainer's record_function ranges (read
from a torch.profiler trace, an error when one recorded nothing), the reduced scale keeps the
full-scale proportions, and the IVA-share and ways modes run the trainer's step."""
import json

import pytest
import torch
from torch.profiler import record_function

from align_ti.benchmarks import harness
from align_ti.train.data import DistillCollator
from align_ti.train.loss import PER_TERM_SECTIONS, SECTIONS, SINGLE_PASS_SECTIONS, DistillModule, LossSpec

CPU = torch.device("cpu")


def test_section_times_reads_ranges_and_refuses_an_empty_one():
    def step():
        with record_function("outer"):
            torch.randn(200, 200) @ torch.randn(200, 200)
            with record_function("inner"):
                torch.randn(100, 100).sum()

    got = harness.section_times(step, CPU, ("outer", "inner"))
    assert set(got["sections_s"]) == {"outer", "inner"}
    assert 0 < got["sections_s"]["inner"] < got["sections_s"]["outer"]  # inclusive: inner is inside outer
    assert got["step_s"] > 0
    with pytest.raises(RuntimeError, match=r"no time in the record_function range\(s\) \['renamed'\]"):
        harness.section_times(step, CPU, ("outer", "renamed"))


@pytest.mark.parametrize("kl_pass, kl_sections", [("single", SINGLE_PASS_SECTIONS), ("per_term", PER_TERM_SECTIONS)])
def test_the_trainer_step_records_every_section(tiny, kl_pass, kl_sections):
    """What the benchmark reads: DistillModule.forward with all four terms enters every range
    of align_ti.train.loss.SECTIONS and those of its kl_pass setting, and each takes time."""
    spec = LossSpec(w_sft=1.0, w_kd=1.0, w_iva=1.0, w_tpa=1.0, iva_layer=1, tpa_fraction=0.5, kl_pass=kl_pass)
    module = DistillModule(tiny.student, tiny.teacher, spec, image_token_id=tiny.student.config.image_token_index,
                           pad_token_id=0, forbidden_ids=(0, tiny.student.config.image_token_index), vocab_limit=1200)
    batch = DistillCollator(0)([tiny.dataset[i] for i in range(4)])
    got = harness.section_times(lambda: module(**batch), CPU, SECTIONS + kl_sections)
    assert all(seconds > 0 for seconds in got["sections_s"].values())


def test_train_step_reduced_scale_keeps_the_full_scale_proportions():
    from align_ti.benchmarks.train_step import REDUCED_DIVISOR, _full_configs

    fs, ft, fm = _full_configs(1)
    rs, rt, rm = _full_configs(REDUCED_DIVISOR)
    for full, red in ((fs.text_config, rs.text_config), (ft.text_config, rt.text_config)):
        assert red.num_hidden_layers == full.num_hidden_layers
        assert red.num_attention_heads == full.num_attention_heads
        assert red.num_key_value_heads == full.num_key_value_heads
        # body : head cost per token (H^2 vs V*H) is kept: H / V unchanged to within rounding
        assert red.hidden_size / red.vocab_size == pytest.approx(full.hidden_size / full.vocab_size, rel=1e-3)
        assert red.intermediate_size / red.hidden_size == pytest.approx(full.intermediate_size / full.hidden_size,
                                                                       rel=1e-2)
    assert rm["n_vision"] / rm["length"] == pytest.approx(fm["n_vision"] / fm["length"], rel=0.02)
    assert rm["n_vision"] == rs.image_seq_length == (rm["image_size"] // 14) ** 2
    assert max(rm["image_token_id"], rm["pad_id"]) < min(rs.text_config.vocab_size, rt.text_config.vocab_size)


@pytest.mark.e2e
def test_train_step_iva_share_variant_runs_the_trainer_step(tmp_path):
    from align_ti.benchmarks import train_step

    report = train_step.main(["--device", "cpu", "--scale", "tiny", "--iva-share", "--warmup", "1", "--steps", "1",
                              "--out", str(tmp_path)])
    terms = {r["objective"]: r["terms"] for r in report["results"]}
    assert terms == {"vanilla-KD": ["kd", "sft"], "vanilla-KD + IVA": ["iva", "kd", "sft"]}
    share = report["iva_share"]
    assert share["share_of_medians"] < 1 and "definition" in share
    assert 0 < share["share_inside_iva_ops_median"] < 1  # the IVA ranges were measured, not skipped
    assert "IVA share of the step" in (tmp_path / "train_step-iva_share.md").read_text()
    assert json.loads((tmp_path / "train_step-iva_share.json").read_text())["provenance"]["git_commit"]


@pytest.mark.e2e
def test_train_step_reports_the_sections_of_the_align_ti_way(tmp_path):
    from align_ti.benchmarks import train_step

    report = train_step.main(["--device", "cpu", "--scale", "tiny", "--ways", "align-ti", "--warmup", "0",
                              "--steps", "1", "--out", str(tmp_path)])
    by_objective = {r["objective"]: r for r in report["results"]}
    assert {r["status"] for r in report["results"]} == {"ok"}
    assert set(by_objective["Align-TI"]["sections_s"]) == set(SECTIONS + SINGLE_PASS_SECTIONS)
    assert set(by_objective["vanilla-KD"]["sections_s"]) == set(train_step.expected_sections("vanilla-KD"))
    assert all(s > 0 for r in report["results"] for s in r["sections_s"].values())
    md = (tmp_path / "train_step.md").read_text()
    header = "| way | objective | profiled step | " + " | ".join(
        n.removeprefix("align_ti.") for n in SECTIONS + SINGLE_PASS_SECTIONS) + " |"
    assert header in md and "| align-ti | Align-TI |" in md
