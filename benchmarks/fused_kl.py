"""fused_linear_kl (forward KL, T=1, mean over rows) against what distillation trainers use today.

Providers (each returns a forward function; the runner differentiates its scalar loss):
- align_ti:          align_ti.fused_linear_kl (impl="auto": chunked torch on CPU, Triton on CUDA)
- align_ti_native:   the same with the native CPU kernel for the per-chunk step (listed only
                     where `align-ti build-native` has built it)
- align_ti_dw_in_weight_dtype: the same with fp32_weight_grad=False (the weight gradient
                     accumulated in bf16 over row chunks, as Liger does; CUDA only: the CPU
                     cases are fp32, where the option changes nothing)
- align_ti[_dw_in_weight_dtype]_chunk<M>M: the same at a row-chunk budget of M MiB (chunk_bytes;
                     the default is 1 GiB on CUDA, 192 MiB on CPU): the memory/time trade-off,
                     from which the report's equal-memory comparison picks, for each peer, the
                     fastest align_ti variant whose peak is at or below the peer's
- materialized:      plain PyTorch with [N, V] fp32 logits of both heads (TRL, LLaVA-KD)
- torch_compile:     torch.compile of the materialized path
- torchtune_chunked: torchtune-style chunked forward KL (8 row chunks; autograd keeps each
                     chunk's logits for the backward)
- liger_c<chunk>:    Liger-Kernel LigerFusedLinearJSDLoss(beta=0, weight_hard_loss=0,
                     weight_soft_loss=1), i.e. forward KL, at several chunk sizes (the best
                     one is what a user would pick); skipped when liger-kernel is missing.
FLOP count for the roofline fraction: 2 * V * (Ht + 3 * Hs) * N whatever a provider recomputes.
"""
from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

from .harness import Case, OpBench

V_QWEN = 151936


def make_inputs(p: dict, device: torch.device) -> dict:
    """Inputs created in place (no freed temporaries that would skew an RSS reading)."""
    dtype = getattr(torch, p["dtype"])
    g = torch.Generator(device=device).manual_seed(0)
    kw = dict(dtype=dtype, device=device, generator=g)
    n, hs, ht, v = p["N"], p["Hs"], p["Ht"], p["V"]
    x = {
        "student_hidden": torch.randn(n, hs, **kw),
        "student_weight": torch.randn(v, hs, **kw).mul_(hs ** -0.5),
        "teacher_hidden": torch.randn(n, ht, **kw),
        "teacher_weight": torch.randn(v, ht, **kw).mul_(ht ** -0.5),
    }
    x["student_hidden"].requires_grad_(True)
    x["student_weight"].requires_grad_(True)
    return x


def _heads(x):
    return x["student_hidden"], x["student_weight"], x["teacher_hidden"], x["teacher_weight"]


def provider_align_ti(x, native: bool = False, fp32_weight_grad: bool = True, chunk_bytes: int | None = None):
    """align_ti as installed by pip (native=False: the chunked PyTorch path on CPU, even when
    the native kernel is built), or with the native CPU kernel (`align-ti build-native`);
    chunk_bytes: the row-chunk budget (None: the device's default)."""
    import align_ti
    from align_ti import native as _native

    def fwd():
        _native.set_enabled(native)
        try:
            return align_ti.fused_linear_kl(*_heads(x), fp32_weight_grad=fp32_weight_grad, chunk_bytes=chunk_bytes)
        finally:
            _native.set_enabled(None)
    return fwd


def _materialized_loss(hs, ws, ht, wt):
    zs = (hs @ ws.t()).float()
    with torch.no_grad():
        zt = (ht @ wt.t()).float()
    return F.kl_div(torch.log_softmax(zs, -1), torch.log_softmax(zt, -1), log_target=True, reduction="batchmean")


def provider_materialized(x):
    return lambda: _materialized_loss(*_heads(x))


def provider_torch_compile(x):
    compiled = torch.compile(_materialized_loss)
    return lambda: compiled(*_heads(x))


def provider_torchtune_chunked(x, chunks: int = 8):
    """torchtune's ForwardKLWithChunkedOutputLoss pattern."""
    def fwd():
        hs, ws, ht, wt = _heads(x)
        total = 0.0
        for hs_c, ht_c in zip(hs.chunk(chunks), ht.chunk(chunks)):
            zs = (hs_c @ ws.t()).float()
            with torch.no_grad():
                zt = (ht_c @ wt.t()).float()
                pt, lt = torch.softmax(zt, -1), torch.log_softmax(zt, -1)
            total = total + (pt * (lt - torch.log_softmax(zs, -1))).sum()
        return total / hs.shape[0]
    return fwd


