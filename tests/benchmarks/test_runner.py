"""The benchmark registry and runner on CPU: results with provenance, disagreeing providers refused."""
import dataclasses
import inspect
import json
import os

import pytest
import torch

from align_ti.benchmarks import harness, runner


def _toy_bench():
    def make_inputs(p, device):
        x = torch.randn(p["N"], 8, device=device, requires_grad=True)
        return {"x": x}

    def good(x):
        return lambda: (x["x"] ** 2).sum()

    def bad(x):
        return lambda: (x["x"] ** 2).sum() + 0.01

    return harness.OpBench(
        name="toy", make_inputs=make_inputs, providers={"align_ti": good, "plain": good, "wrong": bad},
        reference=lambda x: (x["x"].double() ** 2).sum(), grad_inputs=("x",),
        flops=lambda p: 3 * 8 * p["N"],
    )


def test_runner_writes_results_and_refuses_disagreeing_provider(tmp_path, monkeypatch):
    bench = _toy_bench()
    cases = [harness.Case("toy", f"N={n}", {"N": n}, quick=True, x="N") for n in (4, 16)]
    monkeypatch.setattr(runner, "load_op", lambda name: (bench, cases))
    paths = runner.run("cpu", ops=["toy"], quick=True, reps=2, out_dir=str(tmp_path), isolate=False, log=lambda *a: None)
    assert {p.rsplit(".", 1)[1] for p in paths} == {"json", "md", "png"}
    report = json.loads((tmp_path / "toy-quick.json").read_text())
    prov = report["provenance"]
    assert prov["device"] and prov["versions"]["torch"] == torch.__version__ and prov["git_commit"] and prov["date"]
    for case in report["cases"]:
        status = {r["provider"]: r["status"] for r in case["results"]}
        assert status["align_ti"] == "ok" and status["plain"] == "ok"
        assert status["wrong"].startswith("refused")
        wrong = next(r for r in case["results"] if r["provider"] == "wrong")
        assert "fwd_bwd" not in wrong  # never timed
        ok = next(r for r in case["results"] if r["provider"] == "align_ti")
        assert ok["fwd_bwd"]["median_s"] > 0 and ok["bwd"]["reps"] == 2 and ok["tflops"] > 0
        assert case["summary"]["fastest_peer"] == "plain"
    md = (tmp_path / "toy-quick.md").read_text()
    assert "refused" in md and "Commit:" in md


def test_forward_only_and_quick_reports_say_what_they_timed_and_left_out(tmp_path, monkeypatch):
    bench = dataclasses.replace(_toy_bench(), backward=False, quick_providers=("align_ti", "plain"))
    cases = [harness.Case("toy", "N=4", {"N": 4}, quick=True)]
    monkeypatch.setattr(runner, "load_op", lambda name: (bench, cases))
    lines = []
    runner.run("cpu", ops=["toy"], quick=True, reps=2, out_dir=str(tmp_path), isolate=False, log=lines.append)
    report = json.loads((tmp_path / "toy-quick.json").read_text())
    assert report["timed"] == "fwd" and report["left_out_by_quick"] == ["wrong"]
    md = (tmp_path / "toy-quick.md").read_text()
    assert "Timed: fwd only" in md and "| fwd median (s) |" in md and "fwd+bwd" not in md
    assert "Left out by --quick: wrong" in md
    assert any(" fwd " in line and "fwd+bwd" not in line for line in lines if "align_ti" in line)


def test_rounds_take_turns_and_merge(tmp_path, monkeypatch):
    """--rounds: each provider is measured once per round, the providers taking turns, and
    its rounds merge into the median of the round medians (memory: the largest round)."""
    bench = _toy_bench()
    cases = [harness.Case("toy", "N=4", {"N": 4}, quick=True)]
    monkeypatch.setattr(runner, "load_op", lambda name: (bench, cases))
    order, fake = [], {"align_ti": [3.0, 1.0, 2.0], "plain": [5.0, 4.0, 6.0]}

    def measure(bench, case, provider, device, reps):
        i = sum(1 for p in order if p == provider)
        order.append(provider)
        t = fake[provider][i]
        st = {"median_s": t, "min_s": t - 0.5, "max_s": t + 0.5, "iqr_s": 0.1, "reps": reps}
        return {"provider": provider, "fwd": st, "bwd": st, "fwd_bwd": st, "peak_extra_mib": 10.0 + i,
                "tflops": 1.0 / t, "max_error": 0.0, "status": "ok"}

    monkeypatch.setattr(runner, "measure_provider", measure)
    bench.providers.pop("wrong")
    runner.run("cpu", ops=["toy"], quick=True, reps=2, out_dir=str(tmp_path), isolate=False,
               log=lambda *a: None, rounds=3)
    assert order == ["align_ti", "plain"] * 3
    report = json.loads((tmp_path / "toy-quick.json").read_text())
    res = {r["provider"]: r for r in report["cases"][0]["results"]}
    ours = res["align_ti"]
    assert ours["fwd_bwd"]["median_s"] == 2.0 and ours["fwd_bwd"]["round_medians_s"] == [3.0, 1.0, 2.0]
    assert ours["fwd_bwd"]["min_s"] == 0.5 and ours["fwd_bwd"]["max_s"] == 3.5 and ours["fwd_bwd"]["reps"] == 6
    assert ours["peak_extra_mib"] == 12.0 and ours["tflops"] == pytest.approx(0.5)
    assert report["cases"][0]["summary"]["time_vs_fastest_peer"] == pytest.approx(2.0 / 5.0)
    assert "Rounds: 3" in (tmp_path / "toy-quick.md").read_text()
    failed = runner.merge_rounds([res["plain"], {"provider": "plain", "status": "failed: boom"}])
    assert failed["status"] == "failed: boom"


