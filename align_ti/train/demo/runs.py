"""Training the demo's models: the teacher (SFT, in this process) and every student run
(method x seed, from the same initial weights and data order per seed) in parallel worker
processes, forked after the data is built so that they share it without copying. The SFT
students need no teacher to train: they run while the teacher trains."""
from __future__ import annotations

import multiprocessing
import os
import random
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass

import torch

from align_ti.train.demo.evaluate import evaluate_model, summary
from align_ti.train.demo.settings import METHODS, DemoSettings

__all__ = ["DemoData", "pretrain_vision", "train_teacher", "student_run", "TeacherHandoff", "StudentRunner"]


@dataclass
class DemoData:
    """What every run reads: the processor, the encoded training set, and the validation and
    held-out examples with their raw items (for scoring)."""

    processor: object
    train: object                 # align_ti.train.data.EncodedDataset
    train_items: list
    validation: list              # encoded examples
    validation_items: list
    heldout: list
    heldout_items: list
    task: object                  # align_ti.data.synthetic.DescribeConfig


def pretrain_vision(model, processor, task, steps: int, seed: int, batch_size: int = 32, lr: float = 1e-3) -> float:
    """Pretrain a LLaVA model's vision tower and projector to name the shape and colour in each
    grid cell (a linear head on the projected patch features, then discarded), then freeze the
    tower: real MLLMs start from a pretrained vision encoder, which LLaVA-style training keeps
    frozen. Trained end to end from random weights, the tiny models learn colours and positions
    within the demo's steps but guess shapes (and training the tower wipes out a pretrained
    one's shapes). Its images are drawn from the training split of ``task`` (a
    `DescribeConfig`). Deterministic in ``seed``; returns the last loss. Needs one image token
    per grid cell (``patch_size`` = image size / grid)."""
    from align_ti.data.synthetic import (
        COLOURS,
        SHAPES,
        describe_split,
        render_scene,
        sample_scene,
    )

    scene = task.scene

    rng = random.Random(f"align-ti-demo-vision/{seed}")
    colours = list(COLOURS)
    classes = 1 + len(SHAPES) * len(colours)  # 0 = empty cell
    tower, projector = model.model.vision_tower, model.model.multi_modal_projector
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = torch.nn.Linear(model.config.text_config.hidden_size, classes)
        params = list(tower.parameters()) + list(projector.parameters()) + list(head.parameters())
        opt = torch.optim.AdamW(params, lr=lr)
        loss = torch.zeros(())
        for _ in range(steps):
            scenes = []
            while len(scenes) < batch_size:  # training-split images only
                drawn = sample_scene(rng, scene)
                if describe_split(drawn, task) == "train":
                    scenes.append(drawn)
            pixels = processor.image_processor([render_scene(s, scene) for s in scenes], return_tensors="pt")
            target = torch.zeros(batch_size, scene.grid ** 2, dtype=torch.long)
            for i, s in enumerate(scenes):
                for r, c, shape, colour in s:
                    target[i, r * scene.grid + c] = 1 + SHAPES.index(shape) * len(colours) + colours.index(colour)
            features = projector(tower(pixels["pixel_values"]).last_hidden_state)  # [B, cells, H]
            loss = torch.nn.functional.cross_entropy(head(features).reshape(-1, classes), target.reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
    tower.requires_grad_(False)
    return float(loss.detach())


def _config(settings: DemoSettings, out_dir: str, seed: int, steps: int, lr: float, method: str, iva_layer: int):
    from align_ti.train.config import DistillConfig

    return DistillConfig(
        output_dir=out_dir, seed=seed, max_steps=steps, learning_rate=lr,
        per_device_train_batch_size=settings.batch_size, tpa_d=settings.tpa_d, tpa_fraction=settings.tpa_fraction,
        iva_layer=iva_layer, **METHODS[method],
        training_args={"logging_steps": settings.logging_steps, "save_strategy": "no", "disable_tqdm": True,
                       "warmup_steps": settings.warmup_steps, "lr_scheduler_type": "linear", "weight_decay": 0.0,
                       "log_level": "error"},
    )


def _train(trainer) -> tuple[dict, float, float]:
    """Train quietly (no per-step lines on stdout); (loss curves, wall seconds, CPU seconds)."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    wall, cpu = time.perf_counter(), time.process_time()
    trainer.train()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    curves: dict[str, list] = {}
    for rec in trainer.state.log_history:
        if "loss" in rec and "step" in rec:
            for k, v in rec.items():
                if k == "loss" or k.startswith("loss_"):
                    curves.setdefault(k, []).append((rec["step"], round(float(v), 5)))
    return curves, wall, cpu


def train_teacher(settings: DemoSettings, data: DemoData, out: str):
    """The teacher: the tiny teacher LLaVA, its vision pretrained, then SFT on the training
    split. Returns (teacher, record)."""
    from align_ti.models.tiny import build_tiny_llava
    from align_ti.train.build import build_trainer

    teacher = build_tiny_llava("teacher", seed=1234, patch_size=settings.patch_size, **settings.teacher_size)
    vision_loss = pretrain_vision(teacher, data.processor, data.task, settings.vision_steps, seed=1234)
    cfg = _config(settings, os.path.join(out, "runs", "teacher"), 0, settings.teacher_steps, settings.teacher_lr,
                  "SFT", 0)
    curves, wall, cpu = _train(build_trainer(cfg, student=teacher, processor=data.processor, train_dataset=data.train))
    teacher.eval().requires_grad_(False)
    record = {"steps": settings.teacher_steps, "train_wall_s": wall, "train_cpu_s": cpu,
              "vision_pretrain_loss": vision_loss, "curves": curves,
              "validation": summary(evaluate_model(teacher, data.validation, data.validation_items,
                                                    data.processor.tokenizer, max_new_tokens=settings.max_new_tokens)),
              "heldout": evaluate_model(teacher, data.heldout, data.heldout_items, data.processor.tokenizer,
                                        max_new_tokens=settings.max_new_tokens)}
    return teacher, record


def student_run(settings: DemoSettings, data: DemoData, teacher: "TeacherHandoff", method: str, seed: int,
                iva_layer, out: str) -> dict:
    """One student: built and vision-pretrained from ``seed`` (the same for every method),
    trained by ``method`` with data order ``seed``, evaluated on validation and held-out items.
    An SFT student trains without the teacher (so it may start before the teacher is ready) and
    needs it only for the held-out KL."""
    from align_ti.models.tiny import build_tiny_llava
    from align_ti.train.build import build_trainer

    student = build_tiny_llava("student", seed=seed, patch_size=settings.patch_size, **settings.student_size)
    pretrain_vision(student, data.processor, data.task, settings.vision_steps, seed=seed)
    cfg = _config(settings, os.path.join(out, "runs", f"{method}-seed{seed}"), seed, settings.student_steps,
                  settings.student_lr, method, iva_layer if iva_layer is not None else 0)
    distills = method != "SFT"
    trainer = build_trainer(cfg, student=student, teacher=teacher.get() if distills else None,
                            processor=data.processor, teacher_processor=data.processor, train_dataset=data.train,
                            iva_layer=iva_layer)
    curves, wall, cpu = _train(trainer)
    del trainer
    tok = data.processor.tokenizer
    val = evaluate_model(student, data.validation, data.validation_items, tok, max_new_tokens=settings.max_new_tokens)
    held = evaluate_model(student, data.heldout, data.heldout_items, tok, teacher=teacher.get(),
                          max_new_tokens=settings.max_new_tokens)
    return {"method": method, "seed": seed, "train_wall_s": wall, "train_cpu_s": cpu, "curves": curves,
            "validation": summary(val), "heldout": held}


# ---- running many: forked workers share the parent's data; the teacher follows by file ------------

class TeacherHandoff:
    """The trained teacher, for this process and for workers forked before it was trained (they
    train the SFT students meanwhile): `publish` saves it to ``path`` and sets an event; `get`
    returns it, in a worker after waiting for the event and loading the file once. `fail` (the
    teacher's training raised) wakes the waiting workers with an error instead."""

    def __init__(self, settings: DemoSettings, path: str):
        self.settings, self.path = settings, path
        context = multiprocessing.get_context("fork" if _can_fork() else "spawn")
        self.ready, self.failed = context.Event(), context.Event()
        self._model = None

    def publish(self, teacher) -> None:
        torch.save(teacher.state_dict(), self.path + ".tmp")
        os.replace(self.path + ".tmp", self.path)
        self._model = teacher
        self.ready.set()

    def fail(self) -> None:
        self.failed.set()
        self.ready.set()

    def get(self):
        if self._model is None:
            from align_ti.models.tiny import build_tiny_llava

            self.ready.wait()
            if self.failed.is_set():
                raise RuntimeError("the teacher's training failed (the main process reports why)")
            model = build_tiny_llava("teacher", seed=1234, patch_size=self.settings.patch_size,
                                     **self.settings.teacher_size)
            model.load_state_dict(torch.load(self.path))
            self._model = model.eval().requires_grad_(False)
        return self._model


def _can_fork() -> bool:
    return "fork" in multiprocessing.get_all_start_methods()


_SHARED: dict = {}  # what every run reads (settings, data, teacher handoff, out); workers inherit it


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


def _run_one(method: str, seed: int, iva_layer) -> dict:
    return student_run(method=method, seed=seed, iva_layer=iva_layer, **_SHARED)


class StudentRunner:
    """Runs `student_run` jobs in ``settings.workers`` processes forked at the first `submit`
    (sharing the data built before it), or, with one worker or no fork, in this process when
    their results are collected."""

    def __init__(self, settings: DemoSettings, data: DemoData, teacher: TeacherHandoff, out: str, log=print):
        _SHARED.update(settings=settings, data=data, teacher=teacher, out=out)
        self.log = log
        self.pool = None
        if settings.workers > 1 and _can_fork():
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # its threads do not survive a fork
            self.pool = ProcessPoolExecutor(settings.workers, mp_context=multiprocessing.get_context("fork"),
                                            initializer=_worker_init, initargs=(settings.threads,))

    def submit(self, jobs, iva_layer=None) -> list:
        """Start (method, seed) jobs; returns what `collect` takes."""
        if self.pool is None:
            return [(job, None) for job in jobs]
        return [(job, self.pool.submit(_run_one, *job, iva_layer)) for job in jobs] if jobs else []

    def collect(self, pending: list, iva_layer=None) -> list[dict]:
        """The results of submitted jobs, in their order, each logged as it finishes."""
        results: list = [None] * len(pending)
        if self.pool is None:
            for i, (job, _) in enumerate(pending):
                results[i] = _run_one(*job, iva_layer)
                self._done(results, i)
            return results
        index = {future: i for i, (_, future) in enumerate(pending)}
        for future in as_completed(index):
            results[index[future]] = future.result()
            self._done(results, index[future])
        return results

    def _done(self, results, i) -> None:
        r = results[i]
        self.log(f"  {r['method']:<12} seed {r['seed']:<5} held-out exact match {r['heldout']['exact_match']:.3f}  "
                 f"F1 {r['heldout']['f1']:.3f}  KL {r['heldout']['kl_reference']:.3f}  "
                 f"train {r['train_wall_s']:.0f}s ({sum(x is not None for x in results)}/{len(results)})")

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)
