"""The one benchmark runner: `align-ti bench [--device cpu|cuda] [--op NAME] [--quick] [--rounds N]`.

The registry is `OPS`: op name -> module that defines `BENCH` (an OpBench) and `CASES` (a list
of Case), or `BENCH = None`, `CASES` and its own `run_cases` (benchmarks/branches.py). Every
provider of every case is first checked against the reference (a provider that disagrees is
refused, never timed), then measured: on CUDA in this process, on CPU in a process of its own
per provider (forked from a zygote process, see `_run_isolated`) so that RSS readings are its own. Results land as JSON (with provenance),
markdown and PNG under benchmarks/results/<device>/.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
import time

# torch and the harness are imported inside the functions, so that `align-ti --help` (which
# builds this parser) stays instant.

OPS = {
    "fused_kl": "fused_kl",
    "attention_mass": "attention_mass",
    "topk_align": "topk_align",
    "branches": "branches",  # own case runner (module.run_cases): see benchmarks/branches.py
    "native": "native",  # CPU only, own case runner (module.run_cases): see benchmarks/native.py
}


def load_module(name: str):
    if name not in OPS:
        raise ValueError(f"unknown benchmark op {name!r}; known: {', '.join(OPS)}")
    return importlib.import_module(f"{__package__}.{OPS[name]}")


def load_op(name: str):
    """(BENCH, CASES) of an op. BENCH is None for an op with its own case runner: a module that
    defines ``run_cases(cases, device, reps, log, quick) -> report`` (harness report format)."""
    module = load_module(name)
    return getattr(module, "BENCH", None), module.CASES


def _worker_cmd(op, case, provider, device, reps):
    return [sys.executable, "-m", f"{__package__}.runner", "--worker", "--op", op, "--case", case,
            "--provider", provider, "--device", device, "--reps", str(reps)]


def _run_worker(op, case, provider, device, reps) -> dict:
    """One provider in a fresh process (CPU memory is then its own)."""
    proc = subprocess.run(_worker_cmd(op, case, provider, device, reps), capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"provider": provider, "status": f"failed: {tail[0]}"}
    return json.loads(lines[-1][len("RESULT "):])


# On CPU every provider gets a process of its own (its RSS is then its own). A fresh interpreter
# per provider pays ~2-4 s of imports (torch, align_ti, liger-kernel) each time, a third of a
# --quick run; so the processes are forked from a "zygote": one interpreter (`--zygote`) that
# imports those modules once, never runs a tensor op (no OpenMP threads to inherit), and forks
# one child per provider. A forked child is a fresh process in every respect the measurement
# sees: its own RSS baseline (taken after its inputs are made), allocator and thread pool.
# (multiprocessing's forkserver would re-import the caller's __main__ in every child.)
_PRELOAD = ("torch", "align_ti", "align_ti.ops.fused_kl", "align_ti.ops.attention_mass",
            "align_ti.ops.topk_align", "align_ti.benchmarks.harness", "liger_kernel.chunked_loss")
_ZYGOTE = None


def _zygote_main() -> int:
    """`--zygote`: import once, then per request line on stdin (JSON: op, case, provider,
    device, reps) fork a child that measures it; answer one ``RESULT <json>`` line each."""
    for name in (*_PRELOAD, *(f"{__package__}.{m}" for m in OPS.values())):
        try:
            importlib.import_module(name)
        except ImportError:  # optional (liger-kernel)
            pass
    for line in sys.stdin:
        req = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: measure, write the result to the pipe, leave at once
            os.close(r)
            try:
                import torch

                bench, case = _find_case(req["op"], req["case"])
                res = measure_provider(bench, case, req["provider"], torch.device(req["device"]), req["reps"])
            except BaseException as e:  # noqa: BLE001  (reported to the parent)
                res = {"provider": req["provider"], "status": f"failed: {type(e).__name__}: {e}"}
            with os.fdopen(w, "w") as f:
                f.write(json.dumps(res))
            os._exit(0)
        os.close(w)
        with os.fdopen(r) as f:
            data = f.read()
        _, status = os.waitpid(pid, 0)
        if not data:  # the child died without a word (a crash, the OOM killer)
            data = json.dumps({"provider": req["provider"],
                               "status": f"failed: worker exited with code {os.waitstatus_to_exitcode(status)}"})
        print("RESULT " + data, flush=True)
    return 0


def _stop_zygote():
    global _ZYGOTE
    if _ZYGOTE is not None:
        try:
            _ZYGOTE.stdin.close()
            _ZYGOTE.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            _ZYGOTE.kill()
        _ZYGOTE = None


def _run_isolated(op, case, provider, device, reps) -> dict:
    """One provider in a process of its own: forked by the zygote, or (without os.fork) a
    fresh interpreter in worker mode."""
    global _ZYGOTE
    if not hasattr(os, "fork"):
        return _run_worker(op, case, provider, device, reps)
    if _ZYGOTE is None or _ZYGOTE.poll() is not None:
        import atexit
        import tempfile

        err = tempfile.TemporaryFile(mode="w+")
        _ZYGOTE = subprocess.Popen([sys.executable, "-m", f"{__package__}.runner", "--zygote"], text=True,
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
        _ZYGOTE.err_file = err
        atexit.register(_stop_zygote)
    z = _ZYGOTE
    try:
        z.stdin.write(json.dumps({"op": op, "case": case, "provider": provider, "device": device,
                                  "reps": reps}) + "\n")
        z.stdin.flush()
        for line in z.stdout:  # other lines are whatever the child printed
            if line.startswith("RESULT "):
                return json.loads(line[len("RESULT "):])
    except OSError:
        pass
    z.err_file.seek(0)
    tail = z.err_file.read().strip().splitlines()[-1:] or ["no output"]
    _stop_zygote()
    return {"provider": provider, "status": f"failed: the benchmark zygote exited: {tail[0]}"}


def measure_provider(bench, case, provider, device, reps: int) -> dict:
    """The agreement check, then the measurement (used in-process and by workers)."""
    from . import harness
    try:
        ok, err = harness.agreement(bench, provider, case.check or case.params, device)
    except Exception as e:  # a provider that cannot run this case is reported, not fatal
        return {"provider": provider, "status": f"failed: {type(e).__name__}: {e}"}
    if not ok:
        return {"provider": provider, "status": f"refused: disagrees with the reference (max error {err:.3g})",
                "max_error": err}
    try:
        result = harness.measure(bench, provider, case.params, device, reps)
    except Exception as e:
        return {"provider": provider, "status": f"failed: {type(e).__name__}: {e}"}
    result["max_error"] = err
    result["status"] = "ok"
    return result


def equal_memory(ours: dict[str, dict], peers: dict[str, dict]) -> dict[str, dict]:
    """Each peer against the fastest of our variants whose peak memory is at or below the
    peer's: ``{peer: {"ours": name, "time_ratio": ours / peer, "memory_ratio": ours / peer}}``,
    ``"ours": None`` where none of them fits the peer's memory."""
    out = {}
    for name, peer in sorted(peers.items(), key=lambda kv: kv[1]["peak_extra_mib"]):
        fits = [r for r in ours.values() if r["peak_extra_mib"] <= peer["peak_extra_mib"]]
        if not fits:
            out[name] = {"ours": None}
            continue
        best = min(fits, key=lambda r: r["fwd_bwd"]["median_s"])
        out[name] = {"ours": best["provider"],
                     "time_ratio": best["fwd_bwd"]["median_s"] / peer["fwd_bwd"]["median_s"],
                     "memory_ratio": best["peak_extra_mib"] / max(peer["peak_extra_mib"], 1e-9)}
    return out


