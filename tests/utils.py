"""Helpers shared by the tests: numeric checks, a copy of the project, and the tiny models and
data that the trainer, model, data and TPA tests build (tests/conftest.py wraps the common ones
as fixtures). No test imports helpers from another test module: they live here."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def copy_project(dst) -> None:
    """What a source distribution holds (setup files, align_ti/, kernels/, benchmarks/, csrc/)
    copied into the folder `dst`, so a packaging test builds there and never in the checkout."""
    def ignore(folder, names):
        return [n for n in names if n in ("__pycache__", "results", ".pytest_cache", "build")
                or n.endswith((".pyc", ".egg-info"))]

    dst = str(dst)
    for name in ("setup.py", "pyproject.toml", "README.md", "MANIFEST.in", "CMakeLists.txt"):
        if os.path.exists(os.path.join(ROOT, name)):
            shutil.copy2(os.path.join(ROOT, name), os.path.join(dst, name))
    for name in ("align_ti", "kernels", "benchmarks", "csrc"):
        shutil.copytree(os.path.join(ROOT, name), os.path.join(dst, name), ignore=ignore)


def _max_err(x: torch.Tensor, truth: torch.Tensor) -> float:
    if x.numel() == 0:
        return 0.0
    return (x.detach().double() - truth.detach().double()).abs().max().item()


def assert_three_way(
    candidate: torch.Tensor,
    same_dtype_torch: torch.Tensor,
    truth: torch.Tensor,
    atol: float = 1e-5,
    rtol: float = 0.0,
    name: str = "output",
) -> None:
    """The candidate is no further from the fp32 truth than plain torch in the same dtype.

    Passes when  max|candidate - truth| <= max|torch - truth| + atol + rtol * max|truth|.
    Fails on any NaN/inf in the candidate (where the truth is finite), and on shape mismatch.
    """
    if candidate.shape != truth.shape or same_dtype_torch.shape != truth.shape:
        raise AssertionError(
            f"{name}: shapes differ: candidate {tuple(candidate.shape)}, "
            f"torch {tuple(same_dtype_torch.shape)}, truth {tuple(truth.shape)}"
        )
    finite_truth = torch.isfinite(truth)
    bad = ~torch.isfinite(candidate) & finite_truth
    if bool(bad.any()):
        raise AssertionError(
            f"{name}: candidate has {int(bad.sum())} non-finite entries where the fp32 truth is finite"
        )
    scale = truth.detach().double().abs().max().item() if truth.numel() else 0.0
    err_c = _max_err(candidate, truth)
    err_t = _max_err(same_dtype_torch, truth)
    bound = err_t + atol + rtol * scale
    if not err_c <= bound:
        raise AssertionError(
            f"{name}: candidate error {err_c:.3e} exceeds the same-dtype torch error "
            f"{err_t:.3e} + atol {atol:.1e} + rtol {rtol:.1e} * max|truth| {scale:.3e} "
            f"(= {bound:.3e}); candidate dtype {candidate.dtype}, torch dtype {same_dtype_torch.dtype}"
        )


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol=1e-5, rtol=1e-5, name="output"):
    """torch.testing.assert_close in fp64 with a readable name; fails on NaN."""
    if bool(torch.isnan(actual).any()) and not bool(torch.isnan(expected).any()):
        raise AssertionError(f"{name}: NaN in result")
    torch.testing.assert_close(
        actual.detach().double(), expected.detach().double(), atol=atol, rtol=rtol,
        msg=lambda m: f"{name}: {m}",
    )


@contextlib.contextmanager
def forbid_host_syncs():
    """Inside: content checks off (they read tensor contents, a sync by design) and CUDA's
    sync debug mode raising on any call that makes the host wait for the GPU."""
    from align_ti.validation import set_value_checks, value_checks_enabled

    checks = value_checks_enabled()
    set_value_checks(False)
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)
        set_value_checks(checks)


# ---- tiny models and data ---------------------------------------------------------------------

PATCH = 16  # the distillation tests' image patch: 48x48 images -> 9 image tokens, short sequences
QUIET = {"logging_steps": 1, "save_strategy": "no", "disable_tqdm": True, "report_to": []}  # a test run's logs


@dataclass
class TinyRun:
    """What a distillation test trains with: the tiny teacher (seed 1) and student (seed 0),
    the student's processor, synthetic items and their encoded dataset."""

    teacher: object
    student: object
    processor: object
    items: list
    dataset: object


