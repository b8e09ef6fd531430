"""Measuring, provenance and output shared by every benchmark.

An op's benchmark is an `OpBench`: how to make its inputs from a case's parameters, its
providers (each returns a forward function whose result is a scalar loss or an output tensor),
a reference to check every provider against before it is timed, and optionally a FLOP count.
The runner (benchmarks/runner.py) measures each provider of each case:

- correctness first: on the case's small `check` shape, the provider's output and input
  gradients are compared with the reference; a provider that disagrees is refused (reported as
  such, never timed);
- time: median and spread of forward, backward and forward+backward over `reps` runs after a
  warm-up, synchronising CUDA around each;
- memory: CUDA: max_memory_allocated during fwd+bwd minus what was allocated before. CPU: each
  provider runs in a fresh process; the maximum of the sampled current RSS during fwd+bwd minus
  the RSS just before it (imports and inputs in place, gradients included).

`overhead` measures the harness itself against a bare timing loop (benchmarks/overhead.py).
"""
from __future__ import annotations

import ctypes
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Case:
    """One shape of one op. `params` feed the op's make_inputs; `check` is a small version of
    it for the agreement check (defaults to params); `x` names the parameter plotted."""

    op: str
    name: str
    params: dict
    check: dict | None = None
    quick: bool = False
    devices: tuple = ("cpu", "cuda")
    x: str | None = None
    reps: int | None = None             # fewer repetitions for very slow cases


@dataclass
class OpBench:
    name: str
    make_inputs: Callable[[dict, torch.device], dict]
    providers: dict[str, Callable[[dict], Callable[[], torch.Tensor]]]
    reference: Callable[[dict], torch.Tensor]
    grad_inputs: tuple = ()             # input names whose .grad is checked and cleared
    flops: Callable[[dict], float] | None = None
    tolerance: Callable[[dict], float] = lambda p: 1e-4
    available: Callable[[str], bool] = lambda provider: True
    quick_providers: tuple | None = None   # the providers --quick runs (None = all)
    description: str = ""
    backward: bool = True
    extra: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------
# provenance
# ------------------------------------------------------------------------------------------

