"""Where align_ti's time goes on CUDA: fused_linear_kl at the fused KL's target shape,
and attention_mass at the benchmark's shapes.

    python -m align_ti.benchmarks.profile_cuda [--n 8192] [--out DIR]

Writes profile_cuda.{json,md} (the runner's ops give the comparison with the other providers;
this says why align_ti's numbers are what they are):

1. fused_linear_kl: CUDA time per kernel of one fwd+bwd (torch.profiler), grouped as matmuls,
   the row kernel, copies/elementwise and the rest, against the matmul roofline measured in the
   same run;
2. fused_linear_kl: fwd+bwd time and peak extra memory against the row-chunk budget
   (ALIGN_TI_CHUNK_BYTES), the one knob that trades memory for matmul efficiency;
3. the fused KL row kernel alone on one chunk of fp32 logits per launch configuration
   (BLOCK_V, num_warps), as achieved bandwidth (bytes it must move / time);
4. attention_mass (forward, as IVA reads a teacher layer): wall time per call, and the top
   ops by self CPU time and by device time (host glue against kernels).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from . import harness
from .fused_kl import V_QWEN, make_inputs

MiB = 1 << 20


def _time(fn, reps: int) -> list[float]:
    fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return out


def _fwd_bwd(x):
    import align_ti

    def step():
        x["student_hidden"].grad = x["student_weight"].grad = None
        align_ti.fused_linear_kl(x["student_hidden"], x["student_weight"], x["teacher_hidden"],
                                 x["teacher_weight"]).backward()
    return step


def _group(name: str) -> str:
    n = name.lower()
    if "fused_kl_rows" in n:
        return "row kernel (Triton)"
    if any(k in n for k in ("gemm", "sm90", "sm80", "cutlass", "cublas", "xmma", "nvjet")):
        return "matmuls (cuBLAS)"
    if any(k in n for k in ("copy", "elementwise", "fill", "reduce", "index")):
        return "copies / elementwise"
    return "other"


def profile_breakdown(x, flops: float, roofline: float) -> dict:
    step = _fwd_bwd(x)
    step()
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    kernels, groups = [], {}
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if t <= 0 or ev.key.startswith(("aten::", "align_ti::", "cudaDeviceSynchronize")):
            continue
        kernels.append({"name": ev.key[:120], "calls": ev.count, "ms": t / 1e3})
        g = _group(ev.key)
        groups[g] = groups.get(g, 0.0) + t / 1e3
    kernels.sort(key=lambda k: -k["ms"])
    total = sum(groups.values())
    # wall time of a step against GPU busy time: the difference is host-side latency (Python
    # glue, launches, syncs); the top ops by self CPU time say where it goes
    wall = statistics.median(_time(step, 5)) * 1e3
    cpu_top = sorted(harness.profile_top(step, top=200), key=lambda r: -r["self_cpu_ms"])[:12]
    return {"gpu_ms_total": total, "groups_ms": groups, "top_kernels": kernels[:15],
            "matmul_floor_ms": flops / (roofline * 1e12) * 1e3, "wall_ms": wall, "top_cpu": cpu_top,
            "host_syncs": harness.host_syncs(step)}


def chunk_sweep(x, budgets, reps: int) -> list[dict]:
    out = []
    old = os.environ.get("ALIGN_TI_CHUNK_BYTES")
    try:
        for b in budgets:
            os.environ["ALIGN_TI_CHUNK_BYTES"] = str(b)
            step = _fwd_bwd(x)
            step()
            torch.cuda.synchronize()
            # as the runner measures: the gradients of the warm-up step are gone before `before`
            x["student_hidden"].grad = x["student_weight"].grad = None
            harness.release_memory()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            times = _time(step, reps)
            peak = torch.cuda.max_memory_allocated() - before
            out.append({"chunk_mib": b // MiB, "fwd_bwd_ms": statistics.median(times) * 1e3,
                        "peak_extra_mib": peak / MiB})
    finally:
        if old is None:
            os.environ.pop("ALIGN_TI_CHUNK_BYTES", None)
        else:
            os.environ["ALIGN_TI_CHUNK_BYTES"] = old
    return out


def kernel_sweep(rows: int, v: int, reps: int) -> list[dict]:
    """The forward-KL row kernel with the gradient (the training case) on one chunk."""
    from align_ti.kernels.fused_kl import fused_kl_rows_kernel

    g = torch.Generator(device="cuda").manual_seed(0)
    zs = torch.randn(rows, v, device="cuda", generator=g) * 3
    zt = torch.randn(rows, v, device="cuda", generator=g) * 3
    gout = torch.empty(rows, v, device="cuda", dtype=torch.bfloat16)
    a = torch.full((rows,), 1.0 / rows, device="cuda")
    d = torch.empty(rows, device="cuda")
    # 2 passes reading both fp32 rows, one bf16 gradient store
    moved = rows * v * (2 * 8 + 2)
    out = []
    for block, warps in ((1024, 4), (2048, 8), (4096, 8), (4096, 16), (8192, 16), (8192, 32)):
        def launch():
            fused_kl_rows_kernel[(rows,)](
                zs, zs.stride(0), zt, zt.stride(0), gout, gout.stride(0), gout, gout.stride(0),
                d, a, a, d, d, v, v, 1.0, 0.5, DIVERGENCE=0, HAS_CE=False, CE_SHARES_LSE=False,
                SPLIT_CE=False, NEED_GRAD=True, BLOCK_V=block, num_warps=warps)
        try:
            t = statistics.median(_time(launch, reps))
            out.append({"BLOCK_V": block, "num_warps": warps, "ms": t * 1e3, "gb_per_s": moved / t / 1e9})
        except Exception as e:  # a configuration the device cannot run (registers, shared memory)
            out.append({"BLOCK_V": block, "num_warps": warps, "error": f"{type(e).__name__}: {e}"[:200]})
    return out


def attention_mass_profile(reps: int) -> list[dict]:
    import align_ti

    from . import attention_mass as am

    out = []
    for length, dtype in ((1024, "float32"), (2048, "bfloat16")):
        x = am.make_inputs(dict(L=length, dtype=dtype), torch.device("cuda"))

        def call():
            with torch.no_grad():
                return align_ti.attention_mass(x["q"], x["k"], x["query_mask"], x["attention_mask"])
        eager = am.provider_eager_softmax(x)
        t = statistics.median(_time(call, reps * 4))
        te = statistics.median(_time(eager, reps * 4))
        out.append({"L": length, "dtype": dtype, "align_ti_ms": t * 1e3, "eager_ms": te * 1e3,
                    "top_cpu": harness.profile_top(call, top=10, cuda=False),
                    "top_device": harness.profile_top(call, top=8)})
    return out


def markdown(r: dict) -> str:
    p = r["params"]
    lines = [f"# fused_linear_kl on {r['provenance']['device']}: where the time goes",
             "", f"N={p['N']} Hs={p['Hs']} Ht={p['Ht']} V={p['V']} {p['dtype']}, forward KL, fwd+bwd. "
             f"Matmul roofline measured now: {r['roofline_tflops']:.0f} TFLOP/s; the four matmuls "
             f"({r['flops'] / 1e12:.1f} TFLOP) take at least {r['breakdown']['matmul_floor_ms']:.1f} ms at that rate.",
             "", "| group | GPU ms |", "|---|---|"]
    for g, ms in sorted(r["breakdown"]["groups_ms"].items(), key=lambda kv: -kv[1]):
        lines.append(f"| {g} | {ms:.2f} |")
    lines += [f"| total | {r['breakdown']['gpu_ms_total']:.2f} |"]
    if "wall_ms" in r["breakdown"]:
        lines += ["", f"Wall time of a fwd+bwd: {r['breakdown']['wall_ms']:.2f} ms (GPU busy "
                  f"{r['breakdown']['gpu_ms_total']:.2f} ms). Top ops by self CPU time:", ""]
        lines += harness.profile_markdown(r["breakdown"]["top_cpu"])
        if r["breakdown"].get("host_syncs") is not None:
            lines += harness.host_syncs_markdown(r["breakdown"]["host_syncs"], "one fwd+bwd")
    lines += ["", "| kernel | calls | ms |", "|---|---|---|"]
    lines += [f"| `{k['name']}` | {k['calls']} | {k['ms']:.2f} |" for k in r["breakdown"]["top_kernels"]]
    lines += ["", "Row-chunk budget:", "", "| chunk MiB | fwd+bwd ms | peak extra MiB |", "|---|---|---|"]
    lines += [f"| {c['chunk_mib']} | {c['fwd_bwd_ms']:.2f} | {c['peak_extra_mib']:.0f} |" for c in r["chunk_sweep"]]
    lines += ["", f"Row kernel alone ({r['kernel_rows']} rows x V, forward KL with gradient):", "",
              "| BLOCK_V | warps | ms | GB/s |", "|---|---|---|---|"]
    for k in r["kernel_sweep"]:
        if "error" in k:
            lines.append(f"| {k['BLOCK_V']} | {k['num_warps']} | {k['error']} | |")
        else:
            lines.append(f"| {k['BLOCK_V']} | {k['num_warps']} | {k['ms']:.3f} | {k['gb_per_s']:.0f} |")
    for a in r.get("attention_mass", []):
        lines += ["", f"attention_mass L={a['L']} {a['dtype']} (B=1, 28/4 heads, D=128, 64 instruction rows): "
                  f"{a['align_ti_ms']:.3f} ms per call, eager softmax {a['eager_ms']:.3f} ms "
                  f"({a['eager_ms'] / a['align_ti_ms']:.1f}x). Top ops by self CPU time:", ""]
        lines += harness.profile_markdown(a["top_cpu"])
        lines += ["", "By device time:", ""]
        lines += harness.profile_markdown(a["top_device"])
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=os.path.join(harness.ROOT, "benchmarks", "results", "cuda"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("profile_cuda needs CUDA")
    p = dict(N=args.n, Hs=1536, Ht=3584, V=V_QWEN, dtype="bfloat16")
    flops = 2 * p["V"] * (p["Ht"] + 3 * p["Hs"]) * p["N"]
    roofline = harness.matmul_roofline_tflops(torch.device("cuda"), torch.bfloat16)
    x = make_inputs(p, torch.device("cuda"))
    report = {"benchmark": "profile_cuda", "params": p, "flops": flops, "roofline_tflops": roofline,
              "provenance": harness.provenance("cuda")}
    report["breakdown"] = profile_breakdown(x, flops, roofline)
    print(markdown({**report, "chunk_sweep": [], "kernel_sweep": [], "kernel_rows": 0}), flush=True)
    report["chunk_sweep"] = chunk_sweep(x, [b * MiB for b in (512, 1024, 2048, 4096)], args.reps)
    del x
    harness.release_memory()
    torch.cuda.empty_cache()
    report["kernel_rows"] = 512
    report["kernel_sweep"] = kernel_sweep(512, p["V"], args.reps)
    harness.write_json_md(report, markdown(report), args.out, "profile_cuda")
    report["attention_mass"] = attention_mass_profile(args.reps)
    md = markdown(report)
    harness.write_json_md(report, md, args.out, "profile_cuda")
    print(md)
    return report


if __name__ == "__main__":
    main()
