"""The benchmark harness's own overhead on measured times (target: < 5%).

For a few registry providers, `harness.measure`'s reported fwd+bwd median is compared with a
bare timing loop (perf_counter around forward + backward of the same provider callable, same
inputs, same repetitions) in the same process, alternating the two (see `harness.overhead`):

    python -m align_ti.benchmarks.overhead [--device cpu|cuda] [--reps 5] [--rounds 9] [--clock cpu|wall] [--out DIR]

On CPU both clocks are run: process CPU time on one torch thread (``cpu``: steady on a machine
shared with other work, where wall-clock round medians swing several-fold) and wall clock.

Cases (CPU; fp32): a near-empty op (the harness's fixed cost per repetition, in microseconds), fused_kl align_ti and materialized at N=128, Hs=64, Ht=128, V=8192 (short:
~10-50 ms), fused_kl align_ti at N=256, V=32768 (the quick case's shape, ~0.1 s) and
attention_mass align_ti at L=1024 (forward only, ~0.2 s). CUDA: the registry's quick fused_kl shape. Writes overhead.json and
overhead.md (provenance, load averages) to benchmarks/results/<device>/.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from . import harness

_SMALL = dict(N=128, Hs=64, Ht=128, V=8192, dtype="float32")
CASES = {
    "cpu": [("null", "align_ti", dict(N=8)), ("fused_kl", "align_ti", _SMALL), ("fused_kl", "materialized", _SMALL),
            ("fused_kl", "align_ti", dict(_SMALL, N=256, V=32768)),
            ("attention_mass", "align_ti", dict(L=1024, dtype="float32"))],
    "cuda": [("null", "align_ti", dict(N=8)), ("fused_kl", "align_ti", dict(N=8192, Hs=1536, Ht=3584, V=151936, dtype="bfloat16")),
             ("fused_kl", "align_ti", dict(N=1024, Hs=896, Ht=3584, V=151936, dtype="bfloat16"))],
}


def _null_bench() -> harness.OpBench:
    """A near-empty op (sum of squares of 8 numbers): its harness-minus-bare time is the
    harness's fixed cost per repetition, in absolute terms."""
    def make_inputs(p, device):
        return {"x": torch.randn(p["N"], device=device, requires_grad=True)}

    return harness.OpBench(name="null", make_inputs=make_inputs,
                           providers={"align_ti": lambda x: (lambda: (x["x"] ** 2).sum())},
                           reference=lambda x: (x["x"].double() ** 2).sum(), grad_inputs=("x",))


def run(device: str = "cpu", reps: int = 5, rounds: int = 9, cases=None, log=print, clocks=None) -> dict:
    from .runner import load_op

    dev = torch.device(device)
    report = {"benchmark": "harness_overhead", "device_type": device, "provenance": harness.provenance(device),
              "target": "harness fwd+bwd median within 5% of a bare loop", "results": []}
    for clock in clocks or (("cpu", "wall") if device == "cpu" else ("wall",)):
        for op, provider, params in cases or CASES[device]:
            bench = _null_bench() if op == "null" else load_op(op)[0]
            t0 = time.perf_counter()
            r = harness.overhead(bench, provider, params, dev, reps=reps, rounds=rounds, clock=clock)
            r["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
            report["results"].append(r)
            log(f"{clock:4s} {op:15s} {provider:13s} {params}: harness {r['harness_median_s'] * 1e3:8.2f} ms, "
                f"bare {r['bare_median_s'] * 1e3:8.2f} ms, overhead {r['overhead']:+.2%} "
                f"(paired {r['paired_overhead']:+.2%}, fastest rounds {r['min_overhead']:+.2%})"
                f"  ({time.perf_counter() - t0:.0f} s)")
    report["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return report


def markdown(report: dict) -> str:
    prov = report["provenance"]
    lines = [f"# Benchmark harness overhead on {report['device_type']}", "",
             f"Device: {prov['device']}  ", f"Versions: {prov['versions']}  ", f"Commit: {prov['git_commit']}  ",
             f"Date: {prov['date']}  ",
             f"Load average (1, 5, 15 min) at start: {prov['load_average_at_start']}, "
             f"at end: {report['load_average_at_end']}", "",
             "`harness.measure`'s fwd+bwd median vs a bare perf_counter loop around forward + backward of the same "
             "callable, same process, alternating rounds (median of round medians; paired: median of the "
             "per-round ratios; fastest rounds: ratio of the smallest round medians). Target: < 5%. The harness "
             "- bare column of the near-empty op is the harness's fixed cost per repetition. Clock cpu: process "
             "CPU time with one torch thread (steady under other load); wall: wall clock, the device's threads.", "",
             "| clock | op | provider | params | reps x rounds | harness (ms) | bare (ms) | harness - bare (us) | overhead "
             "| paired | fastest rounds | load avg after |",
             "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in report["results"]:
        lines.append(f"| {r['clock']} | {r['op']} | {r['provider']} | {r['params']} | {r['reps']} x {r['rounds']} | "
                     f"{r['harness_median_s'] * 1e3:.4g} | {r['bare_median_s'] * 1e3:.4g} | "
                     f"{(r['harness_median_s'] - r['bare_median_s']) * 1e6:+.1f} | {r['overhead']:+.2%} | "
                     f"{r['paired_overhead']:+.2%} | {r['min_overhead']:+.2%} | {r.get('load_average_after')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m align_ti.benchmarks.overhead", description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--out", default=None)
    p.add_argument("--clock", action="append", choices=("cpu", "wall"),
                   help="timer(s) (repeatable; default on CPU: cpu then wall). cpu = process CPU time on one "
                        "torch thread, steady on a shared machine")
    args = p.parse_args(argv)
    report = run(args.device, args.reps, args.rounds, clocks=args.clock)
    out = args.out or os.path.join(harness.ROOT, "benchmarks", "results", args.device)
    md = markdown(report)
    harness.write_json_md(report, md, out, "overhead")
    print(md)
    print(f"wrote {out}/overhead.json and overhead.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