def git_commit() -> str:
    """HEAD of the repo; or ALIGN_TI_GIT_COMMIT where whoever shipped a copy of the tree set
    it (scripts/gpu_check.sh's usage: a lent GPU machine's copy may carry a stale .git)."""
    shipped = os.environ.get("ALIGN_TI_GIT_COMMIT")
    if shipped:
        return f"{shipped} (shipped tree)"
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        commit = out.stdout.strip() if out.returncode == 0 else "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return commit + (" (+ uncommitted changes)" if dirty else "")
    except OSError as e:
        return f"unknown ({e})"


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    name = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for dist in ("triton", "transformers", "liger-kernel", "align-ti"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    if torch.cuda.is_available():
        out["cuda"] = torch.version.cuda
    return out


def provenance(device: str) -> dict:
    return {
        "device": device_name(device),
        "versions": versions(),
        "git_commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        # other work on the machine skews CPU timings: record how busy it was
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


# ------------------------------------------------------------------------------------------
# measuring one provider in this process
# ------------------------------------------------------------------------------------------

def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RssSampler:
    """Samples this process's resident set size in a thread; `.peak` after exit."""

    def __init__(self, interval: float = 0.001):
        self.interval = interval
        self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def release_memory() -> None:
    """Give freed memory back, so the next RSS reading starts from what is really held."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so that a clock read next measures it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _scalar(out: torch.Tensor) -> torch.Tensor:
    """A scalar to differentiate: the output itself, or a fixed projection of it."""
    if out.dim() == 0:
        return out
    weight = torch.linspace(0.5, 1.5, out.numel(), device=out.device, dtype=torch.float32)
    return (out.float().flatten() * weight).sum()


def _clear_grads(inputs: dict, names) -> None:
    for n in names:
        inputs[n].grad = None


def agreement(bench: OpBench, provider: str, params: dict, device: torch.device) -> tuple[bool, float]:
    """(agrees, max abs error) of a provider's output and gradients vs the reference."""
    torch.manual_seed(0)
    x = bench.make_inputs(params, device)
    out = bench.providers[provider](x)()
    grads = []
    if bench.backward and bench.grad_inputs:
        _scalar(out).backward()
        grads = [x[n].grad.detach().clone() for n in bench.grad_inputs]
        _clear_grads(x, bench.grad_inputs)
    ref = bench.reference(x)
    err = (out.detach().double() - ref.detach().double()).abs().max().item() if out.numel() else 0.0
    if grads:
        _scalar(ref).backward()
        for g, n in zip(grads, bench.grad_inputs):
            diff = (g.double() - x[n].grad.double()).abs().max().item() if g.numel() else 0.0
            err = max(err, diff)
    tol = bench.tolerance(params)
    return bool(err == err and err <= tol), err


def _stats(times: list[float]) -> dict:
    times = sorted(times)
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    return {"median_s": statistics.median(times), "min_s": times[0], "max_s": times[-1],
            "iqr_s": q[2] - q[0], "reps": len(times)}


def measure(bench: OpBench, provider: str, params: dict, device: torch.device, reps: int,
            clock=time.perf_counter) -> dict:
    """Time and memory of one provider at one shape, in this process (`clock`: the timer;
    `overhead` passes process CPU time)."""
    torch.manual_seed(0)
    x = bench.make_inputs(params, device)
    fwd = bench.providers[provider](x)
    grad = bench.backward and bool(bench.grad_inputs)

    def run_both():
        out = fwd()
        if grad:
            _scalar(out).backward()
        return out

    run_both()  # warm-up: compilation, autotuning, allocator
    sync(device)
    _clear_grads(x, bench.grad_inputs)
    release_memory()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run_both()
        sync(device)
        peak = torch.cuda.max_memory_allocated() - before
    else:
        before = rss_bytes()
        with RssSampler() as sampler:
            run_both()
        peak = sampler.peak - before
    _clear_grads(x, bench.grad_inputs)

    t_fwd, t_bwd, t_both = [], [], []
    for _ in range(reps):
        sync(device)
        t0 = clock()
        out = fwd()
        sync(device)
        t1 = clock()
        if grad:
            _scalar(out).backward()
            sync(device)
        t2 = clock()
        t_fwd.append(t1 - t0)
        t_bwd.append(t2 - t1)
        t_both.append(t2 - t0)
        del out
        _clear_grads(x, bench.grad_inputs)
    result = {"provider": provider, "fwd": _stats(t_fwd), "fwd_bwd": _stats(t_both),
              "peak_extra_mib": peak / 2**20}
    if grad:
        result["bwd"] = _stats(t_bwd)
    if bench.flops is not None:
        flop = bench.flops(params)
        result["tflops"] = flop / result["fwd_bwd"]["median_s"] / 1e12
    return result


def bare_times(bench: OpBench, provider: str, x: dict, device: torch.device, reps: int,
               clock=time.perf_counter) -> list[float]:
    """fwd+bwd seconds of `reps` runs of the provider's callable in a bare loop (the yardstick
    for the harness's own overhead): one warm-up run, then the clock around forward +
    backward only; gradients are cleared outside the timed region, as `measure` does."""
    fwd = bench.providers[provider](x)
    grad = bench.backward and bool(bench.grad_inputs)
    out = fwd()
    if grad:
        _scalar(out).backward()
    _clear_grads(x, bench.grad_inputs)
    del out
    times = []
    for _ in range(reps):
        sync(device)
        t0 = clock()
        out = fwd()
        if grad:
            _scalar(out).backward()
        sync(device)
        times.append(clock() - t0)
        del out
        _clear_grads(x, bench.grad_inputs)
    return times


def overhead(bench: OpBench, provider: str, params: dict, device: torch.device, reps: int = 7,
             rounds: int = 5, clock: str = "wall") -> dict:
    """The harness's overhead on measured times: `measure`'s reported fwd+bwd median against a
    bare timing loop of the same callable on the same inputs in the same process.

    The two alternate (A B B A ...) for `rounds` rounds of `reps` runs each, so that load from
    other processes falls on both alike. overhead = median of the harness's per-round medians /
    median of the bare per-round medians - 1; `paired` is the median of the per-round ratios - 1;
    `min_overhead` compares the fastest round medians (the least disturbed by other load).
    clock="cpu" (CPU device only) times both with process CPU time on one torch thread: on a
    machine shared with other work, wall-clock round medians swing several-fold, CPU time little.
    """
    if clock not in ("wall", "cpu") or (clock == "cpu" and device.type != "cpu"):
        raise ValueError(f"clock must be 'wall', or 'cpu' on a CPU device; got {clock!r} on {device.type}")
    torch.manual_seed(0)
    x = bench.make_inputs(params, device)
    h_med, b_med = [], []
    threads = torch.get_num_threads()
    timer = time.process_time if clock == "cpu" else time.perf_counter
    if clock == "cpu":
        torch.set_num_threads(1)  # no OpenMP threads spinning while a sibling is preempted
    try:
        for i in range(rounds):
            order = ("harness", "bare") if i % 2 == 0 else ("bare", "harness")
            for which in order:
                if which == "harness":
                    h_med.append(measure(bench, provider, params, device, reps, timer)["fwd_bwd"]["median_s"])
                else:
                    b_med.append(statistics.median(bare_times(bench, provider, x, device, reps, timer)))
    finally:
        torch.set_num_threads(threads)
    h, b = statistics.median(h_med), statistics.median(b_med)
    return {"op": bench.name, "provider": provider, "params": params, "reps": reps, "rounds": rounds, "clock": clock,
            "harness_median_s": h, "bare_median_s": b, "overhead": h / b - 1,
            "paired_overhead": statistics.median(hh / bb for hh, bb in zip(h_med, b_med)) - 1,
            # the least disturbed round of each (a loaded machine makes round medians swing)
            "min_overhead": min(h_med) / min(b_med) - 1,
            "harness_round_medians_s": h_med, "bare_round_medians_s": b_med}


def profile_top(fn, top: int = 15, cuda: bool = True) -> list[dict]:
    """One call of `fn` under torch.profiler: the `top` ops and kernels by self device time
    (CUDA), or by self CPU time, with their call counts and both times in ms."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    rows = []
    for ev in prof.key_averages():
        dev = (getattr(ev, "self_device_time_total", None) or 0) / 1e3
        rows.append({"name": ev.key[:110], "calls": ev.count, "self_device_ms": dev,
                     "self_cpu_ms": ev.self_cpu_time_total / 1e3})
    key = "self_device_ms" if cuda else "self_cpu_ms"
    rows.sort(key=lambda r: -r[key])
    return rows[:top]


def section_times(fn, device: torch.device, sections) -> dict:
    """One call of `fn` under torch.profiler, and the time spent in each of its
    ``torch.profiler.record_function`` ranges named in `sections`.

    Returns ``{"step_s": seconds of the whole call, "sections_s": {name: seconds}}``. On CPU a
    range's time is its inclusive CPU time and the call's the wall time around it; on CUDA a
    range's time is the device time of the kernels launched inside it, the call's the wall time
    up to a synchronize. Both are measured with the profiler on, so compare them with each
    other, not with unprofiled steps. A range that `fn` never entered, or in which nothing was
    measured (a renamed range, code that no longer runs), raises RuntimeError naming it: a
    benchmark never reports a section it did not measure.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.device(device).type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        step = time.perf_counter() - t0
    spent = dict.fromkeys(sections, 0.0)
    for ev in prof.events():
        # the host-side event of each range (on CUDA the profiler adds a device-side twin)
        if ev.name in spent and ev.device_type == DeviceType.CPU:
            spent[ev.name] += (ev.device_time_total if cuda else ev.cpu_time_total) / 1e6
    empty = [name for name, seconds in spent.items() if seconds <= 0]
    if empty:
        raise RuntimeError(f"section_times: the profiled call recorded no time in the record_function "
                           f"range(s) {empty}: renamed, or no longer run?")
    return {"step_s": step, "sections_s": spent}


def host_syncs(fn, top: int = 12) -> list[dict]:
    """One call of `fn` under CUDA's sync debug mode ("warn"): where it made the host wait for
    the GPU (.item(), a host number copied into a CUDA tensor, nonzero, ...), as the Python
    line that called the synchronising op ("file:line", the last two path parts) and how
    often, most frequent first. Each such wait drains the GPU's queue: a bubble as long as
    the host then needs to enqueue the next kernels."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()
    counts: dict[str, int] = {}
    for w in caught:
        if "synchroniz" not in str(w.message):
            continue
        where = "/".join(str(w.filename).replace(os.sep, "/").split("/")[-2:]) + f":{w.lineno}"
        counts[where] = counts.get(where, 0) + 1
    rows = [{"where": k, "count": v} for k, v in counts.items()]
    rows.sort(key=lambda r: -r["count"])
    return rows[:top]


def host_syncs_markdown(rows: list[dict], what: str) -> list[str]:
    """`host_syncs`' rows as one markdown line about `what` (e.g. "one fwd+bwd")."""
    listed = ", ".join(f"`{r['where']}` x{r['count']}" for r in rows) or "none"
    return ["", f"Host syncs in {what} (CUDA sync debug mode, by calling line): {listed}"]


def profile_markdown(rows: list[dict]) -> list[str]:
    lines = ["| op / kernel | calls | self device ms | self CPU ms |", "|---|---|---|---|"]
    lines += [f"| `{r['name']}` | {r['calls']} | {r['self_device_ms']:.2f} | {r['self_cpu_ms']:.2f} |" for r in rows]
    return lines


def matmul_roofline_tflops(device: torch.device, dtype: torch.dtype, size: int = 8192, reps: int = 10) -> float:
    """The device's achieved dense matmul rate, measured now (the roofline for fractions)."""
    size = size if device.type == "cuda" else 1024
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * size**3 * reps / (time.perf_counter() - t0) / 1e12


# ------------------------------------------------------------------------------------------
# output
# ------------------------------------------------------------------------------------------

def write_json_md(report: dict, md: str, out_dir: str, stem: str) -> list[str]:
    """`<stem>.json` (the report) and `<stem>.md` (its markdown) under out_dir; their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, f"{stem}.json"), os.path.join(out_dir, f"{stem}.md")]
    with open(paths[0], "w") as f:
        json.dump(report, f, indent=2)
    with open(paths[1], "w") as f:
        f.write(md)
    return paths


def write_report(report: dict, out_dir: str, stem: str) -> list[str]:
    """JSON + markdown table + PNG plots (time and memory vs the case's x parameter)."""
    paths = write_json_md(report, markdown(report), out_dir, stem)
    png = plot(report, os.path.join(out_dir, f"{stem}.png"))
    if png:
        paths.append(png)
    return paths


def _fmt(v, unit=""):
    return "" if v is None else f"{v:.4g}{unit}"


def markdown(report: dict) -> str:
    prov = report["provenance"]
    lines = [f"# Benchmark: {report['op']} on {report['device_type']}", "",
             f"Device: {prov['device']}  ", f"Versions: {prov['versions']}  ",
             f"Commit: {prov['git_commit']}  ", f"Date: {prov['date']}  ",
             f"Load average (1, 5, 15 min) at start: {prov.get('load_average_at_start')}, "
             f"at end: {report.get('load_average_at_end')}  ",
             f"Memory: {report['memory_metric']}", ""]
    if report.get("rounds", 1) > 1:
        lines[-1:] = [f"Rounds: {report['rounds']}, the providers taking turns; a time is the median of "
                      "the round medians, min-max over all repetitions, memory the largest round's", ""]
    if report.get("roofline_tflops"):
        lines += [f"Measured matmul roofline: {report['roofline_tflops']:.1f} TFLOP/s", ""]
    if report.get("left_out_by_quick"):
        lines += [f"Left out by --quick: {', '.join(report['left_out_by_quick'])}", ""]
    timed = report.get("timed", "fwd+bwd")  # "fwd": a forward-only benchmark
    if timed != "fwd+bwd":
        lines += [f"Timed: {timed} only (no backward)", ""]
    split = timed == "fwd+bwd"  # forward and backward columns of their own
    head = "| provider | fwd median (s) | bwd median (s) " if split else "| provider "
    for case in report["cases"]:
        lines += [f"## {case['name']}", "", f"Parameters: {case['params']}", "",
                  head + f"| {timed} median (s) | {timed} min-max (s) | peak extra (MiB) | TFLOP/s | status |",
                  "|---" + "|---:" * (2 if split else 0) + "|---:|---|---:|---:|---|"]
        for r in case["results"]:
            if "fwd_bwd" not in r:
                lines.append(f"| {r['provider']} " + "| " * (6 if split else 4) + f"| {r.get('status', '')} |")
                continue
            fb = r["fwd_bwd"]
            parts = f"| {_fmt(r['fwd']['median_s'])} | {_fmt(r.get('bwd', {}).get('median_s'))} " if split else ""
            lines.append(
                f"| {r['provider']} {parts}"
                f"| {_fmt(fb['median_s'])} | {_fmt(fb['min_s'])}-{_fmt(fb['max_s'])} "
                f"| {_fmt(r['peak_extra_mib'])} | {_fmt(r.get('tflops'))} | {r.get('status', 'ok')} |"
            )
        if case.get("summary"):
            lines += ["", "Summary: " + ", ".join(f"{k} = {_fmt(v) if isinstance(v, float) else v}"
                                                   for k, v in case["summary"].items() if k != "equal_memory")]
            lines += _equal_memory_markdown(case["summary"].get("equal_memory"), case["results"], timed)
        lines.append("")
    return "\n".join(lines)


def _equal_memory_markdown(rows: dict | None, results: list[dict], timed: str) -> list[str]:
    """The runner's equal-memory comparison (runner.equal_memory) as a table."""
    if not rows:
        return []
    by = {r["provider"]: r for r in results}
    lines = ["", "At equal memory: each peer against the fastest align_ti variant (row-chunk budget, weight-"
             "gradient dtype) whose peak is at or below the peer's:", "",
             f"| peer | peer {timed} (s) | peer peak (MiB) | align_ti variant | its {timed} (s) | its peak (MiB) "
             "| time ratio | memory ratio |", "|---|---:|---:|---|---:|---:|---:|---:|"]
    for peer, row in rows.items():
        p = by[peer]
        if row["ours"] is None:
            lines.append(f"| {peer} | {_fmt(p['fwd_bwd']['median_s'])} | {_fmt(p['peak_extra_mib'])} "
                         "| none fits | | | | |")
            continue
        o = by[row["ours"]]
        lines.append(f"| {peer} | {_fmt(p['fwd_bwd']['median_s'])} | {_fmt(p['peak_extra_mib'])} | {row['ours']} "
                     f"| {_fmt(o['fwd_bwd']['median_s'])} | {_fmt(o['peak_extra_mib'])} | {row['time_ratio']:.3f}x "
                     f"| {row['memory_ratio']:.3f}x |")
    return lines


def plot(report: dict, path: str) -> str | None:
    """Time and memory per provider against the plotted parameter, when cases vary one."""
    cases = [c for c in report["cases"] if c.get("x")]
    if len(cases) < 2:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xname = cases[0]["x"]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
    fixed = {k: v for k, v in cases[0]["params"].items()
             if k != xname and all(c["params"].get(k) == v for c in cases)}
    varying = [k for k in cases[0]["params"] if k != xname and k not in fixed]

    def series(c):  # cases that differ in more than x (e.g. dtype) get a line each
        return " ".join(f"{k}={c['params'].get(k)}" for k in varying)

    providers = sorted({r["provider"] for c in cases for r in c["results"] if "fwd_bwd" in r})
    for p in providers:
        for name in dict.fromkeys(series(c) for c in cases):
            pts = sorted(((c["params"][xname], r) for c in cases if series(c) == name
                          for r in c["results"] if r["provider"] == p and "fwd_bwd" in r),
                         key=lambda t: t[0])
            if not pts:
                continue
            xs = [x for x, _ in pts]
            label = f"{p} {name}".strip()
            ax_t.plot(xs, [r["fwd_bwd"]["median_s"] * 1e3 for _, r in pts], marker="o", label=label)
            ax_m.plot(xs, [r["peak_extra_mib"] for _, r in pts], marker="o", label=label)
    ax_t.set(xlabel=xname, ylabel=f"{report.get('timed', 'fwd+bwd')} median (ms)", title=f"{report['op']}: time")
    ax_m.set(xlabel=xname, ylabel="peak extra memory (MiB)", title=f"{report['op']}: memory")
    for ax in (ax_t, ax_m):
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    ax_m.legend(fontsize=8)
    shape = " ".join(f"{k}={v}" for k, v in fixed.items())  # what the plotted cases share
    fig.suptitle(f"{shape}   ({report['provenance']['device']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