def summarize(results: list[dict], baseline: str = "align_ti") -> dict:
    """Our variants against the fastest and (separately) the leanest peer that ran ok, and each
    peer at equal memory (`equal_memory`); a peer that failed or was refused is in the table but
    not here."""
    ok = {r["provider"]: r for r in results if r.get("status") == "ok"}
    if baseline not in ok:
        return {}
    # peers: everything that is not one of our own variants (align_ti, align_ti_native, ...)
    peers = {k: v for k, v in ok.items() if not k.startswith(baseline)}
    out = {}
    if peers:
        out["equal_memory"] = equal_memory({k: v for k, v in ok.items() if k.startswith(baseline)}, peers)
        fastest = min(peers.values(), key=lambda r: r["fwd_bwd"]["median_s"])
        leanest = min(peers.values(), key=lambda r: r["peak_extra_mib"])
        out["fastest_peer"] = fastest["provider"]
        out["leanest_peer"] = leanest["provider"]
        for name in sorted(k for k in ok if k.startswith(baseline)):
            ours = ok[name]
            prefix = "" if name == baseline else f"{name}_"
            out[f"{prefix}time_vs_fastest_peer"] = ours["fwd_bwd"]["median_s"] / fastest["fwd_bwd"]["median_s"]
            if leanest["peak_extra_mib"] >= 1.0:  # below 1 MiB, RSS noise would make the ratio meaningless
                out[f"{prefix}memory_vs_leanest_peer"] = ours["peak_extra_mib"] / leanest["peak_extra_mib"]
    return out


