"""`align-ti demo`: SFT, vanilla KD, IVA, TPA, Align-TI and a uniform vision-KD control on tiny
LLaVA models, on CPU, with paired statistics (issue #21).

1. Data (`align_ti.data.synthetic.describe_vqa`): coloured shapes on a 3x3 grid; per image a
   full description in reading order, a description in any order (scored order-invariantly)
   and a region question, so answers have several tokens (prefixes for exposure bias) and the
   same image is asked about different regions (instruction-dependent attention for IRS).
   Train, validation and held-out splits never share an image.
2. The teacher (`runs.train_teacher`): its vision tower pretrained then frozen, SFT; IRS picks
   the IVA layer. The SFT students train first: unless the teacher beats them on validation by
   ``teacher_margin``, the run refuses to compare the methods (``--quick`` is exempt).
3. Students (`runs.student_run`): each method from the same initial weights and data order per
   seed, in parallel processes; greedy evaluation on the held-out items, per item, with the
   teacher-student KL along reference and own prefixes (`evaluate`).
4. Statistics (`stats`, scipy.stats) and the report (`report`, `plots`): results.json,
   items.json, results.md, accuracy.png, loss_curves.png.

`align-ti demo` runs SFT, KD and Align-TI on 8 seeds; ``--full`` all six methods and the A/A
pair; ``--quick`` checks the pipeline.
"""
from __future__ import annotations

from align_ti.train.demo.settings import (
    METHODS,
    DemoSettings,
    add_arguments,
    settings_from_args,
)

__all__ = ["METHODS", "DemoSettings", "add_arguments", "settings_from_args", "run_demo", "main"]


def run_demo(settings: DemoSettings, out: str, log=print) -> dict:
    from align_ti.train.demo.run import run_demo as _run

    return _run(settings, out, log)


def main(args) -> int:
    """The `align-ti demo` command: 0 when the methods were compared (or --quick), 1 when the
    teacher margin was not met, 2 on a bad flag or output folder."""
    import sys

    from align_ti.paths import ensure_writable_dir

    try:
        settings = settings_from_args(args)
        ensure_writable_dir(args.out, "--out")  # before minutes of training, not after
    except ValueError as e:
        print(f"align-ti demo: error: {e}", file=sys.stderr)
        return 2
    results = run_demo(settings, args.out)
    with open(f"{args.out}/results.md") as f:
        print()
        print(f.read())
    print(f"wrote {args.out}/results.json, items.json, results.md, accuracy.png, loss_curves.png")
    if results["refused"] and not settings.quick:
        print(f"align-ti demo: {results['refused']}", file=sys.stderr)
        return 1
    return 0
