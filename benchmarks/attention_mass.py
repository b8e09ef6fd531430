"""attention_mass vs eager softmax(QK^T) for one layer (what output_attentions costs).

Layout: Qwen2-7B heads (28 q heads, 4 kv heads, D=128), one sample,
[template 14 | vision 729 | instruction 64 | response ...] padded out to L; the 64 instruction
tokens are the selected queries. Forward only (reading a teacher layer).
Providers (each returns a function giving the [B, L] mass):
- align_ti:       align_ti.attention_mass (impl="auto": chunked torch on CPU, Triton on CUDA)
- eager_softmax:  what eager attention with output_attentions does for that layer: repeat_kv,
                  fp32 logits q k^T * scale + additive causal mask, softmax -> [B, H, L, L]
                  probabilities, then the mean over the selected rows and heads.
"""
from __future__ import annotations

import torch

from .harness import Case, OpBench

HQ, HKV, D = 28, 4, 128
TEMPLATE, VISION, INSTRUCTION = 14, 729, 64


def make_inputs(p: dict, device: torch.device) -> dict:
    length, dtype = p["L"], getattr(torch, p["dtype"])
    vision, instruction = p.get("vision", VISION), p.get("instruction", INSTRUCTION)
    g = torch.Generator(device=device).manual_seed(0)
    kw = dict(dtype=dtype, device=device, generator=g)
    q = torch.randn(1, HQ, length, D, **kw).mul_(2.0)  # sharper than unit scale, like trained heads
    k = torch.randn(1, HKV, length, D, **kw)
    query_mask = torch.zeros(1, length, dtype=torch.bool, device=device)
    start = TEMPLATE + vision
    query_mask[:, start:start + instruction] = True
    attention_mask = torch.ones(1, length, dtype=torch.int64, device=device)
    # the model builds its additive causal mask once per forward (not counted per layer)
    causal = torch.full((length, length), torch.finfo(dtype).min, dtype=dtype, device=device).triu_(1)[None, None]
    return {"q": q, "k": k, "query_mask": query_mask, "attention_mask": attention_mask, "causal": causal}


def provider_align_ti(x):
    import align_ti

    def run():
        with torch.no_grad():
            return align_ti.attention_mass(x["q"], x["k"], x["query_mask"], x["attention_mask"])
    return run


def provider_eager_softmax(x):
    def run():
        with torch.no_grad():
            q, k = x["q"], x["k"]
            kx = k.repeat_interleave(HQ // HKV, dim=1)  # transformers' repeat_kv
            w = torch.matmul(q, kx.transpose(2, 3)) * (D ** -0.5) + x["causal"]
            w = torch.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)  # output_attentions
            sel = x["query_mask"].to(w.dtype)
            return ((w * sel[:, None, :, None]).sum(2) / sel.sum(-1)).mean(1).float()
    return run


def reference(x):
    from align_ti.reference.attention_mass import attention_mass_reference

    return attention_mass_reference(x["q"], x["k"], x["query_mask"], x["attention_mask"])


BENCH = OpBench(
    name="attention_mass",
    description="instruction->vision attention mass of one layer (forward only)",
    make_inputs=make_inputs,
    providers={"align_ti": provider_align_ti, "eager_softmax": provider_eager_softmax},
    reference=reference,
    backward=False,
    tolerance=lambda p: 1e-5 if p["dtype"] == "float32" else 2e-3,
)

_CHECK = dict(L=160, vision=64, instruction=16, dtype="float32")
CASES = [
    *[Case("attention_mass", f"L={n} fp32", dict(L=n, dtype="float32"), _CHECK, quick=(n == 1024), x="L")
      for n in (1024, 2048)],
    *[Case("attention_mass", f"L={n} bf16", dict(L=n, dtype="bfloat16"), dict(_CHECK, dtype="bfloat16"),
           devices=("cuda",), x="L") for n in (1024, 2048)],
]
