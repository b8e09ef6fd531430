"""The `transformers.Trainer` subclass of a distillation run: `DistillTrainer` over a
`DistillModule` (`align_ti.train.loss`), whose forward computes the loss.

Everything a training run needs besides the loss (progress bars, logging, checkpointing and
resume, gradient accumulation, mixed precision, DDP / FSDP / DeepSpeed through accelerate) is
`transformers.Trainer`'s; the hooks here add only:

- Normalisers: `count_normalizers` over all micro-batches of the optimizer step and all
  processes (the Trainer's ``num_items_in_batch`` mechanism), handed to the module as
  ``loss_divisors``.
- Logging: each term (``loss_sft``, ``loss_kd``, ``loss_iva``, ``loss_tpa``, unweighted,
  global means over the logging interval) next to the Trainer's ``loss`` (the weighted sum).
- Divergence stops the run where it starts, with `NonFiniteLossError` naming what, the step
  and the remedies: the student's (and teacher's) final hidden states, every loss term, the
  gradient norm the Trainer computes (before the optimizer applies it), and every parameter a
  save would write. One host sync per micro-batch covers outputs and terms; see
  `DistillTrainer._check_step` for why parameters need no per-step pass of their own.
- Checkpoints (`align_ti.train.checkpoint`): staged in ``<output_dir>/.staging``, given a
  manifest (sizes and block checksums of every file, the run's teacher, data and world size),
  fsynced and renamed to ``checkpoint-<step>``; a resume verifies them first. A failed save
  says why ("no space left on ..."), removes its staged folder and leaves earlier checkpoints
  alone. A checkpoint folder is a plain student checkpoint (``from_pretrained`` loads it) plus
  the Trainer's optimizer/scheduler/RNG/state files.
- ``request_stop()`` (SIGTERM, see `align_ti.train.build.run_distill`) ends the current step
  with a checkpoint and a clean stop.
- Several processes: what must agree is decided once (`resolve_resume`: the checkpoint found on
  process 0, verified by one process per node; `save_model`: a refused or failed save raises on
  every process), and a teacher sharded with FSDP2 (`align_ti.train.sharding`) has its LM head
  gathered around each forward.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch
from transformers import Trainer, TrainerCallback

from align_ti.train import checkpoint as ckpt
from align_ti.train.sharding import agree_on, any_process, gathered_teacher, is_sharded
from align_ti.train.loss import (
    NORMALIZERS,
    DistillModule,
    NonFiniteLossError,
    count_normalizers,
    diverged,
)

__all__ = ["DistillTrainer", "CheckpointError", "resolve_resume"]

CheckpointError = ckpt.CheckpointError


class _SaveAndStop(TrainerCallback):
    """Ends the step in which a stop was requested (SIGTERM, see `run_distill`) with a
    checkpoint and the end of training."""

    def __init__(self, trainer: "DistillTrainer"):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        if self.trainer.stop_requested:
            control.should_save = True
            control.should_training_stop = True


def _scalar(x) -> float:
    if hasattr(x, "full_tensor"):  # a DTensor (FSDP2)
        x = x.full_tensor()
    return float(x)


def resolve_resume(resume_from_checkpoint, run_dir: str, args, run: Optional[dict] = None,
                   allow_changes: bool = False) -> Optional[str]:
    """The checkpoint a run resumes from, checked, the same on every process; None for none.

    ``resume_from_checkpoint``: a folder, True (the last ``checkpoint-<step>`` in ``run_dir``) or
    None/False. First what killed saves left in ``run_dir/.staging`` is cleared on the saving
    process (`checkpoint.clean_staging`: a complete copy caught between two renames is put in
    place). The last checkpoint is looked up on process 0 and shared. `verify_checkpoint` reads
    every byte of it, so only the first process of each node runs it (8 GPUs would otherwise read
    a 24 GB checkpoint 8 times over); its error is raised on every process. ``args``: the
    run's TrainingArguments (their processes must be set up: reading ``args.world_size`` does it).
    """
    several = args.world_size > 1
    if args.should_save and os.path.isdir(run_dir):
        ckpt.clean_staging(run_dir)
    if several:
        torch.distributed.barrier()
    if resume_from_checkpoint is True:
        from transformers.trainer_utils import get_last_checkpoint

        resume_from_checkpoint = agree_on(get_last_checkpoint(run_dir) if os.path.isdir(run_dir) else None)
    if not resume_from_checkpoint:
        return None
    error = None
    if args.local_process_index == 0:
        try:
            ckpt.verify_checkpoint(resume_from_checkpoint, run=run, allow_changes=allow_changes)
        except CheckpointError as e:
            error = str(e)
    error = any_process(error) if several else error
    if error is not None:
        raise CheckpointError(error)
    return os.fspath(resume_from_checkpoint)


class DistillTrainer(Trainer):
    """`transformers.Trainer` over a `DistillModule` (pass it as ``model``).

    ``run_identity`` (`align_ti.train.checkpoint.run_identity`, set by `build_trainer`) goes into
    each checkpoint's manifest; a resume from a checkpoint of another teacher, data or world size
    is refused unless ``resume_anyway``. ``request_stop()`` (a signal handler may call it) makes
    the current step end with a checkpoint and the end of training.
    """

    loss_is_scaled_for_ga = True  # compute_loss divides by the step's global counts itself

    def __init__(self, model: DistillModule, *args, **kwargs):
        if not isinstance(model, DistillModule):
            raise TypeError(f"model must be a DistillModule, got {type(model).__name__}")
        super().__init__(model, *args, **kwargs)
        # compute_loss divides by the step's global counts: transformers must not divide by the
        # accumulation steps again. Newer versions read loss_is_scaled_for_ga; older ones (5.17,
        # the GPU image's) only skip that division when the model "accepts loss kwargs".
        self.model_accepts_loss_kwargs = True
        self._distill = model
        self._term_sums: dict[str, torch.Tensor] = {}
        self._terms_since_step = 0  # the global step before the first step in _term_sums
        self.run_identity: Optional[dict] = None
        self.resume_anyway = False
        self.last_checkpoint: Optional[str] = None  # the folder of the latest save
        self._stop_asked = False       # this process was asked to stop (request_stop)
        self.stop_requested = False    # some process was: every process saves and stops this step
        self.add_callback(_SaveAndStop(self))
        if self.is_deepspeed_enabled:
            model.register_zero3_heads()
        teacher = model.teacher
        if teacher is not None and not is_sharded(teacher):  # a sharded one has its shards in place
            teacher.to(self.args.device)

    def request_stop(self) -> None:
        """Save a checkpoint at the end of the current step and stop (safe in a signal handler:
        it only sets a flag, which the next per-micro-batch check shares with every process)."""
        self._stop_asked = True

    def train(self, resume_from_checkpoint=None, *args, verify: bool = True, **kwargs):
        """transformers' train, after `resolve_resume` (staging cleared, the checkpoint found and
        verified on one process per node; ``verify=False`` when the caller has just done it, as
        `run_distill` does)."""
        if verify and resume_from_checkpoint:
            found = resolve_resume(resume_from_checkpoint, self.args.output_dir, self.args, run=self.run_identity,
                                   allow_changes=self.resume_anyway)
            resume_from_checkpoint = found or True  # True with none found: transformers says there is none
        return super().train(resume_from_checkpoint, *args, **kwargs)

    # ---- normalisers: counted over all micro-batches of the step and all processes --------
    def _get_num_items_in_batch(self, batch_samples, device):
        if not batch_samples:
            return None
        spec, image_id = self._distill.spec, self._distill.image_token_id
        counts = sum(count_normalizers(b, spec, image_id) for b in batch_samples)
        counts = counts.to(device)
        if self.args.world_size > 1:
            counts = self.accelerator.gather(counts[None]).reshape(-1, len(NORMALIZERS)).sum(0)
        return counts

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        world = max(1, self.accelerator.num_processes)
        divisors = None
        if num_items_in_batch is not None:
            # DDP/FSDP average gradients over processes: dividing by (global count / world)
            # makes that average the gradient of the global mean.
            divisors = num_items_in_batch.to(torch.float64).clamp(min=1) / world
        epoch = int(self.state.epoch or 0)
        with gathered_teacher(self._distill.teacher):  # a sharded teacher's head, for this forward
            out = model(**inputs, loss_divisors=divisors, epoch=epoch, step=self.state.global_step)
        terms = out["terms"]
        self._check_step(out["loss"], terms, out["finite"])
        if model.training:
            if not self._term_sums:  # a resumed run starts at its checkpoint's step, not 0
                self._terms_since_step = self.state.global_step
            for name, value in terms.items():
                acc = self._term_sums.get(name)
                self._term_sums[name] = value.detach().clone() if acc is None else acc + value.detach()
        return (out["loss"], out) if return_outputs else out["loss"]

    # ---- divergence checks -------------------------------------------------------------------
    def _check_step(self, loss, terms, finite):
        """The checks of a micro-batch in one host sync (one reduce with several processes, so
        that all stop at the same step): the student's and the teacher's final hidden states,
        the loss and its terms, and whether a stop was requested.

        Parameters get no pass of their own each step: a non-finite parameter either enters the
        next forward, where NaN/inf reach the hidden states or a loss term checked here (matmuls,
        norms, softmax and residual adds all carry them), or it does not touch the loss or the
        gradients until it does, and a save never writes it (`_save` checks every tensor it
        writes, in the pass the save makes anyway). Parameters that are finite but so large that
        the forward overflows (learning_rate=1e30) are caught the same way. When a check fails,
        `diverged` scans the parameters once to say where they stand. One corner is left to
        the ops: finite hidden states and head whose logits exceed fp32's range give a
        non-finite term here, but with TPA the candidate sampler computes them first and says so
        in its own words.
        """
        names = list(terms)
        flags = torch.stack([finite["student"], finite["teacher"], torch.isfinite(loss)]
                            + [torch.isfinite(terms[n]) for n in names]
                            + [(loss.new_zeros if self._stop_asked else loss.new_ones)((), dtype=torch.bool)]
                            ).to(torch.float32)  # new_zeros/ones: a fill, no host-to-device copy
        if self.args.world_size > 1:  # every process stops, not just the one that saw it
            flags = self.accelerator.reduce(flags, reduction="mean") if hasattr(self.accelerator, "reduce") else flags
        student_ok, teacher_ok, total_ok, *term_ok, no_stop = flags.tolist()  # the host sync
        if no_stop < 1:
            self.stop_requested = True
        step, student = self.state.global_step, self._distill.student
        if student_ok < 1:
            raise diverged("the student's final hidden states hold NaN or inf", step, student)
        if teacher_ok < 1:
            teacher = (self.run_identity or {}).get("teacher", {}).get("name", "the teacher")
            raise NonFiniteLossError(
                f"the teacher's final hidden states hold NaN or inf at step {step}: the teacher ({teacher}) "
                "or its precision is at fault, not the student's training (its weights, or an fp16/bf16 "
                "overflow: try bf16=false); training stopped")
        if total_ok < 1 or min(term_ok, default=1) < 1:
            bad = [n for n, f in zip(names, term_ok) if f < 1]
            values = {n: float(terms[n]) for n in names}
            weights = {n: self._distill.spec.weight(n) for n in names}
            raise diverged(f"term(s) {bad or ['total']} of the loss are NaN or inf (values on this process: "
                           f"{values}; weights {weights})", step, student)

    def _get_grad_norm(self, model, grad_norm=None):
        """The Trainer's gradient norm, checked before the optimizer applies the gradients. Under
        fp16 the loss scaler expects an inf now and then (it skips that step and lowers the
        scale), so only bf16 and fp32 runs stop on it."""
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        if grad_norm is not None and not self.args.fp16 and not math.isfinite(_scalar(grad_norm)):
            raise diverged(f"the gradient norm is {_scalar(grad_norm)} although the loss was finite; the "
                           "update was not applied", self.state.global_step, self._distill.student)
        return grad_norm

    # ---- logging: each term next to the total ---------------------------------------------
    def log(self, logs: dict[str, float], start_time: Optional[float] = None) -> None:
        if "loss" in logs and self._term_sums:
            steps = self.state.global_step - self._terms_since_step
            names = sorted(self._term_sums)
            stacked = torch.stack([self._term_sums[n] for n in names]).to(self.args.device)
            if self.args.world_size > 1:
                stacked = self.accelerator.gather(stacked[None]).reshape(-1, len(names)).mean(0)
            for n, v in zip(names, stacked.tolist()):
                logs[f"loss_{n}"] = round(v / max(steps, 1), 6)
            self._term_sums = {}
        super().log(logs, start_time)

    # ---- checkpoints: a student checkpoint, staged, manifested, verified -------------------
    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        """transformers' save_model (the student, as a plain checkpoint folder) with the decisions
        that must agree made on every process: a student parameter holding NaN or +inf is refused
        before anything is written (each process checks its shard, all raise together), and a
        failure while writing (a full disk on process 0) is raised on every process, never
        leaving the others in a collective that process 0 skipped. Under FSDP with a sharded
        state dict transformers writes no weights here; the student is gathered and written as
        with a full one, so that checkpoints and the final output load with ``from_pretrained``."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        bad = self._unsaveable_parameter()
        if bad is not None:
            raise diverged(f"the student's parameter {bad} holds NaN or inf; it is not saved to {output_dir}",
                           self.state.global_step, self._distill.student)
        error: Optional[BaseException] = None
        try:
            plugin = getattr(self.accelerator.state, "fsdp_plugin", None)
            if self.is_fsdp_enabled and "FULL_STATE_DICT" not in str(getattr(plugin, "state_dict_type", "")):
                self._save(output_dir, state_dict=self.accelerator.get_state_dict(self.model))
            else:
                super().save_model(output_dir, _internal_call=_internal_call)
        except Exception as e:  # noqa: BLE001 -- every process must hear of it (_agree), then it is raised
            error = e
        if not self._agree(error is None):
            raise error if error is not None else CheckpointError("another process failed to write its files")

    def _unsaveable_parameter(self) -> Optional[str]:
        """The first student parameter (on any process: each checks its own shard) holding NaN or
        +inf, or None. -inf is allowed: a -inf bias entry masks a vocabulary column in the fused
        ops (README, "API")."""
        bad = None
        with torch.no_grad():
            for name, p in self._distill.student.named_parameters():
                local = p.to_local() if hasattr(p, "to_local") else getattr(p, "ds_tensor", p)  # FSDP2 / ZeRO-3 shard
                if local.numel() and local.is_floating_point() and not bool(local.amax() < math.inf):
                    bad = name
                    break
        return any_process(bad) if self.args.world_size > 1 else bad

    def _save(self, output_dir: Optional[str] = None, state_dict: Optional[dict] = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        student = self._distill.student
        if state_dict is None:
            state_dict = self.accelerator.unwrap_model(self.model).state_dict()
        state_dict = {k[len("student."):]: v for k, v in state_dict.items() if k.startswith("student.")}
        os.makedirs(output_dir, exist_ok=True)
        student.save_pretrained(output_dir, state_dict=state_dict, is_main_process=True)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None) -> None:
        """Load the student weights of a checkpoint folder (a `save_pretrained` student: its
        keys are in the checkpoint format, which `from_pretrained` converts) with the folder's
        own config.json, never a default config (without one, transformers would build its
        default LLaVA, a ~7B Llama)."""
        folder = resume_from_checkpoint
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            with ckpt.loading(folder, "the model state"):
                return super()._load_from_checkpoint(folder, model)
        student = self._distill.student
        with ckpt.loading(folder, "the student weights (config.json, model.safetensors)"):
            config = type(student.config).from_pretrained(folder, local_files_only=True)
            loaded = type(student).from_pretrained(folder, config=config, dtype=next(student.parameters()).dtype,
                                                   local_files_only=True)
            student.load_state_dict(loaded.state_dict(), strict=True)
        del loaded

    def _load_optimizer_and_scheduler(self, checkpoint) -> None:
        with ckpt.loading(checkpoint, "the optimizer and scheduler states (optimizer.pt, scheduler.pt)"):
            return super()._load_optimizer_and_scheduler(checkpoint)

    def _load_rng_state(self, checkpoint) -> None:
        with ckpt.loading(checkpoint, "the RNG states (rng_state*.pth)"):
            return super()._load_rng_state(checkpoint)

    def _get_output_dir(self, trial=None) -> str:
        run_dir = super()._get_output_dir(trial)
        return os.path.join(run_dir, ckpt.STAGING) if getattr(self, "_staging", False) else run_dir

    def _save_checkpoint(self, model, trial) -> None:
        """transformers' checkpoint, written into ``<run_dir>/.staging/checkpoint-<step>``; once
        every process has written its files, the manifest, an fsync and the rename. A failure on
        any process removes the staged folder and raises CheckpointError saying why (earlier
        checkpoints are never touched before the new one is complete)."""
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

        run_dir = super()._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staged = os.path.join(run_dir, ckpt.STAGING, name)
        if self.args.should_save:
            ckpt.clean_staging(run_dir)  # what a save killed earlier left (a complete copy is put in place)
        self._wait()
        error: Optional[BaseException] = None
        self._staging = True
        try:
            super()._save_checkpoint(model, trial)  # writes the staged folder; no rotation there
        except Exception as e:  # noqa: BLE001 -- every process must hear of it (_agree), then it is raised
            error = e
        finally:
            self._staging = False
        if self._agree(error is None) and self.args.should_save:  # all files written (RNG states, shards)
            try:
                ckpt.seal(staged, self.state.global_step, self.run_identity)  # manifest + fsync
            except Exception as e:  # noqa: BLE001 -- as above
                error = e
        if not self._agree(error is None):
            self._save_failed(error, staged, run_dir)
        dst = os.path.join(run_dir, name)
        if self.args.should_save:
            ckpt.publish(staged, dst)
            best = self.state.best_model_checkpoint
            if best is not None and os.path.dirname(os.path.abspath(best)) == os.path.dirname(os.path.abspath(staged)):
                self.state.best_model_checkpoint = os.path.join(run_dir, os.path.basename(best))
            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=False)
        self.last_checkpoint = dst
        self._wait()

    def _save_failed(self, error: Optional[BaseException], staged: str, run_dir: str) -> None:
        reason = (ckpt.save_failure_reason(error, run_dir) if error is not None
                  else "another process failed to write its files")  # before the partial files go
        if self.args.should_save:
            ckpt.remove_staged(staged)
        if isinstance(error, NonFiniteLossError):
            raise error
        earlier = ckpt.checkpoints(run_dir)
        kept = f"{earlier[0]} is untouched" if earlier else "there is no earlier checkpoint"
        fix = "free some space (or lower save_total_limit)" if ckpt.is_full_disk(reason) else "fix that"
        raise CheckpointError(f"could not save {os.path.basename(staged)}: {reason}; its staged folder is removed "
                              f"and {kept}: {fix}, then resume with --resume") from error

    def _agree(self, ok: bool) -> bool:
        """Whether every process got here with ok: a barrier that carries one flag."""
        if self.args.world_size <= 1:
            return ok
        flag = torch.tensor([1.0 if ok else 0.0], device=self.args.device)
        return bool(self.accelerator.reduce(flag, reduction="sum")[0] == self.args.world_size)

    def _wait(self) -> None:
        if self.args.world_size > 1:
            self.accelerator.wait_for_everyone()
