"""The markdown reports of `align_ti.benchmarks.train_step` (its JSON holds the same numbers)."""
from __future__ import annotations

import math

from . import harness

# the headings of the non-LLaVA model pairs (train_step.FAMILIES)
FAMILY_TITLES = {"qwen2_5_vl": "Qwen2.5-VL 7B -> 3B"}


def fmt(v, spec="{:.4g}"):
    """A number for a table (None -> "-")."""
    return "-" if v is None else spec.format(v)


def sections_markdown(results: list[dict]) -> list[str]:
    """The align-ti steps' record_function ranges as a table (seconds; none measured: [])."""
    measured = [r for r in results if r.get("sections_s")]
    if not measured:
        return []
    longest = max((list(r["sections_s"]) for r in measured), key=len)  # in the trainer's order
    names = list(dict.fromkeys(longest + [n for r in measured for n in r["sections_s"]]))
    lines = ["", "Where an align-ti step's forward time goes: the trainer's record_function ranges in one more step "
             "under torch.profiler (s; CPU time, or on CUDA the device time of the kernels launched inside the "
             "range; the backward is outside them):", "",
             "| way | objective | profiled step | " + " | ".join(n.removeprefix("align_ti.") for n in names) + " |",
             "|---|---|---|" + "---|" * len(names)]
    for r in measured:
        cells = [fmt(r["sections_s"].get(n)) for n in names]
        lines.append(f"| {r['way']} | {r['objective']} | {fmt(r['profiled_step_s'])} | " + " | ".join(cells) + " |")
    return lines


def _results_table(results: list[dict], cpu: bool) -> list[str]:
    cpu_head, cpu_rule = ("process CPU time (s) | ", "---|") if cpu else ("", "")
    lines = [f"| way | objective | attention | step time (s) | {cpu_head}peak memory (GiB) | FLOP model (TFLOP) | status |",
             f"|---|---|---|---|{cpu_rule}---|---|---|"]
    for r in results:
        model = r.get("model_flops")
        cpu_cell = f"{fmt(r.get('cpu_s_median'))} | " if cpu else ""
        lines.append(f"| {r['way']} | {r['objective']} | {r['attn_implementation']} | {fmt(r.get('step_s_median'))} | "
                     f"{cpu_cell}{fmt(r.get('peak_mem_gib'), '{:.3f}')} | "
                     f"{fmt(model and model['flops'] / 1e12, '{:.3f}')} | {r['status']}"
                     f"{': ' + r['error'][:160] if r.get('error') else ''} |")
    return lines


def _summary_table(summary: dict, cpu: bool) -> list[str]:
    cpu_head, cpu_rule = ("CPU time ratio | ", "---|") if cpu else ("", "")
    lines = [f"| comparison | time ratio | {cpu_head}FLOP model ratio | unavoidable FLOP ratio | memory ratio | "
             "extra memory (GiB) |", f"|---|---|{cpu_rule}---|---|---|---|"]
    for k, v in summary.items():
        cpu_cell = f"{fmt(v.get('cpu_time_ratio'), '{:.3f}x')} | " if cpu else ""
        lines.append(f"| {k} | {fmt(v.get('time_ratio'), '{:.3f}x')} | {cpu_cell}"
                     f"{fmt(v.get('flop_ratio'), '{:.3f}x')} | {fmt(v.get('unavoidable_flop_ratio'), '{:.3f}x')} | "
                     f"{fmt(v.get('mem_ratio'), '{:.3f}x')} | {fmt(v.get('extra_mem_gib'), '{:+.3f}')} |")
    return lines


def _shape_line(results: list[dict]) -> list[str]:
    ok = next((r for r in results if r.get("response_tokens")), None)
    if not ok:
        return []
    resp = ok["response_tokens"]
    cands = 4 * math.ceil(0.25 * resp)
    return ["", f"Per sample: L = {ok['length']} ({ok['n_vision']} vision, {ok['n_instruction']} instruction, "
            f"{resp} response tokens). TPA (d = 4 candidates at 25% of the response positions) adds {cands} "
            f"candidate tokens, {cands / ok['length']:.0%} of the sequence: the Align-TI / vanilla-KD ratio "
            "grows with the response's share of it."]