def tiny_pair(patch_size: int = PATCH, attn_implementation="sdpa"):
    """(teacher, student, processor): the tiny LLaVA pair of the distillation tests."""
    from align_ti.models.tiny import build_processor, build_tiny_llava

    teacher = build_tiny_llava("teacher", seed=1, patch_size=patch_size, attn_implementation=attn_implementation)
    student = build_tiny_llava("student", seed=0, patch_size=patch_size, attn_implementation=attn_implementation)
    return teacher, student, build_processor(config=student.config)


def tiny_run(n_images: int = 3, patch_size: int = PATCH) -> TinyRun:
    """`tiny_pair` with ``n_images`` synthetic training images (4 questions each), encoded."""
    from align_ti.data.synthetic import synthetic_vqa
    from align_ti.train.data import EncodedDataset

    teacher, student, processor = tiny_pair(patch_size)
    items = synthetic_vqa("train", n_images, seed=0)
    return TinyRun(teacher, student, processor, items, EncodedDataset(items, processor))


def run_config(output_dir, **overrides):
    """A test run's `DistillConfig` through the command line's ``key=value`` parsing: 2 steps of
    4 samples, lr 1e-3, IVA at layer 1, quiet logs (`QUIET`), then ``overrides``."""
    from align_ti.train.config import load_config

    over = {"max_steps": 2, "per_device_train_batch_size": 4, "output_dir": str(output_dir), "iva_layer": 1,
            "training_args": json.dumps(QUIET), "learning_rate": 1e-3, **overrides}
    return load_config(overrides=[f"{k}={v}" for k, v in over.items()])


def sharpen_attention(layers, factor: float = 6.0):
    """Scale each layer's q and k projections in place: random init attends almost uniformly,
    and a test whose attention differs between layers or queries needs sharper patterns."""
    with torch.no_grad():
        for layer in layers:
            layer.self_attn.q_proj.weight.mul_(factor)
            layer.self_attn.k_proj.weight.mul_(factor)


# ---- several processes: the engine tests' training loop (tests/train/test_fsdp.py, test_deepspeed.py) -------

DIST_STEPS = 3         # optimizer steps of an engine test
DIST_GLOBAL_BATCH = 4  # samples per step over all processes
DIST_TERMS = ("loss", "sft", "kd", "iva", "tpa")


def dist_module(run: TinyRun, student=None):
    """The `DistillModule` of `run_config` (all four terms, IVA at layer 1, TPA on half the
    response steps) over a copy of the run's student (or ``student``) and its teacher."""
    import copy

    from align_ti.train.build import build_module

    cfg = run_config("runs/unused", tpa_fraction=0.5)
    student = copy.deepcopy(run.student) if student is None else student
    return build_module(cfg, student, run.teacher, run.processor, iva_layer=1), cfg


def dist_batches(run: TinyRun, rank: int = 0, world: int = 1, steps: int = DIST_STEPS) -> list:
    """This process's micro-batch of each step: samples ``[g*step + rank*g/world, ...)`` of the
    dataset in order, g = DIST_GLOBAL_BATCH (one process gets the whole global batch)."""
    from align_ti.train.data import DistillCollator

    per = DIST_GLOBAL_BATCH // world
    collate = DistillCollator(run.processor.tokenizer.pad_token_id)
    return [collate([run.dataset[DIST_GLOBAL_BATCH * s + rank * per + i] for i in range(per)]) for s in range(steps)]