def test_registry_cases_are_well_formed():
    for op in runner.OPS:
        bench, cases = runner.load_op(op)
        if bench is None:  # an op with its own case runner: it takes the runner's call
            inspect.signature(runner.load_module(op).run_cases).bind(cases, "cpu", reps=1, log=print, quick=True)
        else:
            assert "align_ti" in bench.providers
        assert any(c.quick and "cpu" in c.devices for c in cases), f"{op} has no quick CPU case"
        for c in cases:
            assert c.op == op and set(c.devices) <= {"cpu", "cuda"}


def test_unknown_op_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown benchmark op 'nope'; known: fused_kl"):
        runner.load_op("nope")


@pytest.mark.e2e
def test_quick_cpu_run_of_a_real_op_in_fresh_processes(tmp_path):
    paths = runner.run("cpu", ops=["attention_mass"], quick=True, reps=1, out_dir=str(tmp_path), log=lambda *a: None)
    report = json.loads((tmp_path / "attention_mass-quick.json").read_text())
    results = {r["provider"]: r for r in report["cases"][0]["results"]}
    assert results["align_ti"]["status"] == "ok", results["align_ti"]
    assert results["align_ti"]["max_error"] <= 1e-5
    assert results["align_ti"]["peak_extra_mib"] < results["eager_softmax"]["peak_extra_mib"]
    assert any(p.endswith(".md") for p in paths)


# ---- branches: an op of the registry with its own case runner ------------------------------

def test_branches_is_a_registry_op_and_writes_results_like_the_others(tmp_path, monkeypatch):
    from align_ti.benchmarks import branches

    bench, cases = runner.load_op("branches")
    assert bench is None  # its own case runner, which runner.run calls below
    assert [c.params for c in cases if c.quick] == [{"model": "tiny", "fraction": 0.25, "batch": 2, "length": 64}]
    # the quick case at an even smaller length, so that the test stays cheap
    small = [dataclasses.replace(c, params=dict(c.params, length=32)) for c in cases]
    monkeypatch.setattr(branches, "CASES", small)
    paths = runner.run("cpu", ops=["branches"], quick=True, reps=1, out_dir=str(tmp_path), log=lambda *a: None)
    assert {os.path.basename(p) for p in paths} == {"branches-quick.json", "branches-quick.md"}
    report = json.loads((tmp_path / "branches-quick.json").read_text())
    assert report["op"] == "branches" and report["quick"] and report["provenance"]["git_commit"]
    assert report["load_average_at_end"]
    (case,) = report["cases"]
    status = {r["provider"]: r["status"] for r in case["results"]}
    assert status == {"plain": "ok", "expanded_sdpa": "ok", "separate_d": "ok", "expanded_eager": "ok"}
    for r in case["results"]:
        assert r["fwd_bwd"]["reps"] == 1 and r["fwd_nograd"]["median_s"] > 0 and r["peak_extra_mib"] == r["peak_extra_mib"]
    s = case["summary"]
    assert s["L"] == 32 and s["T"] > s["L"] and s["token_ratio_T_over_L"] == s["T"] / s["L"]
    assert s["expanded_sdpa_fwd_bwd_x_plain"] > 0 and s["separate_d_fwd_bwd_x_plain"] > 0
    assert "plain" in (tmp_path / "branches-quick.md").read_text()


# ---- the harness's overhead measurement -----------------------------------------------------

