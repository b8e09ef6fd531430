"""The `align-ti` command line.

Each subcommand is one function; heavy modules are imported inside it, so `align-ti --help`
answers at once. Subcommands are listed here only once they do real work.
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
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(len(k) for k in info)
        for key, value in info.items():
            print(f"{key:<{width}}  {value if value is not None else '-'}")
    return 0


def _cmd_synth(args) -> int:
    """Write the built-in synthetic visual QA data as a LLaVA-format dataset."""
    from align_ti.data.synthetic import write_llava_dataset

    json_path = write_llava_dataset(args.out, n_images=args.images, seed=args.seed)
    print(f"wrote {json_path} (images under {args.out})")
    return 0


def _cmd_irs(args) -> int:
    """Compute IRS (instruction relevance score) for every decoder layer of a LLaVA-style
    teacher over calibration pairs (same image, different instructions); write irs.json and
    irs.png and print the chosen layer argmax_l IRS(l)."""
    from align_ti.models.irs import run_irs

    try:
        result = run_irs(model=args.model, data=args.data, samples=args.samples, out=args.out,
                         batch_size=args.batch_size, seed=args.seed)
    except ValueError as e:
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="align-ti",
        description="Fused kernels and a thin trainer for distilling multimodal LLMs (Align-TI).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("env", help="show versions, devices and usable fast paths",
                       description=_cmd_env.__doc__)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_env)

    p = sub.add_parser("synth", help="write the synthetic visual QA set as LLaVA-format JSON + images",
                       description=_cmd_synth.__doc__ + " Useful to try the LLaVA-format loader "
                       "or to look at what the demo trains on.")
    p.add_argument("--out", required=True, help="output folder (created if missing)")
    p.add_argument("--images", type=int, default=32, help="number of images (several questions each)")
    p.add_argument("--seed", type=int, default=0, help="generation seed")
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser("irs", help="score every teacher layer by IRS and pick the IVA layer",
                       description=_cmd_irs.__doc__)
    p.add_argument("--model", default=None,
                   help="local LLaVA checkpoint folder (default: the built-in tiny teacher)")
    p.add_argument("--data", default=None,
                   help="calibration .jsonl ({'image': path, 'instructions': [...]}) or a "
                        "LLaVA-format .json (samples sharing an image are paired); "
                        "default: the built-in synthetic pairs")
    p.add_argument("--samples", type=int, default=32, help="number of calibration pairs")
    p.add_argument("--out", default="irs_out", help="output folder for irs.json and irs.png")
    p.add_argument("--batch-size", type=int, default=4, help="pairs per forward")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic pairs")
    p.set_defaults(func=_cmd_irs)
    p = sub.add_parser("bench", help="benchmark the ops against today's alternatives",
                       description=_cmd_bench.__doc__)
    from align_ti.benchmarks.runner import build_parser as _bench_parser

    _bench_parser(p)
    p.set_defaults(func=_cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
