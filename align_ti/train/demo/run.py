"""`align-ti demo`, start to end: data, teacher, IRS, students, statistics, report."""
from __future__ import annotations

import os
import platform
import shutil
import tempfile
import time

import torch

from align_ti.train.demo import report
from align_ti.train.demo.evaluate import summary
from align_ti.train.demo.runs import (
    DemoData,
    StudentRunner,
    TeacherHandoff,
    train_teacher,
)
from align_ti.train.demo.settings import (
    AA_METHOD,
    AA_SEED_OFFSET,
    METHODS,
    DemoSettings,
)
from align_ti.train.demo.stats import analyse

__all__ = ["build_data", "run_demo"]


def build_data(settings: DemoSettings) -> DemoData:
    """The description task's three splits (no image shared between them), encoded once."""
    from align_ti.data.synthetic import DescribeConfig, describe_vqa
    from align_ti.models.tiny import build_processor, tiny_llava_config
    from align_ti.train.data import EncodedDataset

    task = DescribeConfig()
    processor = build_processor(config=tiny_llava_config("teacher", patch_size=settings.patch_size))
    split = {name: describe_vqa(name, n, seed=0, config=task) for name, n in
             (("train", settings.train_images), ("validation", settings.validation_images),
              ("heldout", settings.heldout_images))}
    return DemoData(processor=processor, train=EncodedDataset(split["train"], processor), train_items=split["train"],
                    validation=EncodedDataset(split["validation"], processor).examples,
                    validation_items=split["validation"],
                    heldout=EncodedDataset(split["heldout"], processor).examples, heldout_items=split["heldout"],
                    task=task)


def _irs(settings: DemoSettings, teacher, data: DemoData) -> tuple[int, dict]:
    """The IVA layer: settings.iva_layer, or the IRS argmax over calibration pairs from the
    training items (two questions on one image); the IRS of every layer for the report."""
    from align_ti.models.irs import irs_scores, pairs_from_llava

    result = irs_scores(teacher, data.processor, pairs_from_llava(data.train_items, max_pairs=settings.irs_samples))
    layer = result.layer if settings.iva_layer == "auto" else int(settings.iva_layer)
    return layer, {**result.to_dict(), "layer_used": layer, "chosen_by": "IRS argmax" if settings.iva_layer == "auto"
                   else "settings"}


def _environment(load_start) -> dict:
    import transformers

    from align_ti.benchmarks.harness import git_commit

    return {"git_commit": git_commit(), "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "load_average_start": load_start, "load_average_end": os.getloadavg()}


def run_demo(settings: DemoSettings, out: str, log=print) -> dict:
    """Run the demo; write results.json, items.json, results.md and the plots under ``out``;
    return what results.json holds (``refused`` says why the methods were not compared, if so)."""
    threads = torch.get_num_threads()
    try:
        return _run_demo(settings, out, log)
    finally:
        torch.set_num_threads(threads)


def _run_demo(settings: DemoSettings, out: str, log) -> dict:
    import transformers

    transformers.logging.set_verbosity_error()
    os.makedirs(out, exist_ok=True)
    t_start, load_start = time.time(), os.getloadavg()
    data = build_data(settings)
    log(f"data: {len(data.train)} training / {len(data.validation)} validation / {len(data.heldout)} held-out items "
        f"({settings.train_images} / {settings.validation_images} / {settings.heldout_images} images)")

    # the trainers' output folders and the teacher's handoff file live in a folder of this run's
    # own, removed at the end (nothing there is kept): never in one the user may already have
    scratch = tempfile.mkdtemp(prefix=".demo-scratch-", dir=out)
    handoff = TeacherHandoff(settings, os.path.join(scratch, "teacher.pt"))
    runner = StudentRunner(settings, data, handoff, scratch, log)
    torch.set_num_threads(settings.threads)
    try:
        # the SFT students need no teacher: they train (in the workers) while the teacher does
        sft = runner.submit([("SFT", s) for s in settings.seeds] if "SFT" in settings.methods else [])
        try:
            teacher, teacher_record = train_teacher(settings, data, scratch)
            handoff.publish(teacher)
        except BaseException:
            handoff.fail()  # the SFT workers waiting for it stop instead of waiting forever
            raise
        log(f"teacher: {settings.teacher_steps} steps in {teacher_record['train_wall_s']:.0f}s; exact match "
            f"validation {teacher_record['validation']['exact_match']:.3f}, held-out "
            f"{teacher_record['heldout']['exact_match']:.3f}")
        iva_layer, irs = _irs(settings, teacher, data)
        log(f"IVA layer {iva_layer} ({irs['chosen_by']}; IRS per layer {[round(s, 3) for s in irs['scores']]})")
        runs, refused = runner.collect(sft), None
        if runs:  # the teacher's margin over the SFT students decides whether to compare the methods
            refused = report.teacher_margin_refusal(settings, teacher_record, runs)
            if refused:
                log(refused)
        if refused is None or settings.quick:
            # the longest runs first, so that the workers finish together
            rest = [(m, s) for m in sorted(settings.methods, key=_cost, reverse=True) if m != "SFT"
                    for s in settings.seeds]
            if settings.aa_pair and AA_METHOD in settings.methods:
                rest += [(AA_METHOD, AA_SEED_OFFSET + s) for s in settings.seeds]
            runs += runner.collect(runner.submit(rest, iva_layer), iva_layer)
    finally:
        runner.close()
        shutil.rmtree(scratch, ignore_errors=True)

    results = {
        "settings": settings.to_json(),
        "task": report.task_record(data),
        "teacher": {**teacher_record, "heldout": summary(teacher_record["heldout"])},
        "irs": irs,
        "refused": refused,
        "environment": _environment(load_start),
        "total_wall_s": None,
    }
    results.update(analyse(settings, runs, refused))
    results["total_wall_s"] = time.time() - t_start
    report.write_all(results, runs, teacher_record, data, out)
    return results


def _cost(method: str) -> int:
    """A rough order of the methods' step costs: TPA's expanded sequences dominate."""
    w = METHODS[method]
    return 3 * (w["w_tpa"] > 0) + (w["w_kd"] > 0) + (w["w_iva"] > 0)


