"""Two processes (`accelerate launch --multi_gpu --num_processes 2` on CPU: torchrun, gloo) give the loss curve of one
process with the same global batch: the normalisers are global (all micro-batches, all
processes), TPA's random numbers are keyed by sample id, and the data order is the same. The two
processes run the Trainer (DDP) with the teacher sharded over them (``teacher_sharding=fsdp``:
process 0 loads the teacher's checkpoint folder, process 1 builds it on the meta device and gets
its shard from process 0), the one process with it whole: the losses agree. Both run `run_distill`, what `align-ti distill` runs.

After training, the same two processes check what must agree across processes:
- a resume's checkpoint is verified (every byte read) by one process per node, not by each;
  a damaged one stops both processes with the same one-line error;
- a save that fails on process 0 alone (a full disk) fails on both, not only on process 0;
- iva_layer=auto runs IRS on the sharded teacher, and whether its cache holds is process 0's
  decision (a process running IRS alone would wait forever in the teacher's collectives).

Run as a script, this file is the worker: it trains the quick distillation and writes the
log history of the main process to a JSON file.

Why not `accelerate launch --cpu --num_processes 2`: with `--cpu`, accelerate (1.x) uses its
simple launcher, which starts one process unless mpirun and a hostfile are given
(`--mpirun_hostfile`); `--multi_gpu` selects the torchrun launcher, and on a machine without
CUDA the processes form a MULTI_CPU (gloo) group (the trainer sets use_cpu without CUDA).
"""
import errno
import json
import os
import shutil
import subprocess
import sys

import pytest

GLOBAL_BATCH = 4
STEPS = 3
TERMS = ("loss", "loss_sft", "loss_kd", "loss_iva", "loss_tpa")


def _checks_that_must_agree(trainer) -> dict:
    """This process's view of a verified resume, a damaged one and a save failing on process 0."""
    import torch.distributed as dist

    from align_ti.train import checkpoint as ckpt
    from align_ti.train.trainer import CheckpointError, resolve_resume

    trainer.create_optimizer_and_scheduler(num_training_steps=1)  # a checkpoint holds their states
    trainer._save_checkpoint(trainer.model, None)
    run_dir = trainer.args.output_dir
    verified = []
    real_verify = ckpt.verify_checkpoint
    ckpt.verify_checkpoint = lambda *a, **k: verified.append(1) or real_verify(*a, **k)
    try:
        found = resolve_resume(True, run_dir, trainer.args, run=trainer.run_identity)
        if trainer.args.process_index == 0:
            with open(os.path.join(found, "model.safetensors"), "r+b") as f:
                f.truncate(100)
        dist.barrier()
        try:
            resolve_resume(found, run_dir, trainer.args, run=trainer.run_identity)
            damaged = None
        except CheckpointError as e:
            damaged = str(e)
    finally:
        ckpt.verify_checkpoint = real_verify

    student = trainer.model.student if hasattr(trainer.model, "student") else trainer.model.module.student
    if trainer.args.process_index == 0:
        def full_disk(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")
        student.save_pretrained = full_disk
    try:
        trainer.save_model(os.path.join(run_dir, "final"))
        save_error = None
    except Exception as e:  # noqa: BLE001 -- what each process saw
        save_error = f"{type(e).__name__}: {e}"
    return {"found": os.path.basename(found), "verified": len(verified), "damaged": damaged,
            "save_error": save_error}


def _irs_cache_decided_once(cfg, trainer) -> dict:
    """iva_layer=auto on the sharded teacher: IRS runs on both processes (its forwards are
    collectives) and process 0 writes the cache; then, with the cache visible to process 0 only,
    both take process 0's decision (process 1 alone running IRS would wait for process 0 forever)."""
    import dataclasses

    import align_ti.models.irs as irs
    from align_ti.train.build import resolve_iva_layer

    auto = dataclasses.replace(cfg, iva_layer="auto", irs_samples=2)
    args, teacher, items = trainer.args, trainer.model.teacher, trainer.train_dataset.items
    processor = trainer.processing_class
    computed = resolve_iva_layer(auto, teacher, processor, items, args.output_dir, is_main=args.should_save)
    calls = []
    real_scores = irs.irs_scores
    irs.irs_scores = lambda *a, **k: calls.append(1) or real_scores(*a, **k)
    try:
        cache_dir = args.output_dir if args.process_index == 0 else os.path.join(args.output_dir, "elsewhere")
        cached = resolve_iva_layer(auto, teacher, processor, items, cache_dir, is_main=False)
    finally:
        irs.irs_scores = real_scores
    return {"computed": computed, "cached": cached, "irs_runs": len(calls)}


def worker(out_json: str, per_device: int, teacher: str) -> None:
    """`run_distill` (what `align-ti distill` runs), then the agreement checks on a trainer of the
    same config."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    from align_ti.train.build import build_trainer, run_distill
    from align_ti.train.config import load_config

    world = int(os.environ.get("WORLD_SIZE", "1"))
    over = {"output_dir": f"{os.path.dirname(out_json)}/run", "teacher": teacher,
            "student": os.path.join(os.path.dirname(teacher), "student"), "max_steps": STEPS, "synthetic_images": 4,
            "per_device_train_batch_size": per_device, "iva_layer": 1, "tpa_fraction": 0.5, "learning_rate": 1e-3,
            "teacher_sharding": "fsdp" if world > 1 else "replicate",
            "training_args": json.dumps({"logging_steps": 1, "save_strategy": "no", "disable_tqdm": True})}
    cfg = load_config(overrides=[f"{k}={v}" for k, v in over.items()])
    metrics = run_distill(cfg)
    result = {"world_size": world, "logs": [h for h in metrics["log_history"] if "loss" in h]}
    if world > 1:
        from torch.distributed.tensor import DTensor

        trainer = build_trainer(cfg)
        result["teacher_sharded"] = all(isinstance(p, DTensor) for p in trainer.model.teacher.parameters())
        checks = [None] * world
        dist.all_gather_object(checks, {**_checks_that_must_agree(trainer), **_irs_cache_decided_once(cfg, trainer)})
        result["checks"] = checks
    if int(os.environ.get("RANK", "0")) == 0:
        with open(out_json, "w") as f:
            json.dump(result, f)
    if dist.is_initialized():  # no process leaves while the other may still use the group
        dist.barrier()
        dist.destroy_process_group()


def _free_port() -> int:
    """A free TCP port for the processes' rendezvous (accelerate's default, 29500, collides with
    another multi-process run on the same machine)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.e2e