def dist_train(forward, update, module, batches: list, first_step: int = 0) -> list[list[float]]:
    """Train on ``batches`` the way `DistillTrainer` does (normalisers counted over all processes,
    divided by the process count, which the engine's gradient average undoes), through the
    engine's ``forward`` (the wrapped module) and ``update(loss)`` (backward + optimizer step).
    Returns per step the global loss and terms (`DIST_TERMS`), averaged over processes."""
    import torch.distributed as dist

    from align_ti.train.loss import count_normalizers
    from align_ti.train.sharding import gathered_teacher

    world = dist.get_world_size() if dist.is_initialized() else 1
    logs = []
    for i, batch in enumerate(batches):
        counts = count_normalizers(batch, module.spec, module.image_token_id)
        if world > 1:
            dist.all_reduce(counts)
        with gathered_teacher(module.teacher):
            out = forward(**batch, loss_divisors=counts.clamp(min=1) / world, epoch=0, step=first_step + i)
        update(out["loss"])
        values = torch.stack([out["loss"].detach().float()] + [out["terms"][n].float() for n in DIST_TERMS[1:]])
        if world > 1:
            dist.all_reduce(values)
        logs.append((values / world).tolist())
    return logs


def dist_optimizer(params):
    """The engine tests' optimizer: SGD with momentum, whose update (unlike Adam's) scales with the
    gradient, so a gradient averaged or normalised wrongly over processes shows in the weights;
    its momentum is the state a checkpoint must carry."""
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


def dist_baseline(run: TinyRun) -> tuple[list, dict]:
    """One process, no engine, the whole global batch per step: the losses and final student
    weights every engine test must reproduce."""
    module, _ = dist_module(run)
    opt = dist_optimizer(module.parameters())

    def update(loss):
        loss.backward()
        opt.step()
        opt.zero_grad()

    logs = dist_train(module, update, module, dist_batches(run))
    return logs, {k: v.detach().clone() for k, v in module.student.state_dict().items()}


def launch_failure(proc) -> str:
    """What a failed multi-process launch printed that says why: every line naming an error, an
    exception, a signal or a C++ terminate (from any process, in order), then the output's tail
    without progress bars (a short tail alone loses the first process's traceback)."""
    import re

    text = (proc.stdout or "") + (proc.stderr or "")
    lines = [ln for ln in text.splitlines() if ln.strip() and "it/s]" not in ln and "s/it]" not in ln]
    why = [ln for ln in lines if re.search(r"Error|Exception|terminate|Signal|Traceback|exitcode", ln)]
    return "\n".join(why[-60:]) + "\n--- tail ---\n" + "\n".join(lines[-40:])


def dist_launch(script: str, out, env_extra=None, timeout: int = 240):
    """Run ``script out`` as 2 torchrun processes (gloo, one thread each) and load what the
    worker saved to ``out``."""
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               **(env_extra or {}))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           script, str(out)], env=env, timeout=timeout, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, launch_failure(proc)
    return torch.load(out, weights_only=False)


def assert_dist_matches(logs, weights, ref_logs, ref_weights, rel: float = 2e-4) -> None:
    """Loss curve (`DIST_TERMS` per step) and final student weights within fp32 reduction-order
    tolerance."""
    assert len(logs) == len(ref_logs)
    for step, (got, want) in enumerate(zip(logs, ref_logs)):
        for name, a, b in zip(DIST_TERMS, got, want):
            assert abs(a - b) <= rel * abs(b) + 1e-6, (step + 1, name, a, b)
    assert weights.keys() == ref_weights.keys()
    for k, v in weights.items():
        torch.testing.assert_close(v, ref_weights[k], rtol=1e-4, atol=1e-6, msg=lambda m: f"{k}: {m}")


def accelerate_launch_env(config_file: str, *options: str) -> tuple[object, dict]:
    """(parsed arguments, environment) that `accelerate launch --config_file <config_file>
    <options> script.py` gives its processes, computed without launching (works without GPUs)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", os.path.join(ROOT, config_file), *options, "x.py"])
    args, defaults, mp_from_config = _validate_launch_command(args)
    if args.use_deepspeed:  # as accelerate's launch_command does before its DeepSpeed launcher
        fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mp_from_config else [])
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        return args, prepare_deepspeed_cmd_env(args)[1]
    return args, prepare_multi_gpu_env(args)


def accelerate_has_fsdp2() -> bool:
    """Whether the installed accelerate has the FSDP2 path (fsdp_version 2, from 1.6 on; the
    `oldest` tier's 1.3 has none)."""
    import importlib.metadata

    from packaging.version import Version

    return Version(importlib.metadata.version("accelerate")) >= Version("1.6")
