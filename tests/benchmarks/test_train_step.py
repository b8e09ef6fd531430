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


@pytest.mark.parametrize("case", ["long-response", "llava-665k"])
def test_train_step_reduced_scale_keeps_the_full_scale_proportions(case):
    from align_ti.benchmarks.train_step import REDUCED_DIVISOR, _full_configs

    fs, ft, fm = _full_configs(1, case)
    rs, rt, rm = _full_configs(REDUCED_DIVISOR, case)
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
    for m in (fm, rm):
        assert m["length"] == 2 + m["n_vision"] + m["n_instruction"] + m["n_response"]


def test_train_step_cases_have_the_issues_shapes():
    """long-response: 1285 response tokens in L = 2048 (the reduced scale as before: L = 228);
    llava-665k: one 729-token image, 64 instruction and 192 response tokens."""
    from align_ti.benchmarks.train_step import case_lengths

    assert case_lengths("long-response", 729) == {"n_instruction": 32, "n_response": 1285, "length": 2048}
    assert case_lengths("llava-665k", 729) == {"n_instruction": 64, "n_response": 192, "length": 987}
    assert case_lengths("long-response", 81) == {"n_instruction": 4, "n_response": 141, "length": 228}
    assert case_lengths("llava-665k", 81) == {"n_instruction": 7, "n_response": 20, "length": 110}
    with pytest.raises(ValueError, match="case must be one of"):
        case_lengths("short", 729)


def _record(way, objective, step, cpu, flops, unavoidable, mem=1.0):
    return {"way": way, "objective": objective, "status": "ok", "step_s_median": step, "cpu_s_median": cpu,
            "peak_mem_bytes": int(mem * 2 ** 30), "peak_mem_gib": mem,
            "model_flops": None if flops is None else {"flops": flops, "unavoidable_flops": unavoidable}}


def test_summary_puts_the_flop_models_ratio_next_to_each_measured_one():
    from align_ti.benchmarks.train_step import BEFORE, summarize

    results = [_record("align-ti", "vanilla-KD", 1.0, 2.0, 10.0, 9.0),
               _record("align-ti", "Align-TI", 1.5, 3.2, 17.0, 15.3, mem=1.5),
               _record(BEFORE, "vanilla-KD", 1.0, 2.0, 10.0, 9.0),
               _record(BEFORE, "Align-TI", 2.0, 4.0, 19.0, 15.3),
               _record("paper-code", "vanilla-KD", 3.0, 6.0, None, None)]
    got = summarize(results)
    ti = got["align-ti: Align-TI / vanilla-KD"]
    assert ti["time_ratio"] == 1.5 and ti["cpu_time_ratio"] == 1.6
    assert ti["flop_ratio"] == 1.7 and ti["unavoidable_flop_ratio"] == pytest.approx(1.7)
    assert ti["extra_mem_gib"] == 0.5
    after_before = got[f"Align-TI: align-ti / {BEFORE}"]
    assert after_before["time_ratio"] == 0.75 and after_before["flop_ratio"] == pytest.approx(17 / 19)
    # the paper-code way has no FLOP model, and a pair not measured is left out
    assert got["vanilla-KD: align-ti / paper-code"]["flop_ratio"] is None
    assert "Align-TI: align-ti / paper-code" not in got