def test_overhead_measurement_compares_the_harness_with_a_bare_loop():
    # structure only: DESIGN.md keeps timing assertions out of tests (the number is in
    # benchmarks/README.md and benchmarks/results/cpu/overhead.md)
    bench = _toy_bench()
    r = harness.overhead(bench, "align_ti", {"N": 64}, torch.device("cpu"), reps=3, rounds=2)
    assert len(r["harness_round_medians_s"]) == len(r["bare_round_medians_s"]) == 2
    assert r["harness_median_s"] > 0 and r["bare_median_s"] > 0
    assert r["overhead"] == pytest.approx(r["harness_median_s"] / r["bare_median_s"] - 1)
    x = bench.make_inputs({"N": 8}, torch.device("cpu"))
    times = harness.bare_times(bench, "align_ti", x, torch.device("cpu"), reps=4)
    assert len(times) == 4 and x["x"].grad is None  # gradients cleared as in measure


def test_host_syncs_counts_the_warnings_of_cudas_sync_debug_mode_by_line(monkeypatch):
    """harness.host_syncs groups the sync debug mode's warnings by the calling line (here
    faked: no CUDA on the CPU tier) and leaves other warnings out."""
    import warnings

    modes = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)

    def step():
        for _ in range(3):
            warnings.warn("called a synchronizing CUDA operation")  # line A
        warnings.warn("called a synchronizing CUDA operation")      # line B
        warnings.warn("something else")

    rows = harness.host_syncs(step)
    assert modes == ["warn", 0]
    assert [r["count"] for r in rows] == [3, 1]
    assert all(r["where"].startswith("benchmarks/test_runner.py:") for r in rows)


# ---- fused_kl at equal memory ------------------------------------------------------------------

def _timed(provider, seconds, mib):
    st = {"median_s": seconds, "min_s": seconds, "max_s": seconds, "iqr_s": 0.0, "reps": 1}
    return {"provider": provider, "fwd": st, "fwd_bwd": st, "peak_extra_mib": mib, "status": "ok"}


def test_equal_memory_compares_each_peer_with_our_fastest_variant_within_its_peak(tmp_path):
    results = [_timed("align_ti", 1.0, 2000.0), _timed("align_ti_chunk512M", 1.2, 1400.0),
               _timed("align_ti_chunk256M", 1.5, 1100.0), _timed("align_ti_dw_in_weight_dtype_chunk256M", 1.3, 700.0),
               _timed("liger_c1024", 1.4, 1650.0), _timed("liger_c256", 1.8, 990.0), _timed("liger_c128", 2.0, 600.0),
               {"provider": "materialized", "status": "failed: OOM"}]
    summary = runner.summarize(results)
    eq = summary["equal_memory"]
    assert list(eq) == ["liger_c128", "liger_c256", "liger_c1024"]  # leanest first; failed peers left out
    assert eq["liger_c128"] == {"ours": None}
    assert eq["liger_c256"]["ours"] == "align_ti_dw_in_weight_dtype_chunk256M"
    assert eq["liger_c256"]["time_ratio"] == pytest.approx(1.3 / 1.8)
    assert eq["liger_c1024"]["ours"] == "align_ti_chunk512M"  # the default (2000 MiB) does not fit 1650
    assert eq["liger_c1024"]["memory_ratio"] == pytest.approx(1400 / 1650)
    assert summary["time_vs_fastest_peer"] == pytest.approx(1.0 / 1.4)  # the default-budget headline stays
    report = {"op": "fused_kl", "device_type": "cuda", "provenance": harness.provenance("cpu"),
              "memory_metric": "m", "cases": [{"name": "c", "params": {}, "results": results, "summary": summary}]}
    md = harness.markdown(report)
    assert "At equal memory" in md and "| liger_c128 | 2 | 600 | none fits |" in md
    assert "| liger_c256 | 1.8 | 990 | align_ti_dw_in_weight_dtype_chunk256M | 1.3 | 700 | 0.722x | 0.707x |" in md
    assert "equal_memory =" not in md


def test_fused_kl_budget_providers_pass_their_budget_and_agree(monkeypatch):
    import align_ti
    from align_ti.benchmarks import fused_kl

    bench, _ = runner.load_op("fused_kl")
    check = dict(N=64, Hs=32, Ht=48, V=1300, dtype="float32")
    assert harness.agreement(bench, "align_ti_chunk128M", check, torch.device("cpu"))[0]
    seen = []
    real = align_ti.fused_linear_kl
    monkeypatch.setattr(align_ti, "fused_linear_kl", lambda *a, **k: seen.append(k) or real(*a, **k))
    x = fused_kl.make_inputs(check, torch.device("cpu"))
    for name, budget, fp32_dw in (("align_ti", None, True), ("align_ti_chunk256M", 256 << 20, True),
                                  ("align_ti_dw_in_weight_dtype_chunk512M", 512 << 20, False)):
        fused_kl.PROVIDERS[name](x)()
        assert (seen[-1]["chunk_bytes"], seen[-1]["fp32_weight_grad"]) == (budget, fp32_dw)
    assert bench.available("align_ti_chunk128M")
    assert bench.available("align_ti_dw_in_weight_dtype_chunk128M") == torch.cuda.is_available()
