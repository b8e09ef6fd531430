"""`align-ti demo`: SFT vs vanilla KD vs IVA vs TPA vs Align-TI on tiny LLaVA models, on CPU.

What it does (everything built in code, nothing downloaded):

1. Builds the synthetic visual QA task (`align_ti.data.synthetic`: coloured shapes on a grid,
   questions whose answers need the image), a training split and a held-out split whose
   images never appear in training.
2. Trains a tiny LLaVA *teacher* (SigLIP tower + Qwen2 text model) by SFT with the same
   trainer (`align_ti.train.build`, `transformers.Trainer`), then picks the IVA layer by
   IRS (argmax over the teacher's layers on calibration pairs from the training data).
3. Trains *students* (one smaller size) from the same initial weights (per seed), with the
   same number of optimizer steps, batch size, learning-rate schedule and data order (per
   seed), by each method:

   ======== ===================================================
   SFT      w_sft=1
   KD       w_sft=1, w_kd=1               (vanilla next-token KD)
   IVA      w_sft=1, w_kd=1, w_iva=1      (KD + instruction-aware vision alignment)
   TPA      w_sft=1, w_kd=1, w_tpa=1      (KD + transition probability alignment)
   Align-TI w_sft=1, w_kd=1, w_iva=1, w_tpa=1
   ======== ===================================================

   ("IVA only" / "TPA only" add one Align-TI component to vanilla KD, which is how the
   paper's ablation reads; the weights are in results.json.)
4. Measures on the held-out split: exact-match accuracy (greedy answer == reference answer;
   computed as "argmax at every answer position and at the closing eos is the reference
   token given the reference prefix", which is exactly greedy decoding's exact match),
   teacher-student KL(p_T || p_S) averaged over the answer positions, and the wall time of
   each training run. Accuracy is reported as mean and standard deviation over seeds.
5. Writes ``results.json``, ``results.md``, ``accuracy.png`` and ``loss_curves.png`` under
   ``--out`` and prints the table.

The numbers are what this tiny setting measures, whichever order the methods come out in:
with a few hundred CPU steps on random-weight tiny models, differences between methods are
often within the seed spread.
"""
from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, replace

METHODS = {
    "SFT": dict(w_sft=1.0, w_kd=0.0, w_iva=0.0, w_tpa=0.0),
    "KD": dict(w_sft=1.0, w_kd=1.0, w_iva=0.0, w_tpa=0.0),
    "IVA": dict(w_sft=1.0, w_kd=1.0, w_iva=1.0, w_tpa=0.0),
    "TPA": dict(w_sft=1.0, w_kd=1.0, w_iva=0.0, w_tpa=1.0),
    "Align-TI": dict(w_sft=1.0, w_kd=1.0, w_iva=1.0, w_tpa=1.0),
}
METHOD_LABELS = {"SFT": "SFT", "KD": "vanilla KD", "IVA": "IVA only (+KD)", "TPA": "TPA only (+KD)",
                 "Align-TI": "Align-TI (all)"}


@dataclass
class DemoSettings:
    """Sizes and optimisation of one demo run (the defaults are the full demo)."""

    seeds: tuple = (0, 1, 2)
    methods: tuple = tuple(METHODS)
    train_images: int = 600            # training scenes
    heldout_images: int = 150
    questions_per_image: int | None = None   # None = every well-defined question of a scene
    teacher_steps: int = 600
    teacher_lr: float = 1e-3           # the wider teacher is unstable at the students' 3e-3
    student_steps: int = 300
    student_lr: float = 3e-3
    batch_size: int = 16
    warmup_steps: int = 15
    patch_size: int = 16               # 48x48 images -> 9 image tokens
    max_objects: int = 2               # objects per scene (fewer = an easier task for tiny models)
    min_objects: int = 1
    # keep only questions starting with one of these (() = all). Default: the colour and shape
    # questions, which the tiny models learn to answer from the image within CPU minutes (with
    # all question types the tiny teacher stays near the image-blind baseline for 1000+ steps)
    question_prefixes: tuple = ("What colour is the", "What shape is")
    tpa_d: int = 4
    tpa_fraction: float = 0.5
    iva_layer: object = "auto"
    irs_samples: int = 32
    logging_steps: int = 5
    threads: int | None = 1            # torch CPU threads: the tiny matmuls gain little from more,
                                       # and a second thread thrashes on a busy machine

    @classmethod
    def quick(cls) -> "DemoSettings":
        return cls(train_images=100, heldout_images=40, teacher_steps=80, student_steps=20,
                   batch_size=8, warmup_steps=3, irs_samples=8, logging_steps=2)


