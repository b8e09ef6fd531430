"""End-to-end distillation training-step benchmark (issue 8, item 3).

    python -m align_ti.benchmarks.train_step [--device cpu|cuda] [--scale full|reduced|tiny] [--out DIR]
    python -m align_ti.benchmarks.train_step --iva-share [--scale ...] [--steps N] [--threads 1]

Times ONE distillation step (student + teacher forwards, loss, backward, optimizer step) and
its peak memory, three ways:

=============  ==============================================================================
way            what runs
=============  ==============================================================================
paper-code     both models ``attn_implementation="eager"`` and ``output_attentions=True``;
               full fp32 ``[B, L, V]`` logits of both models are materialised and every term
               is computed on them in plain PyTorch (log_softmax / KL / cross-entropy);
               `align_ti.benchmarks.train_step_paper` says what it does exactly.
align-ti       both models ``sdpa``; the loss is `align_ti.train.loss.DistillModule`'s
               forward, built directly from the two models (fused_linear_distill,
               capture_qk + attention_mass + topk_align, TPA with align_ti.ops.branches).
align-ti       the same with ``fp32_weight_grad=False`` (config ``fp32_weight_grad: false``):
bf16-dw        the LM head's weight gradient accumulates in bf16 over the row chunks, not in
               an fp32 ``[V, H]`` buffer; measured last, after the two ways above.
align-ti flex  (only with ``--ways``) the align-ti way with both language models on
               FlexAttention (config ``attn_implementation: flex_attention``), which skips the
               masked blocks of TPA's expanded sequence.
=============  ==============================================================================

each for two objectives:

- ``vanilla-KD``: SFT (cross-entropy) + forward KL(p_T || p_S) over the response rows.
- ``Align-TI``: vanilla-KD + IVA (teacher instruction->vision attention mass at one teacher
  layer, weighting a KL at every vision token; ``iva_k=None``, i.e. all vision tokens
  mass-weighted, the `LossSpec` default) + TPA (d = 4 candidates at 25% of the response
  positions, sampled from the student).

The two ways compute the same *kind* of terms at the same cost class; the loss values are not
identical (different candidate sampling; the paper-code way's branches share a sequence). Both
compare the first V' = min(Vs, Vt) vocabulary entries (student 151936 rows, teacher 152064).

Models (random weights, built from configs, nothing downloaded):

- ``--scale full``: LlavaForConditionalGeneration with a Qwen2.5-0.5B-shaped student
  (hidden 896, 24 layers, 14/2 heads, FFN 4864, vocab 151936) and a Qwen2-7B-shaped teacher
  (hidden 3584, 28 layers, 28/4 heads, FFN 18944, vocab 152064); micro-batch 2, L = 2048 of
  which 729 vision tokens; bf16 weights on CUDA, AdamW on the student's (bf16) parameters.
  APPROXIMATION: the vision tower is a *tiny* 1-layer SigLIP (hidden 64) with 378 px / 14 px
  patches = 729 patches, standing in for SigLIP-so400m: it produces the right number of image
  tokens through the real LLaVA projector, but its own compute/memory (identical in all four
  runs) is left out.
- ``--scale reduced``: the full-scale pair with every width (hidden, FFN, head_dim), both
  vocabularies, L, the vision and the instruction lengths divided by 8, layer and head counts
  kept (student hidden 112, teacher 448, V 18992 / 19008, L = 228 with 81 = 9 x 9 vision and
  4 instruction tokens): per token, body (~H^2 per layer) : LM head (V*H) : attention (L*H)
  costs keep the full-scale proportions, so cost *shares* carry over; runs on a CPU.
- ``--scale tiny``: the `align_ti.models.tiny` pair (36 vision tokens, L = 160, fp32, CPU);
  proves the script runs in well under a minute; its numbers say nothing about the real scale.

``--iva-share`` (issue 5): instead of the ways above, vanilla KD vs vanilla KD + IVA (no TPA) with
the align-ti way (`DistillModule`, i.e. the trainer's step) on the same models, alternating
steps, and the IVA share = (t[KD+IVA] - t[KD]) / t[KD+IVA] from wall-clock medians, minima,
per-round pairs and process CPU time, plus a cross-check from torch.profiler (the time inside
the trainer's ``align_ti.iva_mass`` and ``align_ti.iva`` ranges / step time, in as many more
KD+IVA steps); writes train_step-iva_share.{json,md}. On a shared CPU, ``--threads 1`` makes
process CPU time meaningful (no OpenMP threads spinning for a preempted sibling).

Sections: `DistillModule.forward` names its steps with ``torch.profiler.record_function``
ranges (`align_ti.train.loss.SECTIONS`). After timing, each align-ti way runs one more step
under torch.profiler and reports the time of each range (`harness.section_times`: CPU time, or
on CUDA the device time of the kernels launched inside it); a range that recorded nothing is
an error, never a zero.

Timing: median of ``--steps`` steps after ``--warmup`` steps (CUDA: synchronised). Peak memory:
CUDA ``max_memory_allocated`` over the timed steps (models + optimizer state included);
CPU: peak RSS sampled by `harness.RssSampler` during the timed steps. An out-of-memory run is
reported as such instead of stopping the script.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from align_ti.constants import IGNORE_INDEX

from . import harness
from .train_step_paper import paper_step_fn
from .train_step_report import fmt, iva_markdown, markdown

REDUCED_DIVISOR = 8  # --scale reduced: full-scale widths, vocabularies and lengths / 8


# ------------------------------------------------------------------------------------------
# models and batch
# ------------------------------------------------------------------------------------------

def _full_configs(div: int = 1):
    """The full-scale pair, or (``div`` > 1) the same pair with every width, the vocabularies,
    the sequence, vision and instruction lengths divided by ``div`` (layer and head counts kept).

    Why that keeps the cost shares: per token, a decoder layer costs ~H^2 and an LM head V*H, so
    dividing H and V by the same factor keeps every body : head ratio (student, teacher, both
    heads) with the layer counts unchanged; attention costs L*H per token, so L shrinks with H;
    and the vision / instruction / response fractions of the sequence stay the same.
    """
    from transformers import LlavaConfig, Qwen2Config, SiglipVisionConfig

    image_token_id, pad_id, eos_id = 151655, 151643, 151645
    # reduced vocabularies keep the special ids below the vocabulary size
    if div > 1:
        image_token_id, pad_id, eos_id = (151936 // div) - 3, (151936 // div) - 2, (151936 // div) - 1
    n_side = max(2, int((729 / div) ** 0.5))  # SigLIP-so400m-384: 27 x 27 patches; div 8: 9 x 9
    n_vision = n_side * n_side
    length = 2048 if div == 1 else round(n_vision * 2048 / 729)

    def text(**kw):
        return Qwen2Config(max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False,
                           pad_token_id=pad_id, eos_token_id=eos_id, bos_token_id=None,
                           rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, **kw)

    def llava(text_cfg):
        vision = SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                    num_attention_heads=4, image_size=14 * n_side, patch_size=14,
                                    vision_use_head=False)
        return LlavaConfig(vision_config=vision, text_config=text_cfg, image_token_index=image_token_id,
                           image_seq_length=n_vision, vision_feature_select_strategy="full",
                           vision_feature_layer=-1, projector_hidden_act="gelu", tie_word_embeddings=False)

    student = llava(text(vocab_size=151936 // div, hidden_size=896 // div, intermediate_size=4864 // div,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         head_dim=64 // div))
    teacher = llava(text(vocab_size=152064 // div, hidden_size=3584 // div, intermediate_size=18944 // div,
                         num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                         head_dim=128 // div))
    return student, teacher, dict(image_token_id=image_token_id, pad_id=pad_id, batch=2, length=length,
                                  n_vision=n_vision, n_instruction=max(1, 32 // div), image_size=14 * n_side,
                                  iva_layer=14, token_low=1000 // div, token_high=150000 // div,
                                  divisor=div)


def build_setup(scale: str, device: torch.device, attn: str):
    """(student, teacher, meta) with the given attention implementation (FlexAttention: for the
    language models only, as the trainer does; the unmasked vision tower keeps sdpa)."""
    from transformers import LlavaForConditionalGeneration

    from align_ti.train.data import language_model_attention

    if attn == "flex_attention":
        attn = language_model_attention(attn)

    if scale == "tiny":
        from align_ti.models.tiny import IMAGE_SIZE, IMAGE_TOKEN_ID, PAD_TOKEN_ID, build_tiny_llava

        student = build_tiny_llava("student", seed=0, attn_implementation=attn)
        teacher = build_tiny_llava("teacher", seed=1, attn_implementation=attn)
        n_vision = student.config.image_seq_length
        meta = dict(image_token_id=IMAGE_TOKEN_ID, pad_id=PAD_TOKEN_ID, batch=2, length=160,
                    n_vision=n_vision, image_size=IMAGE_SIZE, iva_layer=2, token_low=64, token_high=1000)
    else:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        s_cfg, t_cfg, meta = _full_configs(REDUCED_DIVISOR if scale == "reduced" else 1)
        # built on the target device: a 7B-shaped teacher's random init takes tens of seconds
        # on a CPU and well under one on a GPU (a lent GPU's time is short)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device:
            torch.manual_seed(0)
            student = LlavaForConditionalGeneration._from_config(s_cfg, attn_implementation=attn, dtype=dtype)
            torch.manual_seed(1)
            teacher = LlavaForConditionalGeneration._from_config(t_cfg, attn_implementation=attn, dtype=dtype)
    student.to(device).train()
    teacher.to(device).eval().requires_grad_(False)
    return student, teacher, meta


def make_batch(meta: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """[prefix 2][vision n_vision][instruction n_instruction (32)][response ...] per sample, seeded."""
    g = torch.Generator().manual_seed(1234)
    b, length, nv = meta["batch"], meta["length"], meta["n_vision"]
    ids = torch.randint(meta["token_low"], meta["token_high"], (b, length), generator=g)
    ids[:, 2:2 + nv] = meta["image_token_id"]
    instr_end = 2 + nv + meta.get("n_instruction", 32)
    instruction_mask = torch.zeros(b, length, dtype=torch.long)
    instruction_mask[:, 2 + nv:instr_end] = 1
    labels = ids.clone()
    labels[:, :instr_end] = IGNORE_INDEX
    pixel_values = torch.randn(b, 3, meta["image_size"], meta["image_size"], generator=g)
    return {
        "input_ids": ids.to(device), "attention_mask": torch.ones(b, length, dtype=torch.long, device=device),
        "labels": labels.to(device), "instruction_mask": instruction_mask.to(device),
        "pixel_values": pixel_values.to(device, dtype),
    }


# ------------------------------------------------------------------------------------------
# the align-ti way
# ------------------------------------------------------------------------------------------

BF16_DW = "align-ti bf16-dw"  # the align-ti way with fp32_weight_grad=False
FLEX = "align-ti flex"        # the align-ti way on FlexAttention
WAYS = ("paper-code", "align-ti", BF16_DW, FLEX)
DEFAULT_WAYS = ("paper-code", "align-ti", BF16_DW)


def _distill_module(student, teacher, meta, spec):
    """The trainer's loss module over the benchmark's models (the batch's image and pad ids
    never become TPA candidates; candidates come from the shared vocabulary V')."""
    from align_ti.train.loss import DistillModule

    vprime = min(student.config.text_config.vocab_size, teacher.config.text_config.vocab_size)
    return DistillModule(student, teacher, spec, image_token_id=meta["image_token_id"],
                         pad_token_id=meta["pad_id"], forbidden_ids=(meta["image_token_id"], meta["pad_id"]),
                         vocab_limit=vprime)


def aligned_step_fn(student, teacher, batch, meta, align_ti: bool, device: torch.device,
                    fp32_weight_grad: bool = True):
    from align_ti.train.loss import LossSpec

    spec = LossSpec(w_sft=1.0, w_kd=1.0, w_iva=1.0 if align_ti else 0.0, w_tpa=1.0 if align_ti else 0.0,
                    iva_layer=meta["iva_layer"], tpa_d=4, tpa_fraction=0.25,
                    fp32_weight_grad=fp32_weight_grad)
    module = _distill_module(student, teacher, meta, spec)

    def loss_and_backward():
        out = module(**batch)
        out["loss"].backward()
        return out["loss"].detach()

    return loss_and_backward


# ------------------------------------------------------------------------------------------
# measuring
# ------------------------------------------------------------------------------------------

IVA_SECTIONS = ("align_ti.iva_mass", "align_ti.iva")  # IVA's own work in the trainer's step


def expected_sections(objective: str) -> tuple[str, ...]:
    """The record_function ranges of `DistillModule.forward` an align-ti step of `objective`
    must record (vanilla KD: the two forwards and SFT+KD; Align-TI: every one)."""
    from align_ti.train.loss import SECTIONS, SINGLE_PASS_SECTIONS

    if objective == "Align-TI":
        return SECTIONS + SINGLE_PASS_SECTIONS
    return ("align_ti.student_forward", "align_ti.teacher_forward") + SINGLE_PASS_SECTIONS


def measure(way: str, objective: str, scale: str, device: torch.device, warmup: int, steps: int,
            profile: bool = False) -> dict:
    attn = {"paper-code": "eager", FLEX: "flex_attention"}.get(way, "sdpa")
    rec = {"way": way, "objective": objective, "attn_implementation": attn}
    harness.release_memory()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    student = teacher = opt = None
    try:
        student, teacher, meta = build_setup(scale, device, attn)
        batch = make_batch(meta, device, next(student.parameters()).dtype)
        align = objective == "Align-TI"
        if way == "paper-code":
            fn = paper_step_fn(student, teacher, batch, meta, align)
        else:
            fn = aligned_step_fn(student, teacher, batch, meta, align, device,
                                 fp32_weight_grad=way != BF16_DW)
        opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-5)

        def step():
            loss = fn()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

        for _ in range(warmup):
            step()
        harness.sync(device)
        times, losses = [], []
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            for _ in range(steps):
                t0 = time.perf_counter()
                losses.append(float(step()))
                harness.sync(device)
                times.append(time.perf_counter() - t0)
            peak = torch.cuda.max_memory_allocated(device)
        else:
            harness.release_memory()
            with harness.RssSampler() as rss:
                for _ in range(steps):
                    t0 = time.perf_counter()
                    losses.append(float(step()))
                    times.append(time.perf_counter() - t0)
            peak = rss.peak
        if way != "paper-code":  # where the step's time goes, by the trainer's ranges (one more step)
            prof = harness.section_times(step, device, expected_sections(objective))
            rec.update(sections_s=prof["sections_s"], profiled_step_s=prof["step_s"])
        if profile and device.type == "cuda":  # where the step's GPU time goes (one more step)
            rec["profile_top"] = harness.profile_top(step, top=15)
            rec["host_syncs"] = harness.host_syncs(step)  # and where it waits for the GPU
        rec.update(status="ok", step_s_median=statistics.median(times), step_s_all=times,
                   peak_mem_bytes=int(peak), peak_mem_gib=peak / 2 ** 30, loss=losses[-1],
                   batch=meta["batch"], length=meta["length"], n_vision=meta["n_vision"],
                   response_tokens=int((batch["labels"][0] != IGNORE_INDEX).sum()),
                   dtype=str(next(student.parameters()).dtype))
    except torch.OutOfMemoryError as e:  # noqa: PERF203
        rec.update(status="OOM", error=str(e).splitlines()[0][:300])
    except Exception as e:  # a way that cannot run here is reported; the other ways still run
        rec.update(status=f"failed: {type(e).__name__}", error=str(e).splitlines()[0][:300] if str(e) else "")
    finally:
        del student, teacher, opt
        harness.release_memory()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rec


