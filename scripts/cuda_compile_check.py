"""Compile every Triton kernel launch of the interpreter tests for a real GPU, without a GPU.

Why: the interpreter tier (TRITON_INTERPRET=1) proves the kernels' arithmetic on CPU tensors,
but not that they compile for a GPU: the interpreter runs numpy, so code the NVIDIA backend
rejects, or a tile that needs more shared memory than an SM has, only shows on a device. A
lent GPU session is short; this check finds such problems on any machine, using the ptxas that
ships inside the triton wheel.

1. record: runs the interpreter-tier tests in a child process with the launch configurations
   forced to the GPU ones (the `align_ti.ops.heuristics` config functions are called with
   interpret=False) and records each kernel launch: argument types, constexpr values,
   num_warps, num_stages. To these it adds what the small test shapes do not reach: bf16
   wherever a launch ran fp16, and the configurations of production shapes (fused KL rows of
   V=151936, attention heads of dimension 128).
2. compile: each distinct launch is compiled for the target (default sm_90, H100/H200) by
   `triton.compile`; `cuobjdump -res-usage` reads registers and local memory (spills) off the
   cubin. A launch fails
   the check when it does not compile or needs more shared memory per block than the target
   allows; spills are reported, not failed.

Usage: python scripts/cuda_compile_check.py [--arch 90] [--json OUT] [-k PYTEST_EXPR]
       [--save-launches FILE | --launches FILE]
The GPU image's triton can differ from the local one: record with this triton
(--save-launches), then compile with another on PYTHONPATH (--launches); e.g. triton 3.6,
the lent H100's: `pip install --no-deps --target /tmp/t36 triton==3.6.0` and
`PYTHONPATH=/tmp/t36 python scripts/cuda_compile_check.py --launches FILE` (82 of 82 compile).
(Its interpreter cannot record: triton 3.6's interpreter fails on scalar loop bounds.)
Exit status: 0 when every launch compiles and fits, 1 otherwise.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Opt-in shared memory per block (bytes): sm_80 (A100) 163 KiB, sm_90 (H100/H200) 227 KiB.
MAX_SHARED = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
# the heuristics' launch configurations that differ under the interpreter (`interpret=`)
CONFIG_FUNCTIONS = ("kl_row_config", "attention_mass_config", "topk_align_gemm_config")
# modules that call the config functions (or imported them by name)
CONFIG_USERS = ("align_ti.ops.heuristics", "align_ti.ops.attention_mass",
                "align_ti.ops.fused_kl.chunk_triton", "align_ti.ops.topk_align.gather")
_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "int64": "i64",
           "int32": "i32", "int16": "i16", "int8": "i8", "uint8": "u8", "bool": "i1",
           "float64": "fp64"}


# --------------------------------------------------------------------------------------------
# phase 1 (child process, TRITON_INTERPRET=1): record the launches
# --------------------------------------------------------------------------------------------

def _gpu_config(fn):
    sig = inspect.signature(fn)

    def wrapper(*args, **kwargs):
        bound = sig.bind(*args, **kwargs)
        bound.arguments["interpret"] = False
        return fn(*bound.args, **bound.kwargs)
    wrapper.__wrapped__ = fn
    return wrapper


def _type_of(value) -> str:
    import torch

    if isinstance(value, torch.Tensor):
        return "*" + _DTYPES[str(value.dtype).removeprefix("torch.")]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"unsupported kernel argument {type(value).__name__}")


def _is_constexpr(param: inspect.Parameter) -> bool:
    ann = param.annotation
    return ann is not inspect.Parameter.empty and "constexpr" in str(ann)


class Recorder:
    """A pytest plugin: forces GPU launch configs and records every interpreted launch."""

    def __init__(self):
        self.launches = {}

    def pytest_configure(self, config):
        import importlib

        from triton.runtime.interpreter import InterpretedFunction

        for name in CONFIG_USERS:
            mod = importlib.import_module(name)
            for fn_name in CONFIG_FUNCTIONS:
                fn = getattr(mod, fn_name, None)
                if fn is not None and not hasattr(fn, "__wrapped__"):
                    setattr(mod, fn_name, _gpu_config(fn))
        original = InterpretedFunction.run
        recorder = self

        def run(self, *args, grid, warmup, **kwargs):
            recorder.record(self.fn, args, kwargs)
            return original(self, *args, grid=grid, warmup=warmup, **kwargs)
        InterpretedFunction.run = run

    def record(self, fn, args, kwargs):
        params = list(inspect.signature(fn).parameters.values())
        kwargs = dict(kwargs)
        options = {"num_warps": kwargs.pop("num_warps", 4), "num_stages": kwargs.pop("num_stages", 3)}
        values = dict(zip([p.name for p in params], args))
        values.update(kwargs)
        signature, constexprs = {}, {}
        for p in params:
            v = values.get(p.name, p.default)
            if _is_constexpr(p) or v is None:
                signature[p.name] = "constexpr"
                constexprs[p.name] = v
            else:
                signature[p.name] = _type_of(v)
        entry = {"module": fn.__module__, "name": fn.__name__, "signature": signature,
                 "constexprs": constexprs, "options": options}
        key = json.dumps(entry, sort_keys=True)
        self.launches.setdefault(key, entry)


def record(out: str, pytest_args: list[str]) -> int:
    import pytest

    rec = Recorder()
    rc = pytest.main(["-q", "-p", "no:cacheprovider", "-m", "interpret", *pytest_args,
                      os.path.join(ROOT, "tests")], plugins=[rec])
    with open(out, "w") as f:
        json.dump(list(rec.launches.values()), f, indent=1)
    return int(rc)


# --------------------------------------------------------------------------------------------
# phase 2 (no interpreter): compile each launch for the target
# --------------------------------------------------------------------------------------------

def _resource_usage(cubin: bytes) -> dict:
    """Registers and local memory per thread (LOCAL > 0: register spills) from `cuobjdump
    -res-usage` on the cubin (the cuobjdump inside the triton wheel)."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        text = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", text)
    local = re.search(r"LOCAL:(\d+)", text)
    return {"registers": int(regs.group(1)) if regs else None,
            "local_bytes": int(local.group(1)) if local else None}


