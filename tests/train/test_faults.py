"""Faults a distillation run meets, run for real through `align-ti distill` (issue #17).

- kill -9 in the middle of a step and in the middle of a save, then `--resume`: the final
  student is bit-identical to an uninterrupted run's (CPU).
- SIGTERM (a preempted job) to a real `align-ti distill` process: it saves a checkpoint, says
  where and exits 0; `--resume` from there is bit-identical too.
- Damaged checkpoints (truncated, empty or garbage weights / optimizer / scheduler / trainer
  state / RNG state, a missing config.json or processor file, a file of another run, a damaged
  manifest): `--resume` stops with one line naming the folder, the file and the newest intact
  checkpoint. A checkpoint without a manifest (older align-ti) still resumes, with a warning.
- Another teacher, data or world size than the checkpoint's: refused unless --resume-anyway.
- A full disk during a save (a tiny tmpfs): "no space left on <folder>", the staged folder
  removed, the previous checkpoint intact and resumable bit-identically.
- learning_rate=1e30: the divergence check names the student's hidden states and the step,
  before TPA's sampler trips on them.

The three child processes start together (module fixture) to share the ~6 s interpreter start.
"""
import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading

import pytest
import torch
from safetensors.torch import load_file

from align_ti.cli import main
from align_ti.train import checkpoint as ckpt

pytestmark = pytest.mark.e2e

STEPS = 6
ARGS = [f"max_steps={STEPS}", "per_device_train_batch_size=4", "synthetic_images=2", "iva_layer=1",
        "learning_rate=1e-3", 'training_args={"save_steps": 2, "logging_steps": 1, "disable_tqdm": true}']

# A child `align-ti distill` with a fault injected: SIGKILL itself at a point, or slow steps (so
# that a SIGTERM from the test lands in the middle of the run).
CHILD = r"""
import os, signal, sys, time
from align_ti.train import trainer as T

where, step = sys.argv[1], int(sys.argv[2])

def patch(name, before):
    original = getattr(T.DistillTrainer, name)
    def patched(self, *args, **kwargs):
        before(self)
        return original(self, *args, **kwargs)
    setattr(T.DistillTrainer, name, patched)

def kill_at(self):
    if self.state.global_step == step:
        os.kill(os.getpid(), signal.SIGKILL)

if where == "step":    # in the forward of the step after `step` updates
    patch("compute_loss", kill_at)
elif where == "save":  # saving checkpoint-<step>: weights and optimizer written, RNG state not
    patch("_save_rng_state", kill_at)
elif where == "slow":
    patch("training_step", lambda self: time.sleep(0.25))
from align_ti.cli import main
sys.exit(main(sys.argv[3:]))
"""


def distill(out, *extra):
    """`align-ti distill` in this process: (exit status, stdout, stderr)."""
    so, se = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(so), contextlib.redirect_stderr(se):
        rc = main(["distill", f"output_dir={out}", *ARGS, *extra])
    return rc, so.getvalue(), se.getvalue()


