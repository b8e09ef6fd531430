"""The benchmark registry and runner on CPU: results with provenance, disagreeing providers refused."""
import json

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


def test_registry_cases_are_well_formed():
    for op in runner.OPS:
        bench, cases = runner.load_op(op)
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
