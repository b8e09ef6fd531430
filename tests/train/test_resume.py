"""Checkpoint / resume (transformers.Trainer's) and atomic checkpoint folders.

A run killed after step 5 (a callback raising) resumes from checkpoint-4 to the same final
loss and weights as an uninterrupted run; a save that dies half-way leaves no
``checkpoint-*`` folder behind, so resuming picks the last complete one.
"""
import copy
import json
import os

import pytest
import torch
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from align_ti.train.build import build_trainer
from tests.utils import run_config, tiny_run

pytestmark = pytest.mark.e2e

STEPS = 6


class Killed(BaseException):
    """Stands in for a kill: not an Exception, so no error handling (a failed save's) catches it.
    test_faults.py kills real processes with SIGKILL."""


class KillAfter(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.step:
            raise Killed(f"killed after step {self.step}")


@pytest.fixture(scope="module")
def setup():
    return tiny_run(n_images=4)


def _trainer(setup, out, callbacks=None):
    cfg = run_config(out, max_steps=STEPS, tpa_fraction=0.5, training_args=json.dumps(
        {"logging_steps": 1, "save_strategy": "steps", "save_steps": 2, "disable_tqdm": True}))
    return build_trainer(cfg, student=copy.deepcopy(setup.student), teacher=setup.teacher, processor=setup.processor,
                         teacher_processor=setup.processor, train_dataset=setup.dataset, callbacks=callbacks)


def _losses(trainer):
    """step -> (total loss, per-term losses) as logged."""
    return {h["step"]: (h["loss"], {k: v for k, v in h.items() if k.startswith("loss_")})
            for h in trainer.state.log_history if "loss" in h}


def test_killed_run_resumes_to_the_same_result(setup, tmp_path):
    full = _trainer(setup, tmp_path / "full")
    full.train()
    ref_losses = _losses(full)
    ref_weights = full.model.student.state_dict()

    out = tmp_path / "killed"
    killed = _trainer(setup, out, callbacks=[KillAfter(5)])
    with pytest.raises(Killed):
        killed.train()
    last = get_last_checkpoint(str(out))
    assert os.path.basename(last) == "checkpoint-4"
    assert not (out / ".staging").exists(), "staging leftovers after complete saves"
    # a checkpoint folder is a plain student checkpoint
    from transformers import LlavaForConditionalGeneration

    reloaded = LlavaForConditionalGeneration.from_pretrained(last)
    assert reloaded.config.text_config.hidden_size == setup.student.config.text_config.hidden_size

    resumed = _trainer(setup, out)
    resumed.train(resume_from_checkpoint=last)
    losses = _losses(resumed)
    assert sorted(losses) == list(range(1, STEPS + 1))  # steps 1-4 from the checkpoint's log history
    for step in range(1, STEPS + 1):
        assert losses[step][0] == pytest.approx(ref_losses[step][0], rel=1e-5), step
        # the terms logged after the resume average that one step, not all steps since 0
        assert losses[step][1].keys() == ref_losses[step][1].keys() == {"loss_sft", "loss_kd", "loss_iva", "loss_tpa"}
        for name, value in losses[step][1].items():
            assert value == pytest.approx(ref_losses[step][1][name], rel=1e-4, abs=1e-6), (step, name)
    for k, v in resumed.model.student.state_dict().items():
        torch.testing.assert_close(v, ref_weights[k], rtol=1e-5, atol=1e-7, msg=lambda m: f"{k}: {m}")


def test_a_save_killed_half_way_leaves_no_checkpoint(setup, tmp_path, monkeypatch):
    out = tmp_path / "run"
    trainer = _trainer(setup, out)
    calls = {"n": 0}
    original = type(trainer)._save_rng_state

    def dying_rng_save(self, output_dir):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint (step 4) dies after the weights are written
            raise Killed("killed while saving")
        return original(self, output_dir)

    monkeypatch.setattr(type(trainer), "_save_rng_state", dying_rng_save)
    with pytest.raises(Killed):
        trainer.train()
    names = sorted(p for p in os.listdir(out) if p.startswith("checkpoint-"))
    assert names == ["checkpoint-2"], names
    assert os.path.basename(get_last_checkpoint(str(out))) == "checkpoint-2"
    monkeypatch.undo()
    resumed = _trainer(setup, out)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == STEPS
    assert sorted(p for p in os.listdir(out) if p.startswith("checkpoint-")) == [
        "checkpoint-2", "checkpoint-4", "checkpoint-6"]
