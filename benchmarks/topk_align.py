"""topk_align (the IVA loss: top-k vision-token selection + weighted forward KL at the selected
positions, fused with both LM heads) against gather-then-materialise in plain PyTorch.

Inputs: student/teacher final hidden states [B, L, H], both LM heads, the teacher's attention
mass [B, L] and a vision mask with Nv vision tokens per sample (729 = SigLIP-so400m-384 on
CUDA). Selection: all vision tokens, weighted (the METHOD default), or ratio = 0.1.

Providers (each returns a forward function; the runner differentiates its scalar loss):
- align_ti:              align_ti.topk_align (impl="auto": fused_linear_kl on the selected
                         rows, cuBLAS + the Triton row kernel on CUDA, chunked torch on CPU);
                         selection included in the timing.
- align_ti_gather:       align_ti.topk_align(impl="triton"): the row gather fused into Triton
                         matmul kernels (CUDA only).
- fused_linear_kl_rows:  align_ti.fused_linear_kl on the flattened hidden states with the same
                         rows and weights, selected beforehand (not timed): the target is
                         align_ti <= 1.1x this (selection + gather cost <= 10%).
- materialized:          plain PyTorch: gather the selected rows ([M, H] copies), [M, V] fp32
                         logits of both heads, weighted forward KL (what a trainer writes today).
FLOP count for the roofline fraction: 2 * V * (Ht + 3 * Hs) * M, M = selected rows.

CPU cases are reduced so that a CPU run takes < 2 minutes (B=2, L=160, Nv=81 = 9x9 patches,
Hs=64, Ht=128, V=151936 fp32); CUDA cases are at full size (B=8, L=1024, Nv=729,
Qwen2.5-0.5B student Hs=896 / Qwen2-7B teacher Ht=3584, V=151936, bf16).
The IVA term's share of a full vanilla-KD step (teacher and student forward included) is
measured by `python -m align_ti.benchmarks.train_step --iva-share` (the trainer's real step,
vanilla KD vs vanilla KD + IVA, alternating; CPU: ``--scale reduced --threads 1``), results in
benchmarks/results/<device>/train_step-iva_share.{json,md}.
"""
from __future__ import annotations

import math

import torch

from .harness import Case, OpBench

V_QWEN = 151936


def _selection(p: dict) -> dict:
    return {} if p["select"] == "all" else {"ratio": float(p["select"])}


def make_inputs(p: dict, device: torch.device) -> dict:
    dtype = getattr(torch, p["dtype"])
    g = torch.Generator(device=device).manual_seed(0)
    kw = dict(dtype=dtype, device=device, generator=g)
    b, length, nv, hs, ht, v = p["B"], p["L"], p["Nv"], p["Hs"], p["Ht"], p["V"]
    x = {
        "student_hidden": torch.randn(b, length, hs, **kw),
        "student_weight": torch.randn(v, hs, **kw).mul_(hs ** -0.5),
        "teacher_hidden": torch.randn(b, length, ht, **kw),
        "teacher_weight": torch.randn(v, ht, **kw).mul_(ht ** -0.5),
    }
    x["student_hidden"].requires_grad_(True)
    x["student_weight"].requires_grad_(True)
    mass = torch.rand(b, length, device=device, generator=g).pow_(4)
    vision = torch.zeros(b, length, dtype=torch.bool, device=device)
    start = min(8, length - nv)
    vision[:, start:start + nv] = True
    x["mass"], x["vision_mask"] = mass, vision
    from align_ti.ops.topk_align import select_topk

    x["rows"], x["weights"] = select_topk(mass, vision, **_selection(p))
    x["select"] = _selection(p)
    return x


def provider_align_ti(x, impl: str = "auto"):
    import align_ti.ops.topk_align as T

    return lambda: T.topk_align(x["student_hidden"], x["student_weight"], x["teacher_hidden"],
                                x["teacher_weight"], x["mass"], x["vision_mask"], impl=impl,
                                **x["select"])


def _flat(x):
    hs, ht = x["student_hidden"], x["teacher_hidden"]
    return hs.reshape(-1, hs.shape[-1]), ht.reshape(-1, ht.shape[-1])