def merge_rounds(rounds: list[dict]) -> dict:
    """One result from the same provider's results of several rounds: times are the median
    of the round medians (min / max over all repetitions, `round_medians_s` kept), memory and
    error the largest of any round; a round that failed makes the whole result that failure."""
    bad = next((r for r in rounds if r.get("status") != "ok"), None)
    if bad is not None or len(rounds) == 1:
        return bad or rounds[0]
    out = dict(rounds[0])
    for key in ("fwd", "bwd", "fwd_bwd"):
        if key not in out:
            continue
        stats = [r[key] for r in rounds]
        medians = [st["median_s"] for st in stats]
        out[key] = {"median_s": statistics.median(medians), "min_s": min(st["min_s"] for st in stats),
                    "max_s": max(st["max_s"] for st in stats),
                    "iqr_s": statistics.median(st["iqr_s"] for st in stats),
                    "reps": sum(st["reps"] for st in stats), "round_medians_s": medians}
    out["peak_extra_mib"] = max(r["peak_extra_mib"] for r in rounds)
    out["max_error"] = max(r.get("max_error", 0.0) for r in rounds)
    if out.get("tflops"):  # flop / time: rescale the first round's rate to the merged median
        out["tflops"] = rounds[0]["tflops"] * rounds[0]["fwd_bwd"]["median_s"] / out["fwd_bwd"]["median_s"]
    return out


