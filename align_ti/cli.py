"""The `align-ti` command line.

Each subcommand is one function; heavy modules are imported inside it, so `align-ti --help`
answers at once. Subcommands are listed here only once they do real work. Every subcommand that
writes files checks its output folder (`align_ti.paths.ensure_writable_dir`) before it loads a
model, so an unwritable path is a one-line error (exit 2), not a traceback after the work.
"""
from __future__ import annotations

import argparse
import json
import sys


def _cmd_env(args) -> int:
    """Print what align-ti runs on: versions, devices and which fast paths are usable."""
    import platform

    import torch

    info = {
        "align_ti": __import__("align_ti").__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpu_threads": torch.get_num_threads(),
    }
    for name in ("triton", "transformers", "accelerate", "liger_kernel", "flash_attn"):
        try:
            module = __import__(name)
            info[name] = getattr(module, "__version__", "installed")
        except Exception:  # not installed, or broken: report, don't fail
            info[name] = None
    from align_ti import native

    nat = native.info()  # loads a cached build if there is one; never builds
    info["native_cpu_kernel"] = nat["path"] if nat["available"] else (nat["error"] or "not built")
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(len(k) for k in info)
        for key, value in info.items():
            print(f"{key:<{width}}  {value if value is not None else '-'}")
    return 0