def provider_fused_linear_kl_rows(x):
    from align_ti.ops.fused_kl import fused_linear_kl

    def fwd():
        hs, ht = _flat(x)
        return fused_linear_kl(hs, x["student_weight"], ht, x["teacher_weight"],
                               rows=x["rows"], weights=x["weights"])
    return fwd


def provider_materialized(x):
    from align_ti.ops.topk_align import select_topk

    def fwd():
        rows, w = select_topk(x["mass"], x["vision_mask"], **x["select"])
        hs, ht = _flat(x)
        zs = (hs[rows] @ x["student_weight"].t()).float()
        with torch.no_grad():
            zt = (ht[rows] @ x["teacher_weight"].t()).float()
            lt = torch.log_softmax(zt, -1)
        d = (lt.exp() * (lt - torch.log_softmax(zs, -1))).sum(-1)
        return (w * d).sum() / w.sum()
    return fwd


PROVIDERS = {
    "align_ti": provider_align_ti,
    "align_ti_gather": lambda x: provider_align_ti(x, impl="triton"),
    "fused_linear_kl_rows": provider_fused_linear_kl_rows,
    "materialized": provider_materialized,
}


def reference(x):
    from align_ti.reference.topk_align import topk_align_reference

    return topk_align_reference(x["student_hidden"], x["student_weight"], x["teacher_hidden"],
                                x["teacher_weight"], x["mass"], x["vision_mask"], **x["select"])


def _rows(p: dict) -> int:
    nv = p["Nv"]
    keep = nv if p["select"] == "all" else min(nv, math.ceil(float(p["select"]) * nv - 1e-9))
    return p["B"] * keep


def _tolerance(p: dict) -> float:
    return 2e-4 if p["dtype"] == "float32" else 3e-2


BENCH = OpBench(
    name="topk_align",
    description="topk_align (IVA): top-k vision tokens by teacher mass, weighted forward KL, "
                "T=1, per-sample normalisation; fwd+bwd",
    make_inputs=make_inputs,
    providers=PROVIDERS,
    reference=reference,
    grad_inputs=("student_hidden", "student_weight"),
    flops=lambda p: 2 * p["V"] * (p["Ht"] + 3 * p["Hs"]) * _rows(p),
    tolerance=_tolerance,
    # the fused-gather kernels run on CUDA only (the interpreter would take minutes on CPU)
    available=lambda provider: provider != "align_ti_gather" or torch.cuda.is_available(),
)

_CHECK32 = dict(B=3, L=40, Nv=25, Hs=32, Ht=48, V=1300, dtype="float32")
_CHECK16 = dict(B=3, L=40, Nv=25, Hs=32, Ht=48, V=1300, dtype="bfloat16")
_CPU = dict(B=2, L=160, Nv=81, Hs=64, Ht=128, V=V_QWEN, dtype="float32")
_CUDA = dict(B=8, L=1024, Nv=729, Hs=896, Ht=3584, V=V_QWEN, dtype="bfloat16")

CASES = [
    *[Case("topk_align", f"cpu B=2 L=160 Nv=81 Hs=64 Ht=128 V=151936 fp32 select={s}",
           dict(_CPU, select=s), dict(_CHECK32, select=s), devices=("cpu",), quick=(s == "all"), reps=3)
      for s in ("all", "0.1")],
    # "memory independent of L beyond the inputs": the same 81 vision rows in a 4x longer
    # sequence (the inputs are in place before the RSS baseline, so peak extra is the op's own)
    Case("topk_align", "cpu B=2 L=640 Nv=81 Hs=64 Ht=128 V=151936 fp32 select=all",
         dict(_CPU, L=640, select="all"), dict(_CHECK32, select="all"), devices=("cpu",), reps=3),
    *[Case("topk_align", f"cuda B=8 L=1024 Nv=729 Hs=896 Ht=3584 V=151936 bf16 select={s}",
           dict(_CUDA, select=s), dict(_CHECK16, select=s), devices=("cuda",), quick=(s == "all"))
      for s in ("all", "0.1")],
]
