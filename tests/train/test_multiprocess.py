"""Two processes (`accelerate launch --multi_gpu --num_processes 2` on CPU: torchrun, gloo) give the loss curve of one
process with the same global batch: the normalisers are global (all micro-batches, all
processes), TPA's random numbers are keyed by sample id, and the data order is the same.

Run as a script, this file is the worker: it trains the quick distillation and writes the
log history of the main process to a JSON file.

Why not `accelerate launch --cpu --num_processes 2`: with `--cpu`, accelerate (1.x) uses its
simple launcher, which starts one process unless mpirun and a hostfile are given
(`--mpirun_hostfile`); `--multi_gpu` selects the torchrun launcher, and on a machine without
CUDA the processes form a MULTI_CPU (gloo) group (the trainer sets use_cpu without CUDA).
"""
import json
import os
import shutil
import subprocess
import sys

import pytest

GLOBAL_BATCH = 4
STEPS = 3
TERMS = ("loss", "loss_sft", "loss_kd", "loss_iva", "loss_tpa")


def worker(out_json: str, per_device: int) -> None:
    import torch

    torch.set_num_threads(1)
    from align_ti.train.build import build_trainer
    from tests.utils import run_config, tiny_run

    run = tiny_run(n_images=4)
    cfg = run_config(f"{os.path.dirname(out_json)}/run", max_steps=STEPS, per_device_train_batch_size=per_device,
                     tpa_fraction=0.5, training_args=json.dumps({"logging_steps": 1, "save_strategy": "no",
                                                                 "disable_tqdm": True}))
    trainer = build_trainer(cfg, student=run.student, teacher=run.teacher, processor=run.processor,
                            teacher_processor=run.processor, train_dataset=run.dataset)
    trainer.train()
    if trainer.is_world_process_zero():
        logs = [h for h in trainer.state.log_history if "loss" in h]
        with open(out_json, "w") as f:
            json.dump({"world_size": trainer.args.world_size, "logs": logs}, f)


@pytest.mark.e2e
def test_two_processes_match_one(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("the CPU (gloo) multi-process check; on CUDA --multi_gpu would use the GPUs")
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")
    if accelerate is None:
        pytest.skip("accelerate CLI not found")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""))
    one = tmp_path / "one" / "logs.json"
    two = tmp_path / "two" / "logs.json"
    one.parent.mkdir()
    two.parent.mkdir()
    subprocess.run([sys.executable, __file__, str(one), str(GLOBAL_BATCH)], check=True, env=env, timeout=300)
    proc = subprocess.run(
        [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", __file__, str(two), str(GLOBAL_BATCH // 2)],
        env=env, timeout=300, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert a["world_size"] == 1 and b["world_size"] == 2
    assert len(a["logs"]) == len(b["logs"]) == STEPS
    for la, lb in zip(a["logs"], b["logs"]):
        for key in TERMS:
            assert lb[key] == pytest.approx(la[key], rel=2e-4, abs=1e-6), (la["step"], key, la[key], lb[key])


if __name__ == "__main__":
    worker(sys.argv[1], int(sys.argv[2]))
