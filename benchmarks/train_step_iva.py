"""The IVA share of a vanilla-KD step (issue 5): ``python -m align_ti.benchmarks.train_step --iva-share``.

Instead of the train-step benchmark's ways: vanilla KD vs vanilla KD + IVA (no TPA) with the
align-ti way (`DistillModule`, i.e. the trainer's step) on the same models, alternating steps, and
the IVA share = (t[KD+IVA] - t[KD]) / t[KD+IVA] from wall-clock medians, minima, per-round pairs
and process CPU time, plus a cross-check from torch.profiler (the time inside the trainer's
``align_ti.iva_mass`` and ``align_ti.iva`` ranges / step time, in as many more KD+IVA steps);
writes train_step-iva_share.{json,md}. On a shared CPU, ``--threads 1`` makes process CPU time
meaningful (no OpenMP threads spinning for a preempted sibling). The models and batch are the
train-step benchmark's long-response case.
"""
from __future__ import annotations

import os
import statistics
import time

import torch

from . import harness
from .train_step_report import iva_markdown

IVA_SECTIONS = ("align_ti.iva_mass", "align_ti.iva")  # IVA's own work in the trainer's step


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

    from .train_step import _distill_module, build_setup, make_batch

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


def main_iva_share(args, scale: str, device: torch.device, out: str) -> dict:
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