def test_two_processes_match_one(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("the CPU (gloo) multi-process check; on CUDA --multi_gpu would use the GPUs")
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")
    if accelerate is None:
        pytest.skip("accelerate CLI not found")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""))
    from align_ti.models.tiny import build_processor, build_tiny_llava
    from tests.utils import launch_failure

    # checkpoint folders (process 0 loads the teacher's, process 1 builds it on meta); the student's
    # too, so that both processors come from saved files alike
    for role, seed in (("teacher", 1), ("student", 0)):
        model = build_tiny_llava(role, seed=seed)
        model.save_pretrained(tmp_path / role)
        build_processor(config=model.config).save_pretrained(tmp_path / role)
    teacher = tmp_path / "teacher"
    one = tmp_path / "one" / "logs.json"
    two = tmp_path / "two" / "logs.json"
    one.parent.mkdir()
    two.parent.mkdir()
    subprocess.run([sys.executable, __file__, str(one), str(GLOBAL_BATCH), str(teacher)], check=True, env=env,
                   timeout=300)
    proc = subprocess.run(
        [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "--main_process_port", str(_free_port()), __file__, str(two), str(GLOBAL_BATCH // 2),
         str(teacher)],
        env=env, timeout=300, capture_output=True, text=True)
    assert proc.returncode == 0, launch_failure(proc)
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert a["world_size"] == 1 and b["world_size"] == 2
    assert b["teacher_sharded"]
    assert len(a["logs"]) == len(b["logs"]) == STEPS
    for la, lb in zip(a["logs"], b["logs"]):
        for key in TERMS:
            assert lb[key] == pytest.approx(la[key], rel=2e-4, abs=1e-6), (la["step"], key, la[key], lb[key])

    first, second = b["checks"]
    assert first["found"] == second["found"] == "checkpoint-0"
    assert (first["verified"], second["verified"]) == (2, 0)  # one process per node reads the checkpoint
    assert first["damaged"] is not None and first["damaged"] == second["damaged"]
    assert "model.safetensors is truncated" in first["damaged"] and "\n" not in first["damaged"]
    assert first["save_error"] is not None and second["save_error"] is not None
    assert "No space left" in first["save_error"] and "another process failed" in second["save_error"]
    assert first["computed"] == second["computed"] == first["cached"] == second["cached"]
    assert first["irs_runs"] == second["irs_runs"] == 0


if __name__ == "__main__":
    worker(sys.argv[1], int(sys.argv[2]), sys.argv[3])