def test_ways_take_turns_in_rounds_on_one_pair_of_models(monkeypatch):
    """measure_group: warm-up for each (way, objective), then rounds in alternating order; a
    step that fails is reported and leaves the others running; ways grouped by attention."""
    from align_ti.benchmarks import train_step

    assert train_step.attention_groups(["align-ti", "paper-code", train_step.BEFORE]) == [
        ["align-ti", train_step.BEFORE], ["paper-code"]]
    model = torch.nn.Linear(2, 2)
    monkeypatch.setattr(train_step, "build_setup", lambda *a, **k: (model, model, {"case": "c", "batch": 1,
                                                                                  "length": 4, "n_vision": 1,
                                                                                  "n_instruction": 1,
                                                                                  "n_response": 1}))
    monkeypatch.setattr(train_step, "make_batch", lambda *a, **k: {})
    calls = []

    def fake_steps(ways, *args):
        items = []
        for way in ways:
            for objective in train_step.OBJECTIVES:
                def fn(name=(way, objective)):
                    calls.append(name)
                    if name == ("align-ti", "Align-TI") and len(calls) > 4:
                        raise RuntimeError("boom")
                    return torch.zeros(())
                items.append(train_step._Timed(way, objective, fn))
        return items

    monkeypatch.setattr(train_step, "_group_steps", fake_steps)
    records = train_step.measure_group(["align-ti", train_step.BEFORE], "tiny", "c", CPU, warmup=1, steps=1,
                                       rounds=2, log=lambda *a: None)
    a, b, c, d = (("align-ti", "vanilla-KD"), ("align-ti", "Align-TI"),
                  (train_step.BEFORE, "vanilla-KD"), (train_step.BEFORE, "Align-TI"))
    assert calls == [a, b, c, d, a, b, c, d, d, c, a]  # warm-up, round 1, round 2 reversed (b failed)
    status = {(r["way"], r["objective"]): r["status"] for r in records}
    assert status == {a: "ok", b: "failed: RuntimeError", c: "ok", d: "ok"}
    ok = next(r for r in records if (r["way"], r["objective"]) == a)
    assert len(ok["step_s_round_medians"]) == 2 and ok["cpu_s_median"] >= 0


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
def test_train_step_reports_sections_and_flop_ratios_of_both_cases(tmp_path):
    from align_ti.benchmarks import train_step

    report = train_step.main(["--device", "cpu", "--scale", "tiny", "--ways", f"align-ti,{train_step.BEFORE}",
                              "--family", "llava", "--warmup", "0", "--steps", "1", "--rounds", "2",
                              "--out", str(tmp_path)])
    assert [e["case"] for e in report["cases"]] == ["long-response", "llava-665k"]
    for entry in report["cases"]:
        results = {(r["way"], r["objective"]): r for r in entry["results"]}
        assert {r["status"] for r in results.values()} == {"ok"}
        assert set(results[("align-ti", "Align-TI")]["sections_s"]) == set(SECTIONS + SINGLE_PASS_SECTIONS)
        assert set(results[(train_step.BEFORE, "Align-TI")]["sections_s"]) == set(SECTIONS + PER_TERM_SECTIONS)
        assert set(results[("align-ti", "vanilla-KD")]["sections_s"]) == set(train_step.expected_sections("vanilla-KD"))
        assert all(s > 0 for r in results.values() for s in r["sections_s"].values())
        assert results[("align-ti", "Align-TI")]["model_flops"]["tpa_forward"] == "prefix_cache"
        assert results[(train_step.BEFORE, "Align-TI")]["model_flops"]["tpa_forward"] == "expanded"
        summary = entry["summary"]["align-ti: Align-TI / vanilla-KD"]
        assert summary["time_ratio"] > 0 and summary["flop_ratio"] > summary["unavoidable_flop_ratio"] > 1
    md = (tmp_path / "train_step.md").read_text()
    assert "## llava-665k" in md and "| FLOP model ratio |" in md and "| align-ti | Align-TI |" in md
    assert json.loads((tmp_path / "train_step.json").read_text())["provenance"]["git_commit"]


def test_qwen2_5_vl_case_measures_the_align_ti_ways(tmp_path):
    """The Qwen2.5-VL 7B -> 3B pair (tiny: / 16, 2 layers): its batch carries the image grid and
    the trainer's module computes the 3-D position ids; the align-ti ways run with every section
    and a FLOP count, the paper-code way (LLaVA's) says it does not apply."""
    from align_ti.benchmarks import train_step

    report = train_step.main(["--device", "cpu", "--scale", "tiny", "--family", "qwen2_5_vl", "--case", "llava-665k",
                              "--ways", "paper-code,align-ti", "--warmup", "0", "--steps", "1",
                              "--out", str(tmp_path)])
    (entry,) = report["cases"]
    assert entry["family"] == "qwen2_5_vl"
    results = {(r["way"], r["objective"]): r for r in entry["results"]}
    assert {r["status"] for k, r in results.items() if k[0] == "paper-code"} == {"not applicable"}
    ti = results[("align-ti", "Align-TI")]
    assert ti["status"] == "ok" and ti["family"] == "qwen2_5_vl" and ti["length"] == 4 + ti["n_vision"] + \
        ti["n_instruction"] + ti["response_tokens"]
    assert set(ti["sections_s"]) == set(SECTIONS + SINGLE_PASS_SECTIONS)
    assert ti["model_flops"]["flops"] > results[("align-ti", "vanilla-KD")]["model_flops"]["flops"] > 0
    assert "## llava-665k, Qwen2.5-VL 7B -> 3B" in (tmp_path / "train_step.md").read_text()


def test_gpu_check_names_only_ways_and_cases_the_benchmark_knows():
    """scripts/gpu_check.sh runs on a lent GPU that this machine cannot try: its train-step stages
    must at least name ways and cases that exist (a typo would cost a lent machine's stage)."""
    import os
    import re

    from align_ti.benchmarks.train_step import CASES, WAYS

    script = open(os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "gpu_check.sh")).read()
    calls = re.findall(r"align_ti\.benchmarks\.train_step((?:[^\n]*\\\n)*[^\n]*)", script)
    assert len(calls) >= 3
    ways = [w for call in calls for group in re.findall(r'--ways "([^"]+)"', call) for w in group.split(",")]
    cases = [c for call in calls for group in re.findall(r"--case (\S+)", call) for c in group.split(",")]
    assert "align-ti expanded+per_term" in ways and set(cases) == set(CASES)
    assert set(ways) <= set(WAYS) and set(cases) <= set(CASES)