# --------------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------------

def evaluate(model, examples, teacher=None, batch_size: int = 64) -> dict:
    """Held-out exact-match accuracy of ``model`` (and KL(p_T || p_S) over answer positions when
    a teacher is given). Logits are made for the answer rows only, never [B, L, V]."""
    import torch

    from align_ti.constants import IGNORE_INDEX
    from align_ti.data.llava import pad_batch
    from align_ti.ops.branches import next_token_targets
    from align_ti.ops.fused_kl import fused_linear_kl

    was = model.training
    model.eval()
    correct = total = 0
    kl_sum = 0.0
    kl_rows = 0
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            chunk = [{k: v for k, v in e.items() if k not in ("sample_ids", "instruction_mask")}
                     for e in examples[start:start + batch_size]]
            b = pad_batch(chunk, 0)
            kw = dict(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                      pixel_values=b["pixel_values"], use_cache=False)
            h = model.model(**kw).last_hidden_state
            targets = next_token_targets(b["labels"])
            rows = targets != IGNORE_INDEX
            head = model.get_output_embeddings()
            logits = head(h[rows])                                  # [answer rows, V]
            ok = torch.ones_like(targets, dtype=torch.bool)
            ok[rows] = logits.argmax(-1) == targets[rows]
            correct += int(ok.all(1).sum())
            total += len(chunk)
            if teacher is not None:
                ht = teacher.model(**kw).last_hidden_state
                kl = fused_linear_kl(h.reshape(-1, h.shape[-1]), head.weight, ht.reshape(-1, ht.shape[-1]),
                                     teacher.get_output_embeddings().weight, rows=rows.reshape(-1),
                                     reduction="sum")
                kl_sum += float(kl)
                kl_rows += int(rows.sum())
    model.train(was)
    out = {"accuracy": correct / max(total, 1), "n": total}
    if teacher is not None:
        out["kl"] = kl_sum / max(kl_rows, 1)
    return out


def blind_baseline(train_items, heldout_items) -> float:
    """Accuracy of answering each held-out question with the most frequent training answer to
    the same question text, without looking at the image: what a model gets from text alone."""
    from collections import Counter, defaultdict

    answers = defaultdict(Counter)
    for it in train_items:
        answers[it["question"]][it["answer"]] += 1
    hits = sum(1 for it in heldout_items
               if answers[it["question"]] and answers[it["question"]].most_common(1)[0][0] == it["answer"])
    return hits / max(len(heldout_items), 1)


# --------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------

def _config(settings: DemoSettings, out_dir: str, seed: int, steps: int, lr: float, weights: dict,
            iva_layer):
    from align_ti.train.config import DistillConfig

    return DistillConfig(
        output_dir=out_dir, seed=seed, max_steps=steps, learning_rate=lr,
        per_device_train_batch_size=settings.batch_size, tpa_d=settings.tpa_d,
        tpa_fraction=settings.tpa_fraction, iva_layer=iva_layer if iva_layer is not None else 0,
        irs_samples=settings.irs_samples, **weights,
        training_args={"logging_steps": settings.logging_steps, "save_strategy": "no",
                       "disable_tqdm": True, "warmup_steps": settings.warmup_steps,
                       "lr_scheduler_type": "linear", "weight_decay": 0.0,
                       "log_level": "error"},
    )