def provider_liger(x, chunk_size: int):
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    loss_fn = LigerFusedLinearJSDLoss(beta=0.0, weight_hard_loss=0.0, weight_soft_loss=1.0, chunk_size=chunk_size)
    labels = torch.zeros(x["student_hidden"].shape[0], dtype=torch.long, device=x["student_hidden"].device)
    return lambda: loss_fn(*_heads(x), labels)


LIGER_CHUNKS = (128, 256, 512, 1024)  # "at its best chunk size": 8, 4, 2 or 1 chunks at N=1024
CHUNK_BUDGETS_MIB = (128, 256, 512)    # align_ti's row-chunk budgets below the default (equal memory)
BUDGET_PROVIDERS = {
    **{f"align_ti_chunk{m}M": (lambda x, m=m: provider_align_ti(x, chunk_bytes=m << 20)) for m in CHUNK_BUDGETS_MIB},
    **{f"align_ti_dw_in_weight_dtype_chunk{m}M":
       (lambda x, m=m: provider_align_ti(x, fp32_weight_grad=False, chunk_bytes=m << 20)) for m in CHUNK_BUDGETS_MIB},
}
PROVIDERS = {
    "align_ti": provider_align_ti,
    "align_ti_native": lambda x: provider_align_ti(x, native=True),
    "align_ti_dw_in_weight_dtype": lambda x: provider_align_ti(x, fp32_weight_grad=False),
    **BUDGET_PROVIDERS,
    "materialized": provider_materialized,
    "torch_compile": provider_torch_compile,
    "torchtune_chunked": provider_torchtune_chunked,
    **{f"liger_c{c}": (lambda x, c=c: provider_liger(x, c)) for c in LIGER_CHUNKS},
}


def reference(x):
    from align_ti.reference.fused_kl import fused_linear_kl_reference

    return fused_linear_kl_reference(*_heads(x))


def _available(provider: str) -> bool:
    if provider.startswith("liger"):
        return importlib.util.find_spec("liger_kernel") is not None
    if provider == "align_ti_native":  # only where `align-ti build-native` has been run
        from align_ti import native

        return native.native_available()
    if provider.startswith("align_ti_dw_in_weight_dtype"):  # the bf16 cases are CUDA's
        return torch.cuda.is_available()
    return True


def _tolerance(p: dict) -> float:
    return 2e-4 if p["dtype"] == "float32" else 3e-2


BENCH = OpBench(
    name="fused_kl",
    description="fused_linear_kl: forward KL(p_T || p_S), T=1, mean over rows; fwd+bwd",
    make_inputs=make_inputs,
    providers=PROVIDERS,
    reference=reference,
    grad_inputs=("student_hidden", "student_weight"),
    flops=lambda p: 2 * p["V"] * (p["Ht"] + 3 * p["Hs"]) * p["N"],
    tolerance=_tolerance,
    available=_available,
    # --quick leaves out the providers whose compile time dominates a small case
    quick_providers=("align_ti", "align_ti_native", "align_ti_dw_in_weight_dtype", *BUDGET_PROVIDERS,
                     "materialized", "torchtune_chunked", *(f"liger_c{c}" for c in LIGER_CHUNKS)),
)

_CHECK32 = dict(N=64, Hs=32, Ht=48, V=1300, dtype="float32")
_CHECK16 = dict(N=64, Hs=32, Ht=48, V=1300, dtype="bfloat16")

CASES = [
    # CPU: the target shape (README), and a small sweep over N for the plot and --quick.
    Case("fused_kl", "cpu N=1024 Hs=256 Ht=512 V=151936 fp32",
         dict(N=1024, Hs=256, Ht=512, V=V_QWEN, dtype="float32"), _CHECK32, devices=("cpu",), reps=2),
    *[Case("fused_kl", f"cpu-quick N={n} Hs=64 Ht=128 V=32768 fp32",
           dict(N=n, Hs=64, Ht=128, V=32768, dtype="float32"), _CHECK32, quick=True, devices=("cpu",), x="N")
      for n in (256, 1024)],
    # CUDA: Qwen2.5-1.5B student / Qwen2-7B teacher (the target), and a sweep over N.
    *[Case("fused_kl", f"cuda N={n} Hs=1536 Ht=3584 V=151936 bf16",
           dict(N=n, Hs=1536, Ht=3584, V=V_QWEN, dtype="bfloat16"), _CHECK16, devices=("cuda",), x="N",
           quick=(n == 8192))
      for n in (2048, 4096, 8192)],
    Case("fused_kl", "cuda N=8192 Hs=896 Ht=3584 V=151936 bf16 (0.5B student)",
         dict(N=8192, Hs=896, Ht=3584, V=V_QWEN, dtype="bfloat16"), _CHECK16, devices=("cuda",)),
]