def measure_iva_share(scale: str, device: torch.device, warmup: int, steps: int, log=print) -> dict:
    """Step time of vanilla KD vs vanilla KD + IVA (no TPA), the align-ti way, and the IVA share.

    Both objectives are `DistillModule`s over the *same* student and teacher (the trainer's real
    step: one student forward with grad, one teacher forward without, fused SFT+KD over the
    response rows; + IVA: the teacher pass captures the IVA layer's q/k, `attention_mass` and
    `topk_align` over the vision rows), each followed by backward and the AdamW step. The steps
    alternate A B B A ... so that load from other processes falls on both alike; the share uses
    the medians and, as a check, the median of the per-round paired shares.
    """
    from align_ti.train.loss import LossSpec

    student, teacher, meta = build_setup(scale, device, "sdpa")
    batch = make_batch(meta, device, next(student.parameters()).dtype)
    modules = {}
    for name, w_iva in (("vanilla-KD", 0.0), ("vanilla-KD + IVA", 1.0)):
        # a fused KL call per term: IVA's rows in a range of their own (IVA_SECTIONS)
        spec = LossSpec(w_sft=1.0, w_kd=1.0, w_iva=w_iva, w_tpa=0.0, iva_layer=meta["iva_layer"],
                        kl_pass="per_term")
        modules[name] = _distill_module(student, teacher, meta, spec)
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-5)
    terms = {}

    def step(name):
        out = modules[name](**batch)
        out["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        terms[name] = sorted(out["terms"])

    names = list(modules)
    for _ in range(warmup):
        for name in names:
            step(name)
    times = {name: [] for name in names}
    cpu = {name: [] for name in names}  # process CPU time: less skewed by other processes
    for i in range(steps):
        for name in (names if i % 2 == 0 else names[::-1]):
            harness.sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            step(name)
            harness.sync(device)
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
        log(f"  round {i + 1}/{steps}: " + ", ".join(f"{n} {times[n][-1]:.3f} s (cpu {cpu[n][-1]:.3f} s)"
                                                     for n in names))
    inside = []  # cross-check: the IVA ranges' share of profiled KD+IVA steps
    for i in range(steps):
        prof = harness.section_times(lambda: step(names[1]), device, IVA_SECTIONS)
        inside.append(sum(prof["sections_s"].values()) / prof["step_s"])
        log(f"  profiled {names[1]} step {i + 1}/{steps}: IVA ranges {inside[-1]:.1%} of the step")
    kd, iva = (times[n] for n in names)
    med_kd, med_iva = statistics.median(kd), statistics.median(iva)
    paired = [(b - a) / b for a, b in zip(kd, iva)]
    ckd, civa = (statistics.median(cpu[n]) for n in names)
    results = [{"way": "align-ti", "objective": n, "attn_implementation": "sdpa", "status": "ok",
                "terms": terms[n], "step_s_median": statistics.median(times[n]), "step_s_min": min(times[n]),
                "step_s_all": times[n], "cpu_s_median": statistics.median(cpu[n]), "cpu_s_all": cpu[n]}
               for n in names]
    return {
        "results": results,
        "iva_share": {
            "definition": "(t[KD+IVA] - t[KD]) / t[KD+IVA], medians of alternating steps",
            "share_of_medians": (med_iva - med_kd) / med_iva,
            "share_paired_median": statistics.median(paired),
            "share_of_minima": (min(iva) - min(kd)) / min(iva),
            "share_of_cpu_time_medians": (civa - ckd) / civa,
            "share_inside_iva_ops_median": statistics.median(inside),
            "inside_definition": "time inside the trainer's record_function ranges align_ti.iva_mass "
                                 "(attention_mass) and align_ti.iva (topk_align's forward; its gradient is "
                                 "computed there, the backward only scales it) / the step's time, both under "
                                 "torch.profiler, in as many extra KD+IVA steps",
            "iva_s_median": med_iva - med_kd,
        },
        "shape": {k: meta[k] for k in ("batch", "length", "n_vision", "n_instruction", "iva_layer", "divisor")
                  if k in meta} | {
            "student": _shape(student), "teacher": _shape(teacher),
            "dtype": str(next(student.parameters()).dtype)},
    }


def _shape(model) -> dict:
    c = model.config.text_config
    return {"hidden": c.hidden_size, "layers": c.num_hidden_layers, "heads": c.num_attention_heads,
            "kv_heads": c.num_key_value_heads, "head_dim": getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads, "ffn": c.intermediate_size,
            "vocab": c.vocab_size}


def _ratio(a, b, key):
    if a.get("status") == "ok" and b.get("status") == "ok" and b[key]:
        return a[key] / b[key]
    return None


def _compare(a, b, extra_mem: bool = True) -> dict:
    """Step a against step b: time and memory ratios (and a's extra memory in GiB)."""
    out = {"time_ratio": _ratio(a, b, "step_s_median")}
    if extra_mem:
        both_ok = a.get("status") == b.get("status") == "ok"
        out["extra_mem_gib"] = (a["peak_mem_gib"] - b["peak_mem_gib"]) if both_ok else None
    out["mem_ratio"] = _ratio(a, b, "peak_mem_bytes")
    return out


def summarize(results: list[dict]) -> dict:
    by = {(r["way"], r["objective"]): r for r in results}
    # (label, numerator, denominator, with extra memory); pairs of a partial report (written
    # after every way) that are not measured yet are left out
    pairs = [(f"{way}: Align-TI / vanilla-KD", (way, "Align-TI"), (way, "vanilla-KD"), True)
             for way in ("paper-code", "align-ti")]
    pairs += [(f"{obj}: align-ti / paper-code", ("align-ti", obj), ("paper-code", obj), False)
              for obj in ("vanilla-KD", "Align-TI")]
    pairs += [(f"{obj}: {variant} / align-ti", (variant, obj), ("align-ti", obj), True)
              for variant in (BF16_DW, FLEX) for obj in ("vanilla-KD", "Align-TI")]
    return {label: _compare(by[num], by[den], extra) for label, num, den, extra in pairs
            if num in by and den in by}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--scale", choices=("full", "reduced", "tiny"), default=None,
                   help="default: full on cuda, tiny on cpu (reduced: full / %d, see _full_configs)" % REDUCED_DIVISOR)
    p.add_argument("--iva-share", action="store_true",
                   help="instead of the three ways: vanilla KD vs vanilla KD + IVA (align-ti), alternating "
                        "steps, and the IVA share of the step; writes train_step-iva_share.{json,md}")
    p.add_argument("--out", default=None, help="default: benchmarks/results/<device>/")
    p.add_argument("--ways", default=",".join(DEFAULT_WAYS),
                   help=f"comma-separated ways to measure, in order, from {', '.join(WAYS)}")
    p.add_argument("--stem", default="train_step", help="results file name (without .json/.md)")
    p.add_argument("--profile", action="store_true",
                   help="CUDA: after timing, profile one more step of each way (top ops by GPU time)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's). 1 makes process CPU time a load-proof "
                        "measure on a shared machine (no OpenMP spin-waiting for preempted threads)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    scale = args.scale or ("full" if args.device == "cuda" else "tiny")
    device = torch.device(args.device)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", args.device)
    torch.manual_seed(0)
    if args.iva_share:
        return _main_iva_share(args, scale, device, out)

    results = []
    prov = harness.provenance(args.device)
    ways = [w.strip() for w in args.ways.split(",") if w.strip()]
    unknown = [w for w in ways if w not in WAYS]
    if unknown or not ways:
        p.error(f"--ways: unknown {unknown}; choose from {list(WAYS)}")
    if FLEX in ways and args.device != "cuda":
        p.error(f"--ways: {FLEX!r} needs --device cuda (FlexAttention has no backward on CPU)")
    for way in ways:
        for objective in ("vanilla-KD", "Align-TI"):
            t0 = time.perf_counter()
            r = measure(way, objective, scale, device, args.warmup, args.steps, profile=args.profile)
            print(f"{way:>10} {objective:>10}: {r['status']:>3}  step {fmt(r.get('step_s_median'))} s  "
                  f"peak {fmt(r.get('peak_mem_gib'), '{:.3f}')} GiB  (took {time.perf_counter() - t0:.1f} s)",
                  flush=True)
            results.append(r)
            # after every way, so a run stopped by a time limit (a lent GPU) keeps the ones done
            report = {
                "benchmark": "train_step", "scale": scale, "warmup": args.warmup, "steps": args.steps,
                "memory_metric": ("torch.cuda.max_memory_allocated" if device.type == "cuda"
                                  else "peak sampled RSS (process)"),
                "provenance": prov, "results": results, "summary": summarize(results),
            }
            md = markdown(report)
            harness.write_json_md(report, md, out, args.stem)
    print(md)
    print(f"wrote {out}/{args.stem}.json and {args.stem}.md")
    return report


def _main_iva_share(args, scale: str, device: torch.device, out: str) -> dict:
    prov = harness.provenance(args.device)
    t0 = time.perf_counter()
    r = measure_iva_share(scale, device, args.warmup, args.steps)
    report = {"benchmark": "train_step", "variant": "iva_share", "scale": scale, "warmup": args.warmup,
              "steps": args.steps, "torch_threads": torch.get_num_threads(), "provenance": prov, **r, "wall_s": time.perf_counter() - t0,
              "load_average_at_end": [round(x, 2) for x in os.getloadavg()]}
    md = iva_markdown(report)
    harness.write_json_md(report, md, out, "train_step-iva_share")
    print(md)
    print(f"wrote {out}/train_step-iva_share.json and train_step-iva_share.md")
    return report


if __name__ == "__main__":
    main()