def _quiet(trainer):
    """No per-step log lines on stdout (the demo prints its own summary)."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    return trainer


def _losses(log_history) -> dict:
    curves: dict[str, list] = {}
    for rec in log_history:
        if "loss" in rec and "step" in rec:
            for k, v in rec.items():
                if k == "loss" or k.startswith("loss_"):
                    curves.setdefault(k, []).append((rec["step"], float(v)))
    return curves


def _remove_empty_dirs(root: str) -> None:
    """Remove the folders under root (and root) that hold no file, deepest first."""
    if not os.path.isdir(root):
        return
    for path, _dirs, _files in sorted(os.walk(root), key=lambda w: -w[0].count(os.sep)):
        if not os.listdir(path):
            os.rmdir(path)


def run_demo(settings: DemoSettings, out: str, log=print) -> dict:
    """Run the demo (see the module docstring); returns what results.json holds."""
    import torch

    threads = torch.get_num_threads()
    try:
        return _run_demo(settings, out, log)
    finally:
        torch.set_num_threads(threads)


def _run_demo(settings: DemoSettings, out: str, log=print) -> dict:
    import torch
    import transformers

    from align_ti.data.synthetic import SceneConfig, train_heldout_split
    from align_ti.models.tiny import build_processor, build_tiny_llava
    from align_ti.train.data import EncodedDataset
    from align_ti.train.build import build_trainer, resolve_iva_layer

    if settings.threads:
        torch.set_num_threads(settings.threads)
    os.makedirs(out, exist_ok=True)
    t_start = time.time()
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    transformers.logging.set_verbosity_error()

    scene = SceneConfig(min_objects=settings.min_objects, max_objects=settings.max_objects)
    train_items, heldout_items = train_heldout_split(settings.train_images, settings.heldout_images, seed=0,
                                                     questions_per_image=settings.questions_per_image,
                                                     config=scene)
    if settings.question_prefixes:
        keep = tuple(settings.question_prefixes)
        train_items = [it for it in train_items if it["question"].startswith(keep)]
        heldout_items = [it for it in heldout_items if it["question"].startswith(keep)]
    blind = blind_baseline(train_items, heldout_items)
    teacher = build_tiny_llava("teacher", seed=1234, patch_size=settings.patch_size)
    processor = build_processor(config=teacher.config)
    t0 = time.time()
    train_ds = EncodedDataset(train_items, processor)
    heldout = EncodedDataset(heldout_items, processor).examples
    log(f"data: {len(train_ds)} training / {len(heldout)} held-out questions "
        f"({settings.train_images} / {settings.heldout_images} images; encoded in {time.time() - t0:.1f}s)")

    # ---- 1. the teacher -------------------------------------------------------------------
    cfg = _config(settings, os.path.join(out, "runs", "teacher"), 0, settings.teacher_steps,
                  settings.teacher_lr, METHODS["SFT"], 0)
    trainer = _quiet(build_trainer(cfg, student=teacher, processor=processor, train_dataset=train_ds))
    t0 = time.time()
    trainer.train()
    teacher_time = time.time() - t0
    teacher.eval().requires_grad_(False)
    teacher_eval = evaluate(teacher, heldout)
    teacher_curves = _losses(trainer.state.log_history)
    del trainer
    log(f"teacher: SFT {settings.teacher_steps} steps in {teacher_time:.1f}s, held-out accuracy "
        f"{teacher_eval['accuracy']:.3f}")

    # ---- 2. the IVA layer ---------------------------------------------------------------------
    if os.path.exists(os.path.join(out, "irs.json")):
        os.remove(os.path.join(out, "irs.json"))  # a cache of an earlier demo's teacher
    layer_cfg = replace(_config(settings, out, 0, 1, 1e-3, METHODS["Align-TI"], 0), iva_layer=settings.iva_layer)
    iva_layer = resolve_iva_layer(layer_cfg, teacher, processor, train_items, out)
    log(f"IVA layer: {iva_layer}" + (" (IRS argmax, cached in irs.json)" if settings.iva_layer == "auto" else ""))

    # ---- 3. students ------------------------------------------------------------------------
    per_method: dict[str, dict] = {}
    for name in settings.methods:
        runs = []
        for seed in settings.seeds:
            student = build_tiny_llava("student", seed=seed, patch_size=settings.patch_size)
            cfg = _config(settings, os.path.join(out, "runs", f"{name}-seed{seed}"), seed,
                          settings.student_steps, settings.student_lr, METHODS[name], iva_layer)
            trainer = _quiet(build_trainer(cfg, student=student, teacher=teacher, processor=processor,
                                           teacher_processor=processor, train_dataset=train_ds,
                                           iva_layer=iva_layer))
            t0 = time.time()
            trainer.train()
            wall = time.time() - t0
            ev = evaluate(student, heldout, teacher=teacher)
            runs.append({"seed": seed, "accuracy": ev["accuracy"], "kl": ev["kl"], "wall_s": wall,
                         "curves": _losses(trainer.state.log_history)})
            del trainer, student
            log(f"  {name:<8} seed {seed}: accuracy {ev['accuracy']:.3f}  KL {ev['kl']:.4f}  {wall:.1f}s")
        accs = [r["accuracy"] for r in runs]
        kls = [r["kl"] for r in runs]
        walls = [r["wall_s"] for r in runs]
        per_method[name] = {
            "label": METHOD_LABELS[name], "weights": METHODS[name], "runs": runs,
            "accuracy_mean": _mean(accs), "accuracy_std": _std(accs),
            "kl_mean": _mean(kls), "kl_std": _std(kls),
            "wall_s_mean": _mean(walls), "wall_s_total": sum(walls),
        }

    _remove_empty_dirs(os.path.join(out, "runs"))  # the trainers' output_dirs; nothing is saved there

    results = {
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(settings).items()},
        "task": {"train_questions": len(train_ds), "heldout_questions": len(heldout),
                 "image_tokens": (48 // settings.patch_size) ** 2,
                 "blind_baseline_accuracy": blind,
                 "blind_baseline_note": "most frequent training answer to the same question text, image ignored"},
        "teacher": {"accuracy": teacher_eval["accuracy"], "train_s": teacher_time, "steps": settings.teacher_steps,
                    "curves": teacher_curves},
        "iva_layer": iva_layer,
        "methods": per_method,
        "environment": {
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_average_start": load_start,
            "load_average_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
        },
        "total_wall_s": time.time() - t_start,
    }
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    table = markdown_table(results)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(table)
    plot_results(results, out)
    return results


def _mean(xs):
    return sum(xs) / len(xs) if xs else float("nan")


def _std(xs):
    if len(xs) < 2:
        return 0.0
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def markdown_table(results: dict) -> str:
    s = results["settings"]
    lines = [
        "# align-ti demo: distilling a tiny LLaVA teacher into a smaller student",
        "",
        f"Synthetic visual QA, {results['task']['train_questions']} training / "
        f"{results['task']['heldout_questions']} held-out questions (held-out images never trained on). "
        f"Teacher: SFT, {s['teacher_steps']} steps, held-out accuracy **{results['teacher']['accuracy']:.3f}**. "
        f"Students: {s['student_steps']} optimizer steps each, batch {s['batch_size']}, lr {s['student_lr']}, "
        f"same initial weights and data order per seed; seeds {s['seeds']}. IVA layer {results['iva_layer']}. "
        f"Image-blind baseline (most frequent training answer to the same question): "
        f"{results['task']['blind_baseline_accuracy']:.3f}.",
        "",
        "| method | loss terms | held-out accuracy (mean ± std) | per seed | KL(teacher‖student) held-out | wall time per run |",
        "|---|---|---|---|---|---|",
    ]
    for name, m in results["methods"].items():
        terms = " + ".join(k[2:] for k, v in m["weights"].items() if v > 0)
        seeds = ", ".join(f"{r['accuracy']:.3f}" for r in m["runs"])
        lines.append(f"| {m['label']} | {terms} | {m['accuracy_mean']:.3f} ± {m['accuracy_std']:.3f} | {seeds} | "
                     f"{m['kl_mean']:.4f} ± {m['kl_std']:.4f} | {m['wall_s_mean']:.1f} s |")
    blind = results["task"]["blind_baseline_accuracy"]
    if all(m["accuracy_mean"] < blind for m in results["methods"].values()):
        lines += ["", f"**No student beats the image-blind baseline ({blind:.3f}) yet: {s['student_steps']} "
                  "steps are too few to compare the methods by accuracy (a --quick run checks that the "
                  f"pipeline works). The default `align-ti demo` ({DemoSettings().student_steps} steps, ~7 "
                  "minutes on 2 cores) is the comparison.**"]
    env = results["environment"]
    lines += [
        "",
        f"Wall time is the training time per run (model forward/backward, losses, optimizer) on "
        f"{env['cpu_count']} CPU cores, {env['torch_threads']} torch thread(s); load average at start "
        f"{_fmt_load(env['load_average_start'])}, at end {_fmt_load(env['load_average_end'])}. "
        f"Total demo time {results['total_wall_s']:.0f} s.",
        "",
        "IVA only / TPA only add one Align-TI term to vanilla KD. Runs are sequential: wall times are "
        "comparable only when the machine's load stayed the same (see the load averages). "
        "Differences smaller than the seed spread are not evidence for either method.",
        "",
    ]
    return "\n".join(lines)


def _fmt_load(load):
    return "n/a" if not load else "/".join(f"{x:.1f}" for x in load)


def plot_results(results: dict, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["methods"])
    labels = [results["methods"][n]["label"].replace(" (", "\n(") for n in names]
    colors = ["tab:gray", "tab:blue", "tab:green", "tab:orange", "tab:red"]

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.2), dpi=120)
    s = results["settings"]
    for i, n in enumerate(names):
        m = results["methods"][n]
        xs = [i + (j - (len(m["runs"]) - 1) / 2) * 0.12 for j in range(len(m["runs"]))]
        ax.bar(i, m["accuracy_mean"], yerr=m["accuracy_std"], color=colors[i % len(colors)], alpha=0.75, capsize=5)
        ax.scatter(xs, [r["accuracy"] for r in m["runs"]], color="black", s=12, zorder=3)
        ax2.bar(i, m["kl_mean"], yerr=m["kl_std"], color=colors[i % len(colors)], alpha=0.75, capsize=5)
        ax2.scatter(xs, [r["kl"] for r in m["runs"]], color="black", s=12, zorder=3)
    ax.axhline(results["teacher"]["accuracy"], color="black", ls="--", lw=1,
               label=f"teacher ({results['teacher']['accuracy']:.3f})")
    blind = results["task"].get("blind_baseline_accuracy")
    if blind is not None:
        ax.axhline(blind, color="tab:purple", ls=":", lw=1.2, label=f"image-blind baseline ({blind:.3f})")
    top = max([results["teacher"]["accuracy"], blind or 0] + [r["accuracy"] for m in results["methods"].values()
                                                              for r in m["runs"]])
    ax.set_ylim(0, min(1.0, top * 1.2 + 0.02))
    ax.set_ylabel("held-out exact-match accuracy")
    ax.set_title(f"Accuracy after {s['student_steps']} steps (mean ± std over {len(s['seeds'])} seeds; dots: seeds)",
                 fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    ax2.set_ylabel("KL(teacher ‖ student), held-out answer tokens")
    ax2.set_title("Distance to the teacher (lower = closer)", fontsize=9)
    for a in (ax, ax2):
        a.set_xticks(range(len(names)))
        a.set_xticklabels(labels, fontsize=8)
        a.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "accuracy.png"))
    plt.close(fig)

    keys = ["loss_sft", "loss_kd", "loss_iva", "loss_tpa"]
    fig, axes = plt.subplots(1, len(keys), figsize=(13, 3.4), dpi=110)
    for ax, key in zip(axes, keys):
        for i, n in enumerate(names):
            runs = results["methods"][n]["runs"]
            series = [dict(r["curves"].get(key, [])) for r in runs]
            steps = sorted(set().union(*[set(x) for x in series])) if series else []
            if not steps:
                continue
            mean = [_mean([x[t] for x in series if t in x]) for t in steps]
            ax.plot(steps, mean, color=colors[i % len(colors)], label=results["methods"][n]["label"], lw=1.5)
        title = {"loss_sft": "SFT cross-entropy", "loss_kd": "KD: KL(teacher‖student), answers",
                 "loss_iva": "IVA: weighted KL, vision tokens", "loss_tpa": "TPA: KL at branch candidates"}[key]
        ax.set_title(title, fontsize=9)
        ax.set_yscale("log")
        ax.set_xlabel("optimizer step", fontsize=8)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    axes[0].set_ylabel("training loss (mean over seeds, log scale)", fontsize=8)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "loss_curves.png"))
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------

def add_arguments(p) -> None:
    p.add_argument("--out", default="demo_out", help="output folder for results.json/.md and the PNGs")
    p.add_argument("--quick", action="store_true",
                   help="a small run (about a minute on 2 CPU cores): checks the plumbing, "
                        "too short for the numbers to mean much")
    p.add_argument("--seeds", type=int, default=None, help="number of student seeds (default 3)")
    p.add_argument("--student-steps", type=int, default=None, help="optimizer steps per student run")
    p.add_argument("--teacher-steps", type=int, default=None, help="optimizer steps of the teacher SFT")
    p.add_argument("--batch-size", type=int, default=None, help="batch size (teacher and students)")
    p.add_argument("--methods", default=None,
                   help=f"comma-separated subset of {','.join(METHODS)} (default: all)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default 1: the tiny models gain little from more, and "
                        "extra threads slow down badly on a busy machine)")


def settings_from_args(args) -> DemoSettings:
    s = DemoSettings.quick() if args.quick else DemoSettings()
    if args.seeds is not None:
        if args.seeds < 1:
            raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
        s = replace(s, seeds=tuple(range(args.seeds)))
    for name in ("student_steps", "teacher_steps", "batch_size", "threads"):
        v = getattr(args, name)
        if v is not None:
            if v < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
            s = replace(s, **{name: v})
    if args.methods:
        chosen = tuple(m.strip() for m in args.methods.split(",") if m.strip())
        unknown = [m for m in chosen if m not in METHODS]
        if unknown:
            raise ValueError(f"--methods: unknown {unknown}; choose from {list(METHODS)}")
        s = replace(s, methods=chosen)
    return s


def main(args) -> int:
    import sys

    from align_ti.paths import ensure_writable_dir

    try:
        settings = settings_from_args(args)
        ensure_writable_dir(args.out, "--out")  # before minutes of training, not after
    except ValueError as e:
        print(f"align-ti demo: error: {e}", file=sys.stderr)
        return 2
    results = run_demo(settings, args.out)
    print()
    print(markdown_table(results))
    print(f"wrote {args.out}/results.json, results.md, accuracy.png, loss_curves.png")
    return 0