def compile_launch(entry: dict, arch: int) -> dict:
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(entry["module"]), entry["name"])
    names = fn.arg_names
    constexprs = {(names.index(k),): v for k, v in entry["constexprs"].items()}
    src = ASTSource(fn=fn, signature=entry["signature"], constexprs=constexprs)
    t0 = time.perf_counter()
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=entry["options"])
    shared = int(compiled.metadata.shared)
    info = {"compile_s": round(time.perf_counter() - t0, 2), "shared_bytes": shared,
            **_resource_usage(compiled.asm["cubin"])}
    limit = MAX_SHARED.get(arch, 101376)
    info["status"] = "ok" if shared <= limit else f"shared memory {shared} B > {limit} B per block"
    return info


def production_variants(entry: dict):
    """The recorded launch plus what the test shapes do not reach: bf16 wherever a launch ran
    fp16, and the launch configurations of production shapes (V=151936 rows, head_dim 128)."""
    from align_ti.ops import heuristics as H

    def variant(base, **changes):
        e = json.loads(json.dumps(base))
        for k, v in changes.items():
            if k in ("num_warps", "num_stages"):
                e["options"][k] = v
            else:
                e["constexprs"][k] = v
        return e

    yield entry
    if "*fp16" in entry["signature"].values():
        bf = json.loads(json.dumps(entry))
        bf["signature"] = {k: ("*bf16" if t == "*fp16" else t) for k, t in entry["signature"].items()}
        yield from production_variants(bf)
        return
    name = entry["name"]
    if name == "fused_kl_rows_kernel":
        yield variant(entry, **H.kl_row_config(151936, interpret=False))
        low = variant(entry, **H.kl_row_config(151936, interpret=False))
        for k in ("zs_ptr", "zt_ptr", "g_ptr"):  # fused_kl on bf16 logits
            low["signature"][k] = "*bf16"
        yield low
    elif name.startswith("attention_mass_"):
        dtype = "bfloat16" if "*bf16" in entry["signature"].values() else "float32"
        import torch

        cfg = H.attention_mass_config(128, getattr(torch, dtype), interpret=False)
        yield variant(entry, **cfg)