def markdown(report: dict) -> str:
    prov = report["provenance"]
    cpu = report.get("device_type") == "cpu"  # process CPU time: a column where it measures the step
    rounds = report.get("rounds", 1)
    lines = [f"# Distillation training step ({report['scale']} scale, {prov['device']})", "",
             f"torch {prov['versions'].get('torch')}, transformers {prov['versions'].get('transformers')}, "
             f"commit {prov.get('git_commit')}, {prov.get('date')}. "
             + (f"{rounds} rounds of {report['steps']} steps per (way, objective), taking turns, after "
                f"{report['warmup']} warm-up; a time is the median of the round medians" if rounds > 1 else
                f"Median of {report['steps']} steps after {report['warmup']} warm-up")
             + f"; memory = {report['memory_metric']}. Torch threads: {report.get('torch_threads')}. "
             f"Load average (1, 5, 15 min) at start: {prov.get('load_average_at_start')}, at end: "
             f"{report.get('load_average_at_end')}.", ""]
    for entry in report["cases"]:
        family = entry.get("family", "llava")
        title = entry["case"] if family == "llava" else f"{entry['case']}, {FAMILY_TITLES.get(family, family)}"
        lines += [f"## {title}", ""] + _results_table(entry["results"], cpu)
        lines += ["", *_summary_table(entry.get("summary", {}), cpu)]
        lines += _shape_line(entry["results"])
        lines += sections_markdown(entry["results"])
        for r in entry["results"]:
            if r.get("profile_top"):
                lines += ["", f"Where the GPU time of one {r['way']} {r['objective']} step goes (torch.profiler, "
                          "top ops and kernels by self device time):", ""]
                lines += harness.profile_markdown(r["profile_top"])
            if r.get("host_syncs") is not None:
                lines += harness.host_syncs_markdown(r["host_syncs"], f"one {r['way']} {r['objective']} step")
        lines.append("")
    lines += ["FLOP model: `align_ti.benchmarks.flops` (matrix products of the step as computed: causal "
              "attention counts its lower triangle, a dense-masked one its full square; validated against "
              "FlopCounterMode); unavoidable: Align-TI's own work (the candidates' pass through both models, "
              "their attention to their prefix, their KL rows, IVA) over vanilla KD's.",
              "The paper reports Align-TI / vanilla KD = 1.43x step time and +5 GiB (paper code).",
              "See the module docstring of align_ti.benchmarks.train_step for what is approximated.", ""]
    return "\n".join(lines)


def iva_markdown(report: dict) -> str:
    prov, sh, share = report["provenance"], report["shape"], report["iva_share"]
    lines = [f"# IVA share of a vanilla-KD distillation step ({report['scale']} scale, {prov['device']})", "",
             f"torch {prov['versions'].get('torch')}, transformers {prov['versions'].get('transformers')}, "
             f"commit {prov.get('git_commit')}, {prov.get('date')}. {report['steps']} alternating rounds after "
             f"{report['warmup']} warm-up round(s).  ",
             f"Load average (1, 5, 15 min) at start: {prov.get('load_average_at_start')}, "
             f"at end: {report.get('load_average_at_end')}", "",
             f"Shape: micro-batch {sh['batch']}, L = {sh['length']} ({sh['n_vision']} vision, "
             f"{sh.get('n_instruction', 32)} instruction tokens), IVA layer {sh['iva_layer']}, {sh['dtype']}; "
             f"student {sh['student']}; teacher {sh['teacher']}"
             + (f" (the full-scale Qwen2.5-0.5B / Qwen2-7B pair with widths, vocabularies and lengths / "
                f"{sh['divisor']}, layer and head counts kept)" if sh.get("divisor", 1) > 1 else "") + ".", "",
             "| way | objective | loss terms | step median (s) | step min (s) | process CPU time median (s) | status |",
             "|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        lines.append(f"| {r['way']} | {r['objective']} | {', '.join(r['terms'])} | {fmt(r['step_s_median'])} | "
                     f"{fmt(r['step_s_min'])} | {fmt(r.get('cpu_s_median'))} | {r['status']} |")
    lines += ["", f"**IVA share of the step** = (KD+IVA - KD) / (KD+IVA): {share['share_of_medians']:.2%} "
                  f"(medians; median of paired rounds {share['share_paired_median']:.2%}, minima "
                  f"{share['share_of_minima']:.2%}, process CPU time medians "
                  f"{share['share_of_cpu_time_medians']:.2%}); IVA costs {share['iva_s_median'] * 1e3:.1f} ms "
                  f"per step.  ",
              f"Cross-check under torch.profiler ({report['steps']} more KD+IVA steps): time inside the trainer's "
              f"`align_ti.iva_mass` + `align_ti.iva` ranges (attention_mass, topk_align) / step time = "
              f"{share['share_inside_iva_ops_median']:.2%} (median over steps).", "",
              "Each step: student forward + backward, teacher forward (no grad), fused SFT + KD on the response "
              "rows, AdamW; + IVA: q/k capture at the IVA layer, attention_mass, topk_align over all vision rows "
              "(mass-weighted, the LossSpec default). The paper reports IVA as nearly free; the FLOP estimate "
              "was ~4%.", "",
              "Reading the numbers: IVA adds a few percent to a step, so on a machine shared with other work the "
              "wall-clock difference of two noisy step times is the least reliable estimate (see the minimum "
              "and maximum step times); process CPU time (with one torch thread) and the profiler's cross-check "
              "are the steadier ones.", ""]
    return "\n".join(lines)
