"""The native CPU kernel of the fused KL against the chunked PyTorch path and materialised
logits, on CPU, V = 151936, fp32 and bf16, forward + backward:

- step "logits": the divergence step on given logits, `align_ti.fused_kl(zs, zt)` (forward
  KL, T = 1, mean), vs plain PyTorch on the full [N, V] logits (log_softmax of both, kl_div);
- step "linear": the full fused linear op `align_ti.fused_linear_kl` (N=1024, Hs=256, Ht=512,
  the fused KL's CPU target shape) vs materialised logits and Liger-Kernel's
  LigerFusedLinearJSDLoss(beta=0) at chunk 256 (its fastest chunk here) where installed.

Providers: native (`align_ti.native.set_enabled(True)`; needs `align-ti build-native`),
torch_chunked (the same op with the native kernel off), materialized, liger_c256.
Each provider runs in a fresh process (its own RSS; same metric as benchmarks/runner.py) after
an agreement check against the fp32 reference. Because a loaded machine skews sequential runs,
the native vs torch_chunked ratio is also measured interleaved in one process (A/B/A/B...).

    python -m benchmarks.native [--reps 3] [--ab-reps 4] [--case SUBSTR] [--quick] [--out DIR]
    align-ti bench --device cpu --op native [--quick]      (the same cases via the registry)

Writes native.json and native.md (provenance, load averages) to benchmarks/results/cpu/
(native-quick.* for the quick cases).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from . import harness
from .fused_kl import _heads
from .fused_kl import make_inputs as fused_kl_inputs
from .harness import Case, OpBench

V_QWEN = 151936


# --------------------------------------------------------------------------------------------
# inputs and providers
# --------------------------------------------------------------------------------------------

def make_inputs(p: dict, device: torch.device) -> dict:
    """Created in place (no freed temporaries that would skew an RSS reading)."""
    dtype = getattr(torch, p["dtype"])
    g = torch.Generator(device=device).manual_seed(0)
    kw = dict(dtype=dtype, device=device, generator=g)
    n, v = p["N"], p["V"]
    if p["step"] == "logits":
        x = {"student_logits": torch.randn(n, v, **kw).mul_(3), "teacher_logits": torch.randn(n, v, **kw).mul_(3)}
        x["student_logits"].requires_grad_(True)
        return x
    return fused_kl_inputs(p, device)


def _align_ti(x, use_native: bool):
    import align_ti
    from align_ti import native

    if use_native and not native.native_available():
        raise RuntimeError(f"native kernel not available: {native.info()['error']}")
    native.set_enabled(use_native)
    if "student_logits" in x:
        return lambda: align_ti.fused_kl(x["student_logits"], x["teacher_logits"], impl="torch")
    return lambda: align_ti.fused_linear_kl(*_heads(x), impl="torch")


def provider_native(x):
    return _align_ti(x, True)


def provider_torch_chunked(x):
    return _align_ti(x, False)


def _materialized_kl(zs, zt):
    with torch.no_grad():
        lt = torch.log_softmax(zt.float(), -1)
    return F.kl_div(torch.log_softmax(zs.float(), -1), lt, log_target=True, reduction="batchmean")


def provider_materialized(x):
    if "student_logits" in x:
        return lambda: _materialized_kl(x["student_logits"], x["teacher_logits"])

    def fwd():
        hs, ws, ht, wt = _heads(x)
        zs = hs @ ws.t()
        with torch.no_grad():
            zt = ht @ wt.t()
        return _materialized_kl(zs, zt)
    return fwd


def provider_liger(x, chunk_size: int = 256):
    if "student_logits" in x:
        raise RuntimeError("liger: fused linear step only")
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    loss_fn = LigerFusedLinearJSDLoss(beta=0.0, weight_hard_loss=0.0, weight_soft_loss=1.0,
                                      chunk_size=chunk_size)
    labels = torch.zeros(x["student_hidden"].shape[0], dtype=torch.long)
    return lambda: loss_fn(*_heads(x), labels)


PROVIDERS = {
    "native": provider_native,
    "torch_chunked": provider_torch_chunked,
    "materialized": provider_materialized,
    "liger_c256": provider_liger,
}


def reference(x):
    from align_ti.reference.fused_kl import fused_kl_reference, fused_linear_kl_reference

    if "student_logits" in x:
        return fused_kl_reference(x["student_logits"], x["teacher_logits"])
    return fused_linear_kl_reference(*_heads(x))


def _tolerance(p: dict) -> float:
    return 2e-4 if p["dtype"] == "float32" else 3e-2


def _bench(step: str) -> OpBench:
    return OpBench(
        name="native",
        description="align_ti native CPU kernel vs chunked torch vs materialised; forward KL, T=1, mean; fwd+bwd",
        make_inputs=make_inputs,
        providers=PROVIDERS,
        reference=reference,
        grad_inputs=("student_logits",) if step == "logits" else ("student_hidden", "student_weight"),
        tolerance=_tolerance,
        available=lambda p: not p.startswith("liger") or importlib.util.find_spec("liger_kernel") is not None,
    )


def _case(step, dtype, n=1024, hs=256, ht=512, reps=None, quick=False):
    params = dict(step=step, N=n, V=V_QWEN, dtype=dtype)
    check = dict(step=step, N=37, V=1271, dtype=dtype)
    if step == "linear":
        params.update(Hs=hs, Ht=ht)
        check.update(Hs=24, Ht=40)
        name = f"linear N={n} Hs={hs} Ht={ht} V={V_QWEN} {dtype}"
    else:
        name = f"logits N={n} V={V_QWEN} {dtype}"
    return Case("native", name, params, check, devices=("cpu",), reps=reps, quick=quick)


# The CPU bf16 fused linear op is slow (~40 s per fwd+bwd here: bf16 weights are upcast in
# blocks): one timed repetition and one interleaved round.
# Quick cases (`align-ti bench --op native --quick`, `--quick` here): the logits step at N=64.
CASES = [_case("logits", "float32"), _case("logits", "bfloat16"),
         _case("linear", "float32"), _case("linear", "bfloat16", reps=1),
         _case("logits", "float32", n=64, quick=True), _case("logits", "bfloat16", n=64, quick=True)]

# In the benchmark registry (benchmarks/runner.py OPS): no single OpBench (two steps with their
# own inputs, plus the interleaved A/B), so the cases have their own runner, `run_cases`.
BENCH = None


def _providers_for(case: Case) -> list[str]:
    bench = _bench(case.params["step"])
    names = [p for p in PROVIDERS if bench.available(p)]
    if case.params["step"] == "logits":
        names = [p for p in names if not p.startswith("liger")]
    return names


# --------------------------------------------------------------------------------------------
# running
# --------------------------------------------------------------------------------------------

def _find(name: str) -> Case:
    for c in CASES:
        if c.name == name:
            return c
    raise ValueError(f"no case {name!r}")


def _worker(case_name: str, provider: str, reps: int) -> dict:
    from .runner import measure_provider

    case = _find(case_name)
    load0 = os.getloadavg()[0]
    r = measure_provider(_bench(case.params["step"]), case, provider, torch.device("cpu"), reps)
    r["load_avg_1min"] = [round(load0, 2), round(os.getloadavg()[0], 2)]
    return r


def _run_worker(case: Case, provider: str, reps: int) -> dict:
    cmd = [sys.executable, "-m", f"{__package__}.native", "--worker", "--case", case.name,
           "--provider", provider, "--reps", str(reps)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=harness.ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"provider": provider, "status": f"failed: {tail[0]}"}
    return json.loads(lines[-1][len("RESULT "):])


def interleaved_ab(case: Case, reps: int) -> dict:
    """native vs torch_chunked fwd+bwd, alternating in one process (robust to load drift)."""
    from align_ti import native

    if not native.native_available():
        return {"status": "native kernel not available"}
    bench = _bench(case.params["step"])
    x = make_inputs(case.params, torch.device("cpu"))
    fns = {"native": provider_native(x), "torch_chunked": provider_torch_chunked(x)}
    times = {k: [] for k in fns}
    loads = []
    for i in range(reps + 1):  # the first round is a warm-up
        for name in (("native", "torch_chunked") if i % 2 == 0 else ("torch_chunked", "native")):
            native.set_enabled(name == "native")
            t0 = time.perf_counter()
            fns[name]().backward()
            dt = time.perf_counter() - t0
            for k in bench.grad_inputs:
                x[k].grad = None
            if i:
                times[name].append(dt)
        loads.append(round(os.getloadavg()[0], 2))
    native.set_enabled(None)
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    return {"reps": reps, "median_s": med, "min_s": best, "load_avg_1min": loads,
            "speedup_median": med["torch_chunked"] / med["native"],
            "speedup_min": best["torch_chunked"] / best["native"]}


def _summary(results: list[dict]) -> dict:
    ok = {r["provider"]: r for r in results if r.get("status") == "ok"}
    out = {}
    if "native" in ok:
        t = ok["native"]["fwd_bwd"]["median_s"]
        for p, r in ok.items():
            if p != "native":
                out[f"speedup_vs_{p}"] = r["fwd_bwd"]["median_s"] / t
        if "materialized" in ok:
            out["memory_vs_materialized"] = ok["native"]["peak_extra_mib"] / max(ok["materialized"]["peak_extra_mib"], 1e-9)
        if "torch_chunked" in ok:
            out["memory_vs_torch_chunked"] = ok["native"]["peak_extra_mib"] / max(ok["torch_chunked"]["peak_extra_mib"], 1e-9)
    return out


def _chunk_budget() -> int:
    from align_ti.ops import heuristics

    return heuristics.chunk_bytes(torch.device("cpu"))


def run_cases(cases, device: str = "cpu", reps: int | None = None, log=print, quick: bool = False,
              ab_reps: int | None = None, providers=None) -> dict:
    """The report (harness format, plus each case's interleaved A/B) of the given cases; the
    registry's entry point (benchmarks/runner.py: `align-ti bench --op native`)."""
    from align_ti import native

    if device != "cpu":
        raise ValueError(f"the native benchmark is CPU only, got device {device!r}")
    reps = reps or 3
    ab_reps = min(4, reps) if ab_reps is None else ab_reps
    report = {"op": "native", "description": _bench("logits").description, "device_type": "cpu",
              "provenance": harness.provenance("cpu"), "quick": quick,
              "native": {"available": native.native_available(), "path": native.info()["path"],
                         "torch_threads": torch.get_num_threads()},
              "cpu_chunk_bytes": _chunk_budget(),
              "memory_metric": "max sampled RSS during fwd+bwd minus RSS before, fresh process per provider",
              "cases": []}
    for case in cases:
        results = []
        for p in _providers_for(case):
            if providers and p not in providers:
                continue
            t0 = time.perf_counter()
            r = _run_worker(case, p, min(reps, case.reps or reps))
            results.append(r)
            if r.get("status") == "ok":
                log(f"{case.name:45s} {p:14s} fwd+bwd {r['fwd_bwd']['median_s']:8.3f} s "
                    f"{r['peak_extra_mib']:8.1f} MiB  load {r['load_avg_1min']}  ({time.perf_counter() - t0:.0f} s)")
            else:
                log(f"{case.name:45s} {p:14s} {r.get('status')}")
        ab = interleaved_ab(case, min(ab_reps, case.reps or ab_reps)) if ab_reps > 0 else None
        summary = _summary(results)
        if ab and "speedup_median" in ab:
            log(f"{case.name:45s} interleaved A/B: native {ab['median_s']['native']:.3f} s, torch_chunked "
                f"{ab['median_s']['torch_chunked']:.3f} s -> {ab['speedup_median']:.2f}x (load {ab['load_avg_1min']})")
            summary["interleaved_speedup_vs_torch_chunked"] = ab["speedup_median"]
        report["cases"].append({"name": case.name, "params": case.params, "x": None, "results": results,
                                "summary": summary, "interleaved_ab": ab})
    report["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return report


def run(reps: int = 3, ab_reps: int = 4, only: str | None = None, out_dir: str | None = None,
        providers=None, log=print, quick: bool = False) -> list[str]:
    """Run the full-size cases (the quick ones with quick=True) whose name contains `only`;
    writes native.json / native.md (native-quick.* when quick)."""
    cases = [c for c in CASES if c.quick == quick and (not only or only in c.name)]
    report = run_cases(cases, "cpu", reps=reps, log=log, quick=quick, ab_reps=ab_reps,
                       providers=providers)
    out_dir = out_dir or os.path.join(harness.ROOT, "benchmarks", "results", "cpu")
    stem = "native" + ("-quick" if quick else "")
    return harness.write_json_md(report, markdown(report), out_dir, stem)


def markdown(report: dict) -> str:
    text = harness.markdown(report).replace(
        "# Benchmark: native on cpu", "# Benchmark: native CPU kernel of the fused KL (cpu)").replace(
        "Memory: ", f"CPU chunk budget (heuristics.chunk_bytes): {report['cpu_chunk_bytes'] / 2**20:.0f} MiB  \nMemory: ", 1)
    lines = ["", "## Interleaved native vs torch_chunked (one process, alternating runs)", "",
             "| case | native median (s) | torch_chunked median (s) | speedup (median) | speedup (min) | load avg (1 min) |",
             "|---|---:|---:|---:|---:|---|"]
    for c in report["cases"]:
        ab = c.get("interleaved_ab") or {}
        if "median_s" not in ab:
            continue
        lines.append(f"| {c['name']} | {ab['median_s']['native']:.3f} | {ab['median_s']['torch_chunked']:.3f} "
                     f"| {ab['speedup_median']:.2f}x | {ab['speedup_min']:.2f}x | {ab['load_avg_1min']} |")
    loads = ["", "Load average (1 min) before/after each provider's process: " + "; ".join(
        f"{c['name']} {r['provider']} {r.get('load_avg_1min')}" for c in report["cases"] for r in c["results"]
        if r.get("load_avg_1min")), ""]
    return text + "\n".join(lines + loads)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m benchmarks.native", description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--case", default=None, help="worker: case name; else: run cases containing this text")
    parser.add_argument("--provider", action="append", default=None,
                        help="only these providers (repeatable; default all)")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions per provider")
    parser.add_argument("--ab-reps", type=int, default=4, help="interleaved native/torch rounds (0 = skip)")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results/cpu)")
    parser.add_argument("--quick", action="store_true", help="the small quick cases only")
    a = parser.parse_args(argv)
    if a.worker:
        print("RESULT " + json.dumps(_worker(a.case, a.provider[0], a.reps)), flush=True)
        return 0
    for p in run(reps=a.reps, ab_reps=a.ab_reps, only=a.case, out_dir=a.out, providers=a.provider,
                 quick=a.quick):
        print("wrote", p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
