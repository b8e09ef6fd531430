"""TPA expanded forward: cost of one forward over the expanded sequence vs the plain forward and
vs d separate forwards (issue 6, point 6).

An op of the benchmark registry (benchmarks/runner.py) with its own case runner: the expanded
forward has no scalar reference shared by all providers (``plain`` computes less, by design), so
it does not fit OpBench; the module gives `CASES` and `run_cases`, which the runner calls:

    align-ti bench --op branches [--device cpu|cuda] [--quick] [--reps N] [--out DIR]
    python -m align_ti.benchmarks.branches [--device cpu|cuda] [--reps N] [--out DIR] [--models tiny,qwen]

``--quick`` runs the tiny model at B=2, L=64, fraction 0.25 only.

Models (random weights, fp32 on CPU / bf16 on CUDA, decoder only: the LM heads are the fused
KL's business and are not run here; ``logits_to_keep=1``):
- ``tiny``: the tiny student text model of align_ti.models.tiny (hidden 64, 3 layers).
- ``qwen2.5-0.5b-shaped``: Qwen2.5-0.5B's layer shape (hidden 896, MLP 4864, 14 query / 2 KV
  heads, head_dim 64, rope theta 1e6); on CPU with 1 layer instead of 24 and B=1, L=128 (the
  2-core CPU run must stay under 3 minutes; the per-layer cost ratio is what the multiplier
  measures), and a 32000-row embedding
  (the vocabulary size does not change the decoder's cost). On CUDA: all 24 layers.
Batch: [prompt | response], right padded, response = half of L; d = 4 candidates per branched
step at 25% and 100% of the response positions branched.

Providers (each: forward with autograd + backward of a scalar of the hidden states, i.e. the
student's training step, and a no-grad forward, i.e. the teacher's):
- ``plain``: the unexpanded batch (what plain KD runs), SDPA with the 2-D mask.
- ``expanded_sdpa``: one forward over the expanded batch with the dense bool [B, 1, T, T] mask.
- ``expanded_eager``: the same with eager attention and the additive mask (CPU only).
- ``separate_d``: d forwards, each over an expanded batch with one candidate per branched step
  (the ground-truth stream recomputed d times).
- ``expanded_flex``: one forward with the FlexAttention BlockMask (CUDA only).
Summary per case: the measured cost multiplier vs ``plain`` (ratio of the minimum over the
repetitions, which are taken round-robin over the providers: the 2-core CPU is shared) and the token ratio T / L, which is
the expected multiplier (1 + d * fraction * response / L) for attention-light models.

Memory: CUDA: max_memory_allocated during fwd+bwd minus allocated before. CPU: max sampled RSS
during fwd+bwd minus RSS before, in this process (after gc + malloc_trim), so it is indicative.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import torch

from . import harness
from .harness import Case

D = 4
FRACTIONS = (0.25, 1.0)
MODELS = ("tiny", "qwen")
DEFAULT_REPS = 3  # the qwen-shaped cases take minutes on the 2-core CPU; repetitions are capped here

# the registry's view: one case per (model, fraction); run by `run_cases`, not by OpBench
BENCH = None
CASES = [Case("branches", f"{m} d={D} fraction={f}", {"model": m, "fraction": f}, reps=DEFAULT_REPS)
         for m in MODELS for f in FRACTIONS]
# --quick: the tiny model at B=2, L=64 (every provider runs; a few seconds on an idle 2-core CPU)
CASES.append(Case("branches", f"tiny-quick d={D} fraction=0.25",
                  {"model": "tiny", "fraction": 0.25, "batch": 2, "length": 64}, quick=True, reps=DEFAULT_REPS))


def model_specs(device: str) -> dict:
    from align_ti.models.tiny import tiny_text_config

    small = {"name": "tiny", "config": lambda: tiny_text_config("student"), "batch": 4, "length": 128}
    layers = 24 if device == "cuda" else 1
    qwen = {
        "name": "qwen2.5-0.5b-shaped" + ("" if device == "cuda" else f" ({layers} of 24 layers)"),
        "config": lambda: __import__("transformers").Qwen2Config(
            vocab_size=32000, hidden_size=896, intermediate_size=4864, num_hidden_layers=layers,
            num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6}, tie_word_embeddings=True),
        "batch": 1 if device == "cpu" else 4,
        "length": 128 if device == "cpu" else 2048,
    }
    return {"tiny": small, "qwen": qwen}


def make_batch(b: int, length: int, vocab: int, device):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, min(vocab, 1000), (b, length), generator=g)
    am = torch.ones(b, length, dtype=torch.long)
    labels = torch.full((b, length), -100)
    labels[:, length // 2:] = ids[:, length // 2:]
    if b > 1:  # right padding on the last sample
        am[-1, length - length // 8:] = 0
        ids[-1, length - length // 8:] = 0
        labels[-1, length - length // 8:] = -100
    return ids.to(device), am.to(device), labels.to(device)


def build_model(spec, attn: str, device, dtype):
    from transformers import Qwen2ForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen2ForCausalLM._from_config(spec["config"](), attn_implementation=attn, dtype=dtype)
    return model.to(device).train()


def _loss(outs):
    return sum(o.float().square().mean() for o in outs)


def memory(fn, device) -> float:
    """Peak extra bytes of one fwd+bwd (after a warm-up run)."""
    _loss(fn(True)).backward()
    harness.sync(device)
    harness.release_memory()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        _loss(fn(True)).backward()
        harness.sync(device)
        return torch.cuda.max_memory_allocated() - before
    before = harness.rss_bytes()
    with harness.RssSampler() as s:
        _loss(fn(True)).backward()
    return s.peak - before


def time_once(fn, device) -> tuple[float, float, float]:
    """(fwd, bwd, no-grad fwd) seconds of one run."""
    harness.sync(device)
    t0 = time.perf_counter()
    outs = fn(True)
    harness.sync(device)
    t1 = time.perf_counter()
    _loss(outs).backward()
    harness.sync(device)
    t2 = time.perf_counter()
    del outs
    with torch.no_grad():
        fn(False)
        harness.sync(device)
    t3 = time.perf_counter()
    return t1 - t0, t2 - t1, t3 - t2


def run_case(spec, fraction: float, device, dtype, reps: int, log=print) -> dict:
    from align_ti.ops.branches import build_expanded_batch, expanded_hidden_states, select_branch_steps

    b, length = spec["batch"], spec["length"]
    models = {"sdpa": build_model(spec, "sdpa", device, dtype)}
    if device.type == "cpu":
        models["eager"] = build_model(spec, "eager", device, dtype)
    else:
        models["flex_attention"] = build_model(spec, "flex_attention", device, dtype)
    vocab = models["sdpa"].config.vocab_size
    ids, am, labels = make_batch(b, length, vocab, device)
    steps = select_branch_steps(labels, am, fraction=fraction, seed=0)
    g = torch.Generator().manual_seed(1)
    cands = torch.randint(10, min(vocab, 1000), (*steps.shape, D), generator=g).to(device)
    eb = build_expanded_batch(ids, am, steps, cands, labels=labels)
    singles = [build_expanded_batch(ids, am, steps, cands[:, :, k:k + 1], labels=labels) for k in range(D)]
    base = models["sdpa"].get_decoder()

    def plain(grad):
        return [base(input_ids=ids, attention_mask=am, use_cache=False).last_hidden_state]

    def expanded(attn):
        m = models[attn]
        return lambda grad: [expanded_hidden_states(m, eb)]

    def separate(grad):
        return [expanded_hidden_states(models["sdpa"], s) for s in singles]

    providers = {"plain": plain, "expanded_sdpa": expanded("sdpa"), "separate_d": separate}
    if "eager" in models:
        providers["expanded_eager"] = expanded("eager")
    if "flex_attention" in models:
        providers["expanded_flex"] = expanded("flex_attention")
    # memory (with a warm-up) per provider, then the timed repetitions round-robin over the
    # providers, so that load from other processes spreads over all of them alike; the
    # multipliers use the minimum over repetitions (the least disturbed run)
    status, mem, times = {}, {}, {name: [] for name in providers}
    for name, fn in providers.items():
        try:
            mem[name] = memory(fn, device)
            status[name] = "ok"
        except Exception as e:  # reported, not fatal
            status[name] = f"failed: {type(e).__name__}: {e}"
        for m in models.values():
            m.zero_grad(set_to_none=True)
    for _ in range(reps):
        for name, fn in providers.items():
            if status[name] == "ok":
                times[name].append(time_once(fn, device))
                for m in models.values():
                    m.zero_grad(set_to_none=True)
    results = []
    for name in providers:
        if status[name] != "ok":
            results.append({"provider": name, "status": status[name]})
            log(f"{spec['name']:32s} frac={fraction:<5} {name:15s} {status[name]}")
            continue
        f, bw, ng = zip(*times[name])
        r = {"provider": name, "fwd": harness._stats(list(f)), "bwd": harness._stats(list(bw)),
             "fwd_bwd": harness._stats([a + b for a, b in zip(f, bw)]), "fwd_nograd": harness._stats(list(ng)),
             "peak_extra_mib": mem[name] / 2**20, "status": "ok"}
        results.append(r)
        log(f"{spec['name']:32s} frac={fraction:<5} {name:15s} fwd+bwd median {r['fwd_bwd']['median_s'] * 1e3:9.1f} ms  "
            f"no-grad fwd min {r['fwd_nograd']['min_s'] * 1e3:8.1f} ms  {r['peak_extra_mib']:8.1f} MiB")
    ok = {r["provider"]: r for r in results if r["status"] == "ok"}
    summary = {"T": eb.total_length, "L": length, "C": eb.num_slots,
               "token_ratio_T_over_L": eb.total_length / length}
    if "plain" in ok:
        p = ok["plain"]
        for name, r in ok.items():
            if name == "plain":
                continue
            summary[f"{name}_fwd_bwd_x_plain"] = r["fwd_bwd"]["min_s"] / p["fwd_bwd"]["min_s"]
            summary[f"{name}_nograd_fwd_x_plain"] = r["fwd_nograd"]["min_s"] / p["fwd_nograd"]["min_s"]
            summary[f"{name}_mem_x_plain"] = r["peak_extra_mib"] / max(p["peak_extra_mib"], 1e-9)
    return {"name": f"{spec['name']}, B={b}, L={length}, d={D}, fraction={fraction}",
            "params": {"model": spec["name"], "B": b, "L": length, "d": D, "fraction": fraction,
                       "dtype": str(dtype).replace("torch.", "")},
            "x": None, "results": results, "summary": summary}


def run_cases(cases, device: str, reps: int | None = None, log=print, quick: bool = False,
              checkpoint=None) -> dict:
    """The report (harness format: provenance, cases, results, summaries) of the given CASES.
    `checkpoint(report)`, if given, is called after every case (results kept as they come)."""
    dev = torch.device(device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    specs = model_specs(device)
    description = next(p for p in __doc__.split("\n\n") if p.startswith("Models"))
    report = {"op": "branches", "description": description, "device_type": device,
              "provenance": harness.provenance(device), "quick": quick,
              "memory_metric": ("max_memory_allocated during fwd+bwd minus allocated before" if device == "cuda"
                                else "max sampled RSS during fwd+bwd minus RSS before, in-process (indicative)"),
              "cases": []}
    t0 = time.perf_counter()
    for case in cases:
        case_reps = min(reps or DEFAULT_REPS, case.reps or DEFAULT_REPS)
        spec = dict(specs[case.params["model"]], **{k: case.params[k] for k in ("batch", "length")
                                                     if k in case.params})
        report["cases"].append(run_case(spec, case.params["fraction"], dev, dtype, case_reps, log=log))
        if checkpoint is not None:
            checkpoint(report)
    report["wall_s"] = time.perf_counter() - t0
    report["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m align_ti.benchmarks.branches", description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None)
    parser.add_argument("--reps", type=int, default=DEFAULT_REPS)
    parser.add_argument("--out", default=None)
    parser.add_argument("--models", default="tiny,qwen", help="comma list of: tiny, qwen")
    args = parser.parse_args(argv)
    dev_type = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    models = args.models.split(",")
    # standalone, --reps is taken as given (the runner caps it at DEFAULT_REPS)
    cases = [dataclasses.replace(c, reps=args.reps) for m in models for c in CASES
             if c.params["model"] == m and not c.quick]
    out_dir = args.out or os.path.join(harness.ROOT, "benchmarks", "results", dev_type)
    report = run_cases(cases, dev_type, reps=args.reps, checkpoint=lambda r: harness.write_json_md(
        r, harness.markdown(r), out_dir, "branches"))
    for p in harness.write_report(report, out_dir, "branches"):
        print("wrote", p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
