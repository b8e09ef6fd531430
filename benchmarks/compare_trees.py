"""The same benchmark providers from two source trees (e.g. a base commit's `git worktree` and the
working tree), taking turns on one machine: is a change free of slowdown?

    python -m benchmarks.compare_trees --base /tmp/base --new . [--op fused_kl] [--case SUBSTR]
        [--provider align_ti --provider align_ti_native] [--rounds 5] [--reps 3] [--clock wall|cpu]
        [--out DIR]

Both trees are measured with this tree's harness and benchmark modules (the same cases, inputs
and timing code); only `align_ti`, `kernels/` and the native sources come from each tree. Every
measurement is a fresh interpreter (the agreement check against the reference, then
`harness.measure`, with the wall clock or, `--clock cpu`, the process's CPU time) whose
`sys.path` starts with a folder of links to that tree. Per round every provider runs once for each tree, the trees alternating (base first in
even rounds, new first in odd ones), so a slow spell of the shared machine lands on both.
Reported per provider: the median of each tree's round medians of forward+backward, their
ratio new / base, and the median of the per-round ratios (each from two runs minutes apart at
most). Writes <stem>.json and <stem>.md with both commits, the machine and the load averages.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

from . import harness
from .runner import load_op

HERE = os.path.dirname(os.path.abspath(__file__))
# what comes from the tree under test; the benchmarks package is always this one
_TREE_ENTRIES = ("align_ti", "kernels", "csrc", "CMakeLists.txt")


def _commit(tree: str) -> str:
    out = subprocess.run(["git", "-C", tree, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", tree, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return (out.stdout.strip() or "unknown") + ("+uncommitted changes" if dirty else "")


def _stage(tree: str, folder: str) -> str:
    """A folder of links: align_ti, kernels and the native sources of `tree`, and this
    benchmarks package."""
    os.makedirs(folder)
    for name in _TREE_ENTRIES:
        os.symlink(os.path.join(os.path.abspath(tree), name), os.path.join(folder, name))
    os.symlink(HERE, os.path.join(folder, "benchmarks"))
    return folder


def _identify(folder: str) -> dict:
    """Where `align_ti` and its native kernel load from in the staged folder (a check that each
    tree runs its own code)."""
    code = ("import json, align_ti, align_ti.ops.fused_kl as f, align_ti.native as n\n"
            "print(json.dumps({'align_ti': f.__file__, 'native': n.native_available(),"
            " 'native_library': n.info()['path']}))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=folder, env=dict(os.environ, PYTHONPATH=folder),
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"compare_trees: align_ti does not import from {folder}: {proc.stderr.strip()[-500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _worker(op: str, case: str, provider: str, reps: int, clock: str) -> dict:
    """One provider in this (fresh) process: the agreement check, then `harness.measure` with
    the wall clock or this process's CPU time (less skewed by other work on a shared machine:
    time spent waiting for a core is not counted)."""
    import time

    import torch

    from .runner import _find_case, measure_provider

    bench, c = _find_case(op, case)
    if clock == "wall":
        return measure_provider(bench, c, provider, torch.device("cpu"), reps)
    ok, err = harness.agreement(bench, provider, c.check or c.params, torch.device("cpu"))
    if not ok:
        return {"provider": provider, "status": f"refused: max error {err:.3g}"}
    r = harness.measure(bench, provider, c.params, torch.device("cpu"), reps, clock=time.process_time)
    return {**r, "status": "ok", "max_error": err}


def _measure(folder: str, op: str, case: str, provider: str, reps: int, clock: str) -> dict:
    env = dict(os.environ, PYTHONPATH=folder)
    cmd = [sys.executable, "-m", "benchmarks.compare_trees", "--worker", op, case, provider,
           str(reps), clock]
    load = os.getloadavg()[0]
    proc = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"status": f"failed: {tail[0]}", "load_1min": load}
    return {**json.loads(lines[-1][len("RESULT "):]), "load_1min": load}


def compare(base: str, new: str, op: str, cases: list, providers: list, rounds: int, reps: int,
            clock: str = "wall") -> dict:
    trees = {"base": base, "new": new}
    report = {"benchmark": "compare_trees", "op": op, "rounds": rounds, "reps": reps, "clock": clock,
              "commits": {k: _commit(v) for k, v in trees.items()},
              "provenance": harness.provenance("cpu"),
              "load_average_at_start": [round(x, 2) for x in os.getloadavg()], "cases": []}
    with tempfile.TemporaryDirectory(prefix="compare-trees-") as tmp:
        folders = {k: _stage(v, os.path.join(tmp, k)) for k, v in trees.items()}
        report["loaded"] = {k: _identify(f) for k, f in folders.items()}
        print(json.dumps(report["loaded"], indent=1), flush=True)
        for case in cases:
            runs = {p: {k: [] for k in trees} for p in providers}
            for rnd in range(rounds):
                order = ("base", "new") if rnd % 2 == 0 else ("new", "base")
                for p in providers:
                    for k in order:
                        r = _measure(folders[k], op, case.name, p, reps, clock)
                        runs[p][k].append(r)
                        t = r["fwd_bwd"]["median_s"] if r.get("status") == "ok" else float("nan")
                        print(f"{case.name} | {p:16s} | round {rnd + 1}/{rounds} | {k:4s} | "
                              f"{t:.3f} s | load {r['load_1min']:.2f} | {r.get('status')}", flush=True)
            report["cases"].append({"name": case.name, "params": case.params,
                                    "providers": {p: _summary(runs[p]) for p in providers}})
    report["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return report


def _summary(runs: dict) -> dict:
    """Round medians per tree, the median of each, their ratio, and the per-round ratios."""
    times = {k: [r["fwd_bwd"]["median_s"] for r in rs if r.get("status") == "ok"] for k, rs in runs.items()}
    out = {"runs": runs, "fwd_bwd_round_medians_s": times}
    if not all(times.values()):
        out["status"] = "failed: " + "; ".join(r["status"] for rs in runs.values() for r in rs
                                              if r.get("status") != "ok")
        return out
    med = {k: statistics.median(v) for k, v in times.items()}
    paired = [n / b for b, n in zip(times["base"], times["new"])]
    out.update(status="ok", median_s=med, ratio_new_over_base=med["new"] / med["base"],
               median_paired_ratio=statistics.median(paired), paired_ratios=paired,
               peak_extra_mib={k: max(r["peak_extra_mib"] for r in rs) for k, rs in runs.items()})
    return out


def markdown(report: dict) -> str:
    c, prov = report["commits"], report["provenance"]
    lines = [f"# {report['op']}: base {c['base']} vs new {c['new']} (CPU)", "",
             f"{prov.get('device', 'cpu')}; {report['rounds']} rounds, the trees alternating, "
             f"{report['reps']} timed repetitions per run, each run a fresh process; load average "
             f"{report['load_average_at_start']} at the start, {report['load_average_at_end']} at the end.",
             f"Times ({'process CPU time' if report.get('clock') == 'cpu' else 'wall clock'}): median over "
             "rounds of each run's forward+backward median."]
    for case in report["cases"]:
        lines += ["", f"## {case['name']}", "",
                  "| provider | base s | new s | new / base | median of per-round ratios | "
                  "peak extra MiB base / new | round medians base | round medians new |",
                  "|---|---|---|---|---|---|---|---|"]
        for p, s in case["providers"].items():
            if s["status"] != "ok":
                lines.append(f"| {p} | {s['status']} | | | | | | |")
                continue
            rm = s["fwd_bwd_round_medians_s"]
            lines.append(
                f"| {p} | {s['median_s']['base']:.3f} | {s['median_s']['new']:.3f} | "
                f"{s['ratio_new_over_base']:.3f} | {s['median_paired_ratio']:.3f} | "
                f"{s['peak_extra_mib']['base']:.0f} / {s['peak_extra_mib']['new']:.0f} | "
                f"{', '.join(f'{t:.2f}' for t in rm['base'])} | {', '.join(f'{t:.2f}' for t in rm['new'])} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="the base tree (e.g. a git worktree of the base commit)")
    ap.add_argument("--new", required=True, help="the tree to compare with it")
    ap.add_argument("--op", default="fused_kl")
    ap.add_argument("--case", default="cpu N=1024", help="cases of the op whose name contains this")
    ap.add_argument("--provider", action="append", help="providers (default: align_ti, align_ti_native)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(harness.ROOT, "benchmarks", "results", "cpu"))
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall clock, or the measuring process's CPU time (all its threads)")
    ap.add_argument("--stem", default=None, help="file name stem (default <op>-refactor)")
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--worker"]:  # one measurement, in a fresh process of one staged tree
        op, case, provider, reps, clock = argv[1:]
        print("RESULT " + json.dumps(_worker(op, case, provider, int(reps), clock)), flush=True)
        return {}
    args = ap.parse_args(argv)
    _, all_cases = load_op(args.op)
    cases = [c for c in all_cases if args.case in c.name and "cpu" in c.devices]
    if not cases:
        raise SystemExit(f"compare_trees: no CPU case of {args.op} contains {args.case!r}")
    report = compare(args.base, args.new, args.op, cases, args.provider or ["align_ti", "align_ti_native"],
                     args.rounds, args.reps, args.clock)
    md = markdown(report)
    harness.write_json_md(report, md, args.out, args.stem or f"{args.op}-refactor")
    print(md)
    return report


if __name__ == "__main__":
    main()