def error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def assert_same_student(run, reference):
    a, b = load_file(os.path.join(reference, "model.safetensors")), load_file(os.path.join(run, "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs from the uninterrupted run"


def checkpoint_names(run):
    return sorted(n for n in os.listdir(run) if n.startswith("checkpoint-"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The uninterrupted reference run (in this process) and three children: killed in a step,
    killed in a save, and sent SIGTERM after its first step."""
    base = tmp_path_factory.mktemp("runs")
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()), PYTHONUNBUFFERED="1",
               PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = {}
    for name, where, step in (("killed_in_step", "step", 4), ("killed_in_save", "save", 4), ("sigterm", "slow", 0)):
        out = base / name
        log = open(base / f"{name}.err", "w")
        stdout = subprocess.PIPE if name == "sigterm" else log
        procs[name] = subprocess.Popen([sys.executable, "-c", CHILD, where, str(step), "distill",
                                        f"output_dir={out}", *ARGS], stdout=stdout, stderr=log, text=True, env=env)
    sigterm, seen = procs["sigterm"], []

    def terminate_after_first_step():
        for line in sigterm.stdout:
            seen.append(line)
            if "'loss'" in line and len([s for s in seen if "'loss'" in s]) == 1:
                sigterm.send_signal(signal.SIGTERM)

    watcher = threading.Thread(target=terminate_after_first_step, daemon=True)
    watcher.start()
    rc, _, err = distill(base / "reference")
    assert rc == 0, err
    result = {"reference": str(base / "reference"), "base": base}
    for name, proc in procs.items():
        proc.wait(timeout=300)
        result[name] = (str(base / name), proc.returncode, (base / f"{name}.err").read_text())
    watcher.join(timeout=30)
    result["sigterm_stdout"] = "".join(seen)
    return result


def test_kill_9_in_a_step_then_resume_is_bit_identical(runs):
    run, rc, err = runs["killed_in_step"]
    assert rc == -signal.SIGKILL, err
    assert checkpoint_names(run) == ["checkpoint-2", "checkpoint-4"]
    assert not os.path.exists(os.path.join(run, ckpt.STAGING))
    rc, out, err = distill(run, "--resume")
    assert rc == 0, err
    assert f"resuming from {run}/checkpoint-4" in err and "(mean over steps 5-6)" in out
    assert_same_student(run, runs["reference"])


def test_kill_9_in_a_save_then_resume_is_bit_identical(runs):
    run, rc, err = runs["killed_in_save"]
    assert rc == -signal.SIGKILL, err
    assert checkpoint_names(run) == ["checkpoint-2"]  # the half-written one stays staged
    assert os.path.isdir(os.path.join(run, ckpt.STAGING, "checkpoint-4"))
    rc, out, err = distill(run, "--resume")
    assert rc == 0, err
    assert f"resuming from {run}/checkpoint-2" in err
    assert_same_student(run, runs["reference"])
    assert checkpoint_names(run) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert not os.path.exists(os.path.join(run, ckpt.STAGING))
    for name in checkpoint_names(run):
        assert ckpt.checkpoint_problem(os.path.join(run, name)) is None


def test_sigterm_saves_a_checkpoint_and_exits_0(runs):
    run, rc, err = runs["sigterm"]
    out = runs["sigterm_stdout"]
    assert rc == 0, err
    line = [ln for ln in out.splitlines() if "stopped by SIGTERM" in ln]
    assert len(line) == 1, out
    step = int(line[0].split("after step ")[1].split(":")[0])
    assert 1 <= step < STEPS
    saved = os.path.join(run, f"checkpoint-{step}")
    assert f"saved {saved}; continue with --resume" in line[0]
    assert ckpt.checkpoint_problem(saved) is None
    assert not os.path.exists(os.path.join(run, "model.safetensors"))  # not finished: no final student
    rc, out, err = distill(run, "--resume")
    assert rc == 0, err
    assert f"resuming from {saved}" in err
    assert_same_student(run, runs["reference"])


# ---- damaged checkpoints -------------------------------------------------------------------

def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _empty(path):
    path.write_bytes(b"")


def _garbage(path):
    """4 KiB (half the file when smaller) of random bytes in the middle; the size stays."""
    data = bytearray(path.read_bytes())
    n = min(4096, len(data) // 2)
    start = (len(data) - n) // 2
    data[start:start + n] = torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(0),
                                          dtype=torch.uint8).numpy().tobytes()
    path.write_bytes(bytes(data))


def _missing(path):
    path.unlink()


DAMAGE = {"truncated": _truncate, "empty": _empty, "garbage": _garbage}
CASES = [(f, d) for f in ("model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json", "rng_state.pth")
         for d in DAMAGE]
CASES += [("config.json", "missing"), ("tokenizer.json", "missing"), ("processor_config.json", "missing"),
          (ckpt.MANIFEST_NAME, "truncated"), ("model.safetensors", "another run"), ("optimizer.pt", "another step")]


@pytest.fixture(scope="module")
def other_run(tmp_path_factory):
    """A run with another seed: its files have the reference's names and sizes, not its bytes."""
    out = tmp_path_factory.mktemp("other") / "run"
    rc, _, err = distill(out, "seed=7", "max_steps=2")
    assert rc == 0, err
    return out


def _copy_run(runs, dst, steps=(2, 4)):
    dst.mkdir()
    for step in steps:
        shutil.copytree(os.path.join(runs["reference"], f"checkpoint-{step}"), dst / f"checkpoint-{step}")
    return dst


@pytest.mark.parametrize("name, damage", CASES, ids=[f"{f}-{d}" for f, d in CASES])
def test_resume_names_the_damaged_file_and_an_intact_checkpoint(runs, other_run, tmp_path, name, damage):
    run = _copy_run(runs, tmp_path / "run")
    target = run / "checkpoint-4" / name
    if damage == "missing":
        _missing(target)
    elif damage == "another run":
        shutil.copyfile(other_run / "checkpoint-2" / name, target)
    elif damage == "another step":
        shutil.copyfile(run / "checkpoint-2" / name, target)
    else:
        DAMAGE[damage](target)
    rc, _, err = distill(run, "--resume")
    assert rc == 2
    line = error_line(err)
    assert f"cannot resume from {run}/checkpoint-4: {name} " in line, line
    assert f"the newest intact checkpoint is {run}/checkpoint-2" in line, line
    assert f"--resume-from {run}/checkpoint-2" in line


def test_resume_from_the_intact_checkpoint_it_names(runs, tmp_path):
    """The way out the error offers: --resume-from the intact checkpoint, bit-identically, and the
    damaged one is replaced when that step is saved again."""
    run = _copy_run(runs, tmp_path / "run")
    _garbage(run / "checkpoint-4" / "model.safetensors")
    rc, out, err = distill(run, "--resume-from", str(run / "checkpoint-2"))
    assert rc == 0, err
    assert "(mean over steps 3-6)" in out
    assert_same_student(run, runs["reference"])
    assert ckpt.checkpoint_problem(str(run / "checkpoint-4")) is None


def test_checkpoints_without_a_manifest_resume_with_a_warning(runs, tmp_path):
    """Written before manifests existed: resumes (bit-identically) with a warning; a missing
    config.json is still refused (never a default config), and a damaged file the manifest
    would have caught is named when it is loaded."""
    run = _copy_run(runs, tmp_path / "ok")
    (run / "checkpoint-4" / ckpt.MANIFEST_NAME).unlink()
    with pytest.warns(UserWarning, match="has no align_ti_manifest.json"):
        rc, _, err = distill(run, "--resume")
    assert rc == 0, err
    assert_same_student(run, runs["reference"])

    run = _copy_run(runs, tmp_path / "no_config")
    (run / "checkpoint-4" / ckpt.MANIFEST_NAME).unlink()
    (run / "checkpoint-4" / "config.json").unlink()
    rc, _, err = distill(run, "--resume")
    assert rc == 2 and "checkpoint-4: config.json is missing" in error_line(err)

    run = _copy_run(runs, tmp_path / "bad_optimizer")
    (run / "checkpoint-4" / ckpt.MANIFEST_NAME).unlink()
    _truncate(run / "checkpoint-4" / "optimizer.pt")
    with pytest.warns(UserWarning, match="has no align_ti_manifest.json"):
        rc, _, err = distill(run, "--resume")
    line = error_line(err)
    assert rc == 2 and f"checkpoint {run}/checkpoint-4: cannot load the optimizer" in line and "optimizer.pt" in line
    assert f"the newest intact checkpoint is {run}/checkpoint-2" in line


def test_resume_refuses_another_teacher_data_or_world_size(runs, tmp_path):
    run = _copy_run(runs, tmp_path / "run", steps=(4,))
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "config.json").write_text("{}")
    rc, _, err = distill(run, "--resume", f"teacher={teacher}")
    line = error_line(err)
    assert rc == 2 and "written by another run (teacher 'tiny-teacher (qwen2, seed 1)' -> " in line
    assert str(teacher) in line and "--resume-anyway" in line

    rc, _, err = distill(run, "--resume", "synthetic_images=3")
    assert rc == 2 and "data 'synthetic (2 images, seed 0)' -> 'synthetic (3 images, seed 0)'" in error_line(err)

    # a checkpoint of 2 processes resumed by 1 (faking WORLD_SIZE=2 would make accelerate set up
    # a process group)
    manifest = run / "checkpoint-4" / ckpt.MANIFEST_NAME
    written = manifest.read_text()
    record = json.loads(written)
    record["run"]["world_size"] = 2
    manifest.write_text(json.dumps(record))
    rc, _, err = distill(run, "--resume")
    assert rc == 2 and "world size 2 -> 1" in error_line(err)
    manifest.write_text(written)

    with pytest.warns(UserWarning, match="although data"):
        rc, out, err = distill(run, "--resume", "synthetic_images=3", "--resume-anyway")
    assert rc == 0, err
    assert "(mean over steps 5-6)" in out


# ---- a full disk ---------------------------------------------------------------------------

@contextlib.contextmanager
def tmpfs(path, size):
    path.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({(proc.stderr or proc.stdout).strip()}); "
                    "test_trainer.py injects ENOSPC instead")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)


def test_a_full_disk_fails_the_save_cleanly(runs, tmp_path):
    """Room for one checkpoint and a half: checkpoint-4 fails half-way through."""
    one = sum(f.stat().st_size for f in (runs["base"] / "reference" / "checkpoint-2").iterdir())
    with tmpfs(tmp_path / "disk", one * 3 // 2) as disk:
        run = disk / "run"
        rc, _, err = distill(run)
        line = error_line(err)
        assert rc == 2
        assert f"could not save checkpoint-4: no space left on {run}" in line, line
        assert f"{run}/checkpoint-2 is untouched" in line
        assert checkpoint_names(run) == ["checkpoint-2"]
        assert not os.path.exists(run / ckpt.STAGING)
        assert ckpt.checkpoint_problem(str(run / "checkpoint-2")) is None
        shutil.copytree(run, tmp_path / "moved")  # room to go on
    rc, _, err = distill(tmp_path / "moved", "--resume")
    assert rc == 0, err
    assert_same_student(tmp_path / "moved", runs["reference"])


# ---- divergence ----------------------------------------------------------------------------

def test_learning_rate_1e30_stops_naming_the_divergence(tmp_path):
    rc, _, err = distill(tmp_path / "run", "learning_rate=1e30")
    line = error_line(err)
    assert rc == 2
    assert "training diverged at step 1: the student's final hidden states hold NaN or inf" in line, line
    assert "after 1 optimizer update(s)" in line and "Lower learning_rate" in line
    assert "student_hidden, student_weight" not in line  # TPA's sampler did not get to see them