def run(device: str = "cpu", ops=None, quick: bool = False, reps: int | None = None,
        out_dir: str | None = None, providers=None, log=print, isolate: bool | None = None,
        rounds: int = 1) -> list[str]:
    """Run the registry's cases for `ops` (all by default) on `device`; returns written paths.

    `isolate` runs each provider in a fresh process (default: on CPU, where RSS is per process).
    `rounds` > 1 measures every provider of a case once per round, the providers taking turns
    (A B C A B C ...), and merges each provider's rounds (`merge_rounds`): on a shared machine
    whose speed drifts over minutes, a slow spell then falls on all providers alike instead of
    on whichever ran during it.
    """
    import torch

    from . import harness
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but CUDA is not available here")
    reps = reps or (3 if quick else 7)
    out_dir = out_dir or default_out_dir(device)
    written = []
    for op in ops or list(OPS):
        bench, cases = load_op(op)
        cases = [c for c in cases if device in c.devices and (c.quick or not quick)]
        if not cases:
            log(f"{op}: no {'quick ' if quick else ''}cases for {device}")
            continue
        if bench is None:  # an op with its own case runner (module.run_cases, in this process)
            custom = load_module(op).run_cases
            report = custom(cases, device, reps=reps, log=log, quick=quick)
            report.setdefault("load_average_at_end", [round(x, 2) for x in os.getloadavg()])
            written += harness.write_report(report, out_dir, op + ("-quick" if quick else ""))
            continue
        stem = op + ("-quick" if quick else "")
        timed = "fwd+bwd" if bench.backward and bench.grad_inputs else "fwd"
        report = {"op": op, "description": bench.description, "device_type": device, "timed": timed,
                  "provenance": harness.provenance(device), "quick": quick, "rounds": rounds,
                  "memory_metric": (f"max_memory_allocated during {timed} minus allocated before"
                                    if device == "cuda" else
                                    f"max sampled RSS during {timed} minus RSS before, fresh process per provider"),
                  "cases": []}
        if quick and bench.quick_providers is not None:
            left_out = [p for p in bench.providers if bench.available(p) and p not in bench.quick_providers
                        and (not providers or p in providers)]
            if left_out:
                report["left_out_by_quick"] = left_out
                log(f"{op}: --quick leaves out {', '.join(left_out)} (compile time dominates small cases)")
        if device == "cuda" and bench.flops is not None:
            report["roofline_tflops"] = harness.matmul_roofline_tflops(torch.device("cuda"), torch.bfloat16)
        for case in cases:
            names = [p for p in bench.providers if bench.available(p) and (not providers or p in providers)
                     and (not quick or bench.quick_providers is None or p in bench.quick_providers)]
            by_provider = {p: [] for p in names}
            for rnd in range(rounds):
                for p in names:
                    t0 = time.perf_counter()
                    case_reps = min(reps, case.reps) if case.reps else reps
                    if isolate if isolate is not None else device == "cpu":
                        r = _run_isolated(op, case.name, p, device, case_reps)
                    else:
                        r = measure_provider(bench, case, p, torch.device(device), case_reps)
                        if device == "cuda":
                            torch.cuda.empty_cache()
                    by_provider[p].append(r)
                    took = time.perf_counter() - t0
                    tag = f"{p:22s}" + (f" round {rnd + 1}/{rounds}" if rounds > 1 else "")
                    if r.get("status") == "ok":
                        log(f"{op:15s} {case.name:40s} {tag} {timed} {r['fwd_bwd']['median_s'] * 1e3:9.2f} ms"
                            f"  {r['peak_extra_mib']:9.1f} MiB  ({took:.0f} s)")
                    else:
                        log(f"{op:15s} {case.name:40s} {tag} {r['status']}")
            results = [merge_rounds(by_provider[p]) for p in names]
            for r in results:
                if report.get("roofline_tflops") and r.get("tflops"):
                    r["roofline_fraction"] = r["tflops"] / report["roofline_tflops"]
            report["cases"].append({"name": case.name, "params": case.params, "x": case.x,
                                    "results": results, "summary": summarize(results)})
            # the cases so far, so a run stopped by a time limit (a lent GPU) keeps them
            harness.write_json_md(report, harness.markdown(report), out_dir, stem)
        report["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
        written += harness.write_report(report, out_dir, stem)
    return written


def default_out_dir(device: str) -> str:
    """Where results go without --out: the committed results of the device type."""
    return os.path.join(os.getcwd(), "benchmarks", "results", device)


def _find_case(op: str, name: str):
    bench, cases = load_op(op)
    for c in cases:
        if c.name == name:
            return bench, c
    raise ValueError(f"{op} has no case {name!r}")


def build_parser(parser=None):
    parser = parser or argparse.ArgumentParser(prog="align-ti bench", description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="where to run (default: cuda when available, else cpu)")
    parser.add_argument("--op", action="append", choices=list(OPS), help="an op to benchmark (repeatable; default all)")
    parser.add_argument("--quick", action="store_true",
                        help="the small quick cases only, fewer repetitions, and without the providers "
                             "whose compile time dominates a small case (fused_kl: torch_compile); the "
                             "report lists what it left out")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per provider (default 7, quick 3)")
    parser.add_argument("--provider", action="append", help="only these providers (repeatable)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure every provider this many times, taking turns, and report the median "
                             "of the round medians (a shared machine's drift then hits all providers alike)")
    parser.add_argument("--out", default=None,
                        help="results folder (default benchmarks/results/<device>, where the committed "
                             "results live: a run there replaces the files of the ops it runs)")
    return parser


def main(argv=None) -> int:
    import torch

    if argv is None:
        argv = sys.argv[1:]
    if argv == ["--zygote"]:  # forks the per-provider processes of a CPU run (_run_isolated)
        return _zygote_main()
    if "--worker" in argv:  # child mode: one provider of one case, result on stdout
        p = argparse.ArgumentParser()
        for a in ("--op", "--case", "--provider", "--device"):
            p.add_argument(a, required=True)
        p.add_argument("--reps", type=int, required=True)
        p.add_argument("--worker", action="store_true")
        a = p.parse_args(argv)
        bench, case = _find_case(a.op, a.case)
        r = measure_provider(bench, case, a.provider, torch.device(a.device), a.reps)
        print("RESULT " + json.dumps(r), flush=True)
        return 0
    args = build_parser().parse_args(argv)
    return cli(args)


def cli(args) -> int:
    import torch

    from align_ti.paths import ensure_writable_dir

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.rounds < 1:
        raise SystemExit(f"align-ti bench: --rounds must be >= 1, got {args.rounds}")
    try:  # before any provider runs, not when the first report is written
        out_dir = ensure_writable_dir(args.out or default_out_dir(device), "--out")
    except ValueError as e:
        print(f"align-ti bench: error: {e}", file=sys.stderr)
        return 2
    paths = run(device, ops=args.op, quick=args.quick, reps=args.reps, out_dir=out_dir, providers=args.provider,
                rounds=args.rounds)
    for p in paths:
        print("wrote", p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