def _describe(entry: dict) -> str:
    consts = ", ".join(f"{k}={v}" for k, v in entry["constexprs"].items())
    ptrs = ",".join(sorted({t for t in entry["signature"].values() if t.startswith("*")}))
    o = entry["options"]
    return f"{entry['name']}[{consts}; {ptrs}; warps={o['num_warps']} stages={o['num_stages']}]"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x10 (default 90: H100/H200)")
    p.add_argument("--json", default=None, help="write the per-launch results here")
    p.add_argument("-k", default=None, help="only the interpreter tests matching this pytest expression")
    p.add_argument("--save-launches", default=None,
                   help="also write the recorded launches to this JSON file")
    p.add_argument("--launches", default=None,
                   help="compile the launches of this file (from --save-launches) instead of recording: "
                        "e.g. recorded with one triton, compiled with another")
    p.add_argument("--record", default=None, help=argparse.SUPPRESS)  # child mode
    args = p.parse_args(argv)
    if args.record:
        return record(args.record, ["-k", args.k] if args.k else [])
    if args.launches:
        with open(args.launches) as f:
            return compile_all(json.load(f), args.arch, args.json)

    with tempfile.TemporaryDirectory() as tmp:
        launches_file = os.path.join(tmp, "launches.json")
        env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(
            [ROOT, os.environ.get("PYTHONPATH", "")]))
        cmd = [sys.executable, os.path.abspath(__file__), "--record", launches_file]
        if args.k:
            cmd += ["-k", args.k]
        rc = subprocess.run(cmd, env=env, cwd=ROOT).returncode
        if rc != 0:
            print(f"cuda_compile_check: the interpreter tests failed (exit {rc}) with GPU launch configs")
            return 1
        with open(launches_file) as f:
            launches = json.load(f)
    if args.save_launches:
        with open(args.save_launches, "w") as f:
            json.dump(launches, f, indent=1)
    return compile_all(launches, args.arch, args.json)


def compile_all(launches: list, arch: int, json_out: str | None) -> int:
    """Compile each launch (+ its production variants) for sm_<arch>; 0 when all compile and fit."""
    import triton

    if not launches:
        print("cuda_compile_check: no kernel launches recorded")
        return 1
    os.environ.pop("TRITON_INTERPRET", None)
    seen, expanded = set(), []
    for entry in launches:
        for e in production_variants(entry):
            key = json.dumps(e, sort_keys=True)
            if key not in seen:
                seen.add(key)
                expanded.append(e)
    launches = expanded
    results, failed = [], 0
    print(f"compiling {len(launches)} distinct launches for sm_{arch} with triton {triton.__version__}")
    for entry in launches:
        try:
            info = compile_launch(entry, arch)
        except Exception as e:  # a compile error is what this check is for
            info = {"status": f"compile error: {type(e).__name__}: {str(e).splitlines()[0][:300]}"}
        failed += info["status"] != "ok"
        results.append({**entry, **info})
        extra = (f"shared {info['shared_bytes']} B, {info['registers']} regs, "
                 f"local (spills) {info['local_bytes']} B, {info['compile_s']} s") if "shared_bytes" in info else ""
        print(f"  {info['status']:>4}  {_describe(entry)}  {extra}", flush=True)
    if json_out:
        with open(json_out, "w") as f:
            json.dump({"arch": arch, "triton": triton.__version__, "results": results}, f, indent=1)
    print(f"cuda_compile_check: {len(results) - failed} of {len(results)} launches compile for sm_{arch}"
          + (f", {failed} FAILED" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