def _cmd_synth(args) -> int:
    """Write the built-in synthetic visual QA data as a LLaVA-format dataset."""
    from align_ti.paths import ensure_writable_dir

    try:
        if args.images < 1:
            raise ValueError(f"--images must be >= 1, got {args.images}")
        ensure_writable_dir(args.out, "--out")
        from align_ti.data.synthetic import write_llava_dataset

        json_path = write_llava_dataset(args.out, n_images=args.images, seed=args.seed)
    except ValueError as e:
        print(f"align-ti synth: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the folder checked out writable, then a write failed (a full disk)
        return _write_failed("synth", args.out, e)
    print(f"wrote {json_path} (images under {args.out})")
    return 0


def _write_failed(command: str, out: str, e: OSError) -> int:
    """The one-line error of a command whose --out folder checked out writable and then a write
    into it failed (a full disk); exit status 2."""
    print(f"align-ti {command}: error: --out {out!r}: writing {e.filename or 'a file'} failed: {e.strerror or e}",
          file=sys.stderr)
    return 2


def _cmd_synth_models(args) -> int:
    """Write a tiny random-weight teacher and student of one model family, each with its local
    processor, as checkpoint folders <out>/teacher and <out>/student: try a family end to end
    (`align-ti distill teacher=<out>/teacher student=<out>/student ...`, `align-ti irs --model
    <out>/teacher`) before downloading anything. The models are modelled on transformers' default
    configs and processors of the family, at tiny widths."""
    from align_ti.paths import ensure_writable_dir

    try:
        from align_ti.models.families import get_family

        get_family(args.family)
        ensure_writable_dir(args.out, "--out")
        from align_ti.models.tiny import write_tiny_checkpoints

        teacher, student = write_tiny_checkpoints(args.family, args.out, seed=args.seed)
    except (ValueError, ImportError) as e:  # ImportError: a family whose processor needs torchvision
        print(f"align-ti synth-models: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the folder checked out writable, then a write failed (a full disk)
        return _write_failed("synth-models", args.out, e)
    print(f"wrote {teacher} and {student} ({args.family})")
    return 0


def _cmd_irs(args) -> int:
    """Compute IRS (instruction relevance score) for every decoder layer of a vision-language
    teacher (a local checkpoint of any supported family) over calibration pairs (same image,
    different instructions); write irs.json and irs.png and print the chosen layer
    argmax_l IRS(l)."""
    from align_ti.paths import ensure_writable_dir

    try:
        ensure_writable_dir(args.out, "--out")
        from align_ti.models.irs import run_irs

        result = run_irs(model=args.model, data=args.data, samples=args.samples, out=args.out,
                         batch_size=args.batch_size, seed=args.seed)
    except (ValueError, FileNotFoundError, ImportError) as e:  # an image of --data; torchvision
        print(f"align-ti irs: error: {e}", file=sys.stderr)
        return 2
    width = max(len(str(len(result.scores) - 1)), 5)
    print(f"{'layer':>{width}}  IRS")
    for layer, score in enumerate(result.scores):
        mark = "  <- chosen" if layer == result.layer else ""
        print(f"{layer:>{width}}  {score:.6g}{mark}")
    print(f"wrote {args.out}/irs.json and {args.out}/irs.png ({result.num_pairs} pairs)")
    print(f"chosen layer: {result.layer}")
    return 0


def _cmd_bench(args) -> int:
    """Benchmark the ops against what users use today (plain PyTorch, chunked torch,
    torch.compile, Liger-Kernel where installed), all providers in one run; writes JSON with
    provenance, markdown and PNG plots under benchmarks/results/<device>/."""
    from align_ti.benchmarks import runner

    return runner.cli(args)


def _cmd_build_native(args) -> int:
    """Build the native CPU kernels of the fused KL (OpenMP, at::vec) with CMake + Ninja
    against the installed torch, in the C++ standard its headers need (C++20 for torch >= 2.14),
    cache them per torch version and load them. Afterwards the
    CPU path of fused_linear_kl / fused_linear_distill / fused_kl uses them automatically
    (ALIGN_TI_NATIVE=0 turns them off)."""
    import time

    from align_ti import native

    t0 = time.perf_counter()
    try:
        path = native.build(force=args.force, verbose=args.verbose, jobs=args.jobs)
    except ValueError as e:  # its cache folder cannot be written
        print(f"align-ti build-native: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        print(f"align-ti build-native: error: {e}", file=sys.stderr)
        return 1
    if not native.native_available():
        print(f"align-ti build-native: built {path} but it did not load: {native.info()['error']}",
              file=sys.stderr)
        return 1
    print(f"{path}  (loaded; {time.perf_counter() - t0:.1f} s)")
    return 0


def _cmd_distill(args) -> int:
    """Distill a student from a teacher with Align-TI (L = w_sft L_SFT + w_kd L_KD + w_iva
    L_IVA + w_tpa L_TPA) on transformers.Trainer. The run is one config: a YAML/JSON file
    (--config) and/or key=value overrides, e.g. `align-ti distill --config run.yaml
    w_tpa=0.5 max_steps=100`. Defaults: the built-in tiny teacher/student on the synthetic
    visual QA data. Checkpoints go to output_dir/checkpoint-<step>; --resume continues from
    the last one after verifying its files and that teacher, data and world size are the same
    (--resume-anyway goes on when they are not). SIGTERM saves a checkpoint at the end of the
    current step and exits with status 0."""
    try:
        from align_ti.paths import ensure_writable_dir
        from align_ti.train.config import field_names, load_config

        if args.list_keys:
            print("\n".join(field_names()))
            return 0
        config = load_config(args.config, args.overrides)
        ensure_writable_dir(config.output_dir, "output_dir")
    except (ValueError, FileNotFoundError) as e:
        print(f"align-ti distill: error: {e}", file=sys.stderr)
        return 2
    from align_ti.train.build import run_distill
    from align_ti.train.data import TokenizerMismatchError
    from align_ti.train.loss import NonFiniteLossError
    from align_ti.train.trainer import CheckpointError

    resume = args.resume_from
    if args.resume and resume is None:
        import os

        from transformers.trainer_utils import get_last_checkpoint

        resume = get_last_checkpoint(config.output_dir) if os.path.isdir(config.output_dir) else None
        if resume is None:
            print(f"align-ti distill: --resume: no checkpoint-<step> in {config.output_dir}; "
                  "starting from step 0", file=sys.stderr)
    if resume is not None:
        print(f"align-ti distill: resuming from {resume}", file=sys.stderr)
    try:
        metrics = run_distill(config, resume_from_checkpoint=resume, resume_anyway=args.resume_anyway)
    except (ValueError, FileNotFoundError, ImportError, TokenizerMismatchError, NonFiniteLossError,
            CheckpointError) as e:  # ImportError: a family whose processor needs torchvision
        print(f"align-ti distill: error: {e}", file=sys.stderr)
        return 2
    if metrics.get("stopped_by"):  # a preempted job: saved, exits 0 (README "Distillation runs")
        print(f"align-ti distill: stopped by {metrics['stopped_by']} after step {metrics['global_step']}: "
              f"saved {metrics['checkpoint']}; continue with --resume")
        return 0
    steps = f"steps {metrics['first_step']}-{metrics['global_step']}"
    print(f"train_loss {metrics.get('train_loss', float('nan')):.6g} (mean over {steps})  "
          f"wall {metrics['wall_s']:.1f}s  student saved to {config.output_dir}")
    return 0


def _cmd_demo(args) -> int:
    """The self-contained demo (no downloads, CPU is fine): SFT a tiny LLaVA teacher on the
    built-in description task (objects in a picture, or in one region of it), then train
    smaller students from the same weights and data order per seed by SFT, vanilla KD and
    Align-TI (--full: also IVA only, TPA only, uniform vision KD, and an A/A pair); greedy
    held-out exact match and object F1 per item, teacher-student KL along reference and own
    prefixes, and paired tests over 8 seeds (scipy.stats, Holm-corrected). Refuses to compare
    the methods (exit 1) unless the teacher beats the SFT students by a stated margin. Writes
    results.json, items.json, results.md and the plots under --out and prints the report."""
    from align_ti.train.demo import main as demo_main

    return demo_main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="align-ti",
        description="Fused kernels and a thin trainer for distilling multimodal LLMs (Align-TI).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("env", help="show versions, devices and usable fast paths",
                       description=_cmd_env.__doc__)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(parser=p, func=_cmd_env)

    p = sub.add_parser("synth", help="write the synthetic visual QA set as LLaVA-format JSON + images",
                       description=_cmd_synth.__doc__ + " Useful to try the LLaVA-format loader "
                       "or to look at what the demo trains on.")
    p.add_argument("--out", required=True, help="output folder (created if missing)")
    p.add_argument("--images", type=int, default=32, help="number of images (several questions each)")
    p.add_argument("--seed", type=int, default=0, help="generation seed")
    p.set_defaults(parser=p, func=_cmd_synth)

    p = sub.add_parser("synth-models", help="write a tiny teacher/student of one model family as checkpoint folders",
                       description=_cmd_synth_models.__doc__)
    p.add_argument("--family", required=True,
                   help="llava, llava_onevision, qwen2_vl, qwen2_5_vl, qwen3_vl or internvl")
    p.add_argument("--out", required=True, help="output folder: <out>/teacher and <out>/student (created if missing)")
    p.add_argument("--seed", type=int, default=0, help="weights of the student; the teacher's use seed + 1")
    p.set_defaults(parser=p, func=_cmd_synth_models)

    p = sub.add_parser("irs", help="score every teacher layer by IRS and pick the IVA layer",
                       description=_cmd_irs.__doc__)
    p.add_argument("--model", default=None,
                   help="local checkpoint folder of a supported family (LLaVA, LLaVA-OneVision, Qwen2-VL, "
                        "Qwen2.5-VL, Qwen3-VL, InternVL; default: the built-in tiny teacher)")
    p.add_argument("--data", default=None,
                   help="calibration .jsonl ({'image': path, 'instructions': [...]}) or a "
                        "LLaVA-format .json (samples sharing an image are paired); "
                        "default: the built-in synthetic pairs")
    p.add_argument("--samples", type=int, default=32, help="number of calibration pairs")
    p.add_argument("--out", default="irs_out", help="output folder for irs.json and irs.png")
    p.add_argument("--batch-size", type=int, default=4, help="pairs per forward")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic pairs")
    p.set_defaults(parser=p, func=_cmd_irs)
    p = sub.add_parser("distill", help="distill a student from a teacher (Align-TI losses, transformers.Trainer)",
                       description=_cmd_distill.__doc__)
    p.add_argument("--config", default=None, help="YAML or JSON run config (see --list-keys); default: all defaults")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. w_tpa=0.5 iva_layer=auto max_steps=100 "
                        "'training_args={\"logging_steps\": 5}'")
    p.add_argument("--resume", action="store_true",
                   help="resume from the last checkpoint-<step> in output_dir (its files are verified first)")
    p.add_argument("--resume-from", metavar="CHECKPOINT", default=None,
                   help="resume from this checkpoint folder instead of the last one")
    p.add_argument("--resume-anyway", action="store_true",
                   help="resume even though the checkpoint was written with another teacher, data or world size")
    p.add_argument("--list-keys", action="store_true", help="print the valid config keys and exit")
    p.set_defaults(parser=p, func=_cmd_distill)

    p = sub.add_parser("demo", help="SFT vs KD vs Align-TI (--full: and its parts) on tiny models, with paired tests "
                                    "(CPU, minutes)",
                       description=_cmd_demo.__doc__)
    from align_ti.train.demo import add_arguments as _demo_arguments

    _demo_arguments(p)
    p.set_defaults(parser=p, func=_cmd_demo)

    p = sub.add_parser("bench", help="benchmark the ops against today's alternatives",
                       description=_cmd_bench.__doc__)
    from align_ti.benchmarks.runner import build_parser as _bench_parser

    _bench_parser(p)
    p.set_defaults(parser=p, func=_cmd_bench)

    p = sub.add_parser("build-native", help="build and cache the native CPU kernels (CMake + Ninja)",
                       description=_cmd_build_native.__doc__)
    p.add_argument("--force", action="store_true", help="rebuild even if a cached build exists")
    p.add_argument("--verbose", action="store_true", help="show the CMake / compiler output")
    p.add_argument("-j", "--jobs", type=int, default=None, help="parallel compile jobs")
    p.set_defaults(parser=p, func=_cmd_build_native)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if hasattr(args, "overrides"):  # key=value after a flag (`distill w_kd=1 --resume max_steps=5`)
        args.overrides += [a for a in unknown if not a.startswith("-")]
        unknown = [a for a in unknown if a.startswith("-")]
    if unknown:  # reported with the usage of the subcommand they were given to
        getattr(args, "parser", parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
