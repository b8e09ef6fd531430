"""The thin distillation trainer: a `transformers.Trainer` subclass and the wrapper module
whose forward computes the Align-TI loss (METHOD.md)

    L = w_sft L_SFT + w_kd L_KD + w_iva L_IVA + w_tpa L_TPA

Everything a training run needs besides the loss (progress bars, logging, checkpointing and
resume, gradient accumulation, mixed precision, DDP / FSDP / DeepSpeed through accelerate)
is `transformers.Trainer`'s; this module adds only:

- `DistillModule`: holds the student (trainable) and a reference to the teacher. Its
  ``forward`` runs the student to its *final hidden states* (``model.model``, never
  ``[B, L, V]`` logits) and computes every term with the align_ti ops: SFT and KD together
  with `fused_linear_distill` (one pass over the student head), IVA with the teacher's
  instruction->vision attention mass at the IRS layer (`capture_qk` + `attention_mass`) and
  `topk_align`, TPA with `align_ti.ops.branches` (with TPA on, *one* expanded forward per
  model serves all terms: the ground-truth rows of the expanded sequences are the
  teacher-forced rows of SFT/KD/IVA). The loss is computed inside this module's forward so
  that FSDP (and DeepSpeed ZeRO-3 through ``register_external_parameter``) has gathered the
  student's LM-head weight when the ops read it.
- Where the teacher lives: on every device, whole (replicated), frozen (``requires_grad``
  False), in eval mode, run under ``torch.no_grad``, in its own dtype (bf16 when
  ``bf16=True`` on CUDA). It is deliberately *not* a submodule of the wrapper, so it is never
  sharded, wrapped by DDP, put in train mode or written into checkpoints (a 7-8B teacher
  takes 15-16 GiB in bf16 per GPU).
- Normalisation: token-mean terms (SFT, KD) are sums over the response rows of a
  micro-batch divided by the number of response rows of the whole optimizer step over all
  processes (counted from the labels of all micro-batches, the Trainer's
  ``num_items_in_batch`` mechanism); IVA (a per-sample mean) is divided by the number of
  samples with an image and an instruction in the step; TPA by the number of candidates in
  the step. So gradient accumulation and any process count give exactly the gradient of the
  global mean.
- Logging: each term (``loss_sft``, ``loss_kd``, ``loss_iva``, ``loss_tpa``, unweighted,
  global means over the logging interval) next to the Trainer's ``loss`` (the weighted sum).
- Divergence stops the run where it starts, with `NonFiniteLossError` naming what, the step
  and the remedies: the student's (and teacher's) final hidden states, checked before anything
  reads them (TPA's sampler, the fused ops), every loss term, the gradient norm the Trainer
  computes (before the optimizer applies it), and every parameter a save would write. One host
  sync per micro-batch covers outputs and terms; see `DistillTrainer._check_step` for why
  parameters need no per-step pass of their own.
- Checkpoints (`align_ti.train.checkpoint`): staged in ``<output_dir>/.staging``, given a
  manifest (sizes and block checksums of every file, the run's teacher, data and world size),
  fsynced and renamed to ``checkpoint-<step>``; a resume verifies them first. A failed save
  says why ("no space left on ..."), removes its staged folder and leaves earlier checkpoints
  alone. A checkpoint folder is a plain student checkpoint (``from_pretrained`` loads it) plus
  the Trainer's optimizer/scheduler/RNG/state files.
- `run_distill` turns SIGTERM (a preempted job) into a checkpoint at the end of the current
  step and a clean stop.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from align_ti.data.synthetic import IGNORE_INDEX
from align_ti.ops.heuristics import resolve_chunk_bytes
from align_ti.train import checkpoint as ckpt

__all__ = [
    "LossSpec",
    "DistillModule",
    "DistillTrainer",
    "NonFiniteLossError",
    "CheckpointError",
    "count_normalizers",
    "build_trainer",
    "run_distill",
    "resolve_iva_layer",
    "TERMS",
]

TERMS = ("sft", "kd", "iva", "tpa")
_NORMALIZERS = ("tokens", "images", "candidates")


class NonFiniteLossError(FloatingPointError):
    """Training diverged: a loss term, the gradient norm, a parameter or a model output became
    NaN or inf; training stops instead of going on with it."""


CheckpointError = ckpt.CheckpointError

_REMEDIES = ("Lower learning_rate, keep gradient clipping on (training_args max_grad_norm > 0), train in "
             "bf16 or fp32 rather than fp16, check the data of this step; then resume from the last "
             "checkpoint (--resume) or start again.")


def _finite(t: torch.Tensor) -> torch.Tensor:
    """Whether every element of t is finite, as a bool scalar (no host sync): min and max carry
    any NaN or inf, and one aminmax pass is ~15x faster than isfinite().all() on CPU."""
    if t.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=t.device)
    return torch.isfinite(torch.stack(torch.aminmax(t.detach()))).all()


def _parameter_report(model) -> str:
    """Where a model's parameters stand (run only once a check has failed: a full pass)."""
    bad, largest, where = [], 0.0, None
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.numel() == 0:
                continue
            if not bool(_finite(p)):
                bad.append(name)
                continue
            m = float(p.abs().max())
            if m > largest:
                largest, where = m, name
    if bad:
        return f"{len(bad)} parameter tensor(s) hold NaN or inf, the first {bad[0]}"
    return f"its parameters are finite, the largest |value| {largest:.3g} (in {where})"


def _diverged(what: str, step: Optional[int], model=None) -> NonFiniteLossError:
    """The error of a divergence check: what went non-finite, at which step (the Trainer's
    global_step: optimizer updates done so far), where the student's parameters stand, and what
    to do about it."""
    where = f"step {step}" if step is not None else "this step"
    state = f"; {_parameter_report(model)} after {step} optimizer update(s)" if model is not None else ""
    return NonFiniteLossError(f"training diverged at {where}: {what}{state}. {_REMEDIES}")


@dataclass
class LossSpec:
    """What the wrapper computes (built from a `DistillConfig`; see METHOD.md)."""

    w_sft: float = 1.0
    w_kd: float = 1.0
    w_iva: float = 0.0
    w_tpa: float = 0.0
    divergence: str = "forward"
    beta: float = 0.5
    temperature: float = 1.0
    iva_layer: Optional[int] = None
    iva_k: Optional[int] = None
    iva_ratio: Optional[float] = None
    tpa_d: int = 4
    tpa_strategy: str = "sample"
    tpa_exclude_ground_truth: bool = True
    tpa_fraction: float = 0.25
    tpa_temperature: float = 1.0
    tpa_max_per_sample: Optional[int] = None
    seed: int = 0
    chunk_bytes: Optional[int] = None  # row-chunk budget of the fused KL ops and TPA sampling
    fp32_weight_grad: bool = True      # False: the LM head's grad accumulates in its dtype

    @property
    def needs_teacher(self) -> bool:
        return self.w_kd > 0 or self.w_iva > 0 or self.w_tpa > 0

    def weight(self, term: str) -> float:
        return float(getattr(self, f"w_{term}"))

    @classmethod
    def from_config(cls, config, iva_layer: Optional[int] = None) -> "LossSpec":
        return cls(
            w_sft=config.w_sft, w_kd=config.w_kd, w_iva=config.w_iva, w_tpa=config.w_tpa,
            divergence=config.divergence, beta=config.beta, temperature=config.temperature,
            iva_layer=iva_layer, iva_k=config.iva_k, iva_ratio=config.iva_ratio,
            tpa_d=config.tpa_d, tpa_strategy=config.tpa_strategy, tpa_fraction=config.tpa_fraction,
            tpa_temperature=config.tpa_temperature,
            tpa_exclude_ground_truth=getattr(config, "tpa_exclude_ground_truth", True),
            tpa_max_per_sample=getattr(config, "tpa_max_per_sample", None), seed=config.seed,
            chunk_bytes=resolve_chunk_bytes(getattr(config, "kl_chunk_bytes", None), "config kl_chunk_bytes"),
            fp32_weight_grad=getattr(config, "fp32_weight_grad", True),
        )

    @property
    def kernel_options(self) -> dict:
        """Keyword options every fused KL op of the step takes."""
        return {"chunk_bytes": self.chunk_bytes, "fp32_weight_grad": self.fp32_weight_grad}


# --------------------------------------------------------------------------------------------
# normalisers
# --------------------------------------------------------------------------------------------

def _branch_counts(labels: torch.Tensor, attention_mask: torch.Tensor, spec: LossSpec) -> torch.Tensor:
    """Branched steps per sample, exactly as `select_branch_steps` chooses them."""
    pos = torch.arange(labels.shape[1], device=labels.device)
    eligible = (labels != IGNORE_INDEX) & (pos >= 1) & attention_mask.bool()
    from align_ti.ops.branches import branch_count

    return branch_count(eligible.sum(1), spec.tpa_fraction, spec.tpa_max_per_sample)


def count_normalizers(batch: dict, spec: LossSpec, image_token_id: int) -> torch.Tensor:
    """float64 [3]: (response rows, samples with image + instruction, TPA candidates) of a batch."""
    labels = batch["labels"]
    tokens = (labels[:, 1:] != IGNORE_INDEX).sum()
    has_image = (batch["input_ids"] == image_token_id).any(1)
    if "instruction_mask" in batch:
        has_image = has_image & batch["instruction_mask"].bool().any(1)
    images = has_image.sum()
    cands = _branch_counts(labels, batch["attention_mask"], spec).sum() * spec.tpa_d if spec.w_tpa > 0 else tokens * 0
    return torch.stack([tokens, images, cands]).to(torch.float64)


# --------------------------------------------------------------------------------------------
# the wrapper module
# --------------------------------------------------------------------------------------------

def _head(model):
    head = model.get_output_embeddings()
    return head.weight, getattr(head, "bias", None)


def _base(model):
    """The part of a *ForConditionalGeneration / *ForCausalLM model that returns hidden states."""
    base = getattr(model, "model", None)
    if base is None:
        raise TypeError(f"{type(model).__name__} has no .model (expected a transformers LLaVA or causal LM)")
    return base


class DistillModule(nn.Module):
    """Student + (unregistered) teacher; ``forward(**batch)`` returns the loss and its terms.

    forward returns ``{"loss": weighted sum (scalar, with grad), "terms": {name: detached
    scalar}, "finite": {"student": bool scalar, "teacher": bool scalar}}``, the last whether
    each model's final hidden states are finite (the trainer checks them with the terms, in one
    host sync). ``loss_divisors`` (float [3]: response rows, image samples, candidates) are the
    global counts of the optimizer step divided by the number of processes; None = this
    micro-batch's own counts (plain means). ``step`` only labels a divergence error.
    """

    def __init__(self, student, teacher, spec: LossSpec, image_token_id: int, pad_token_id: int,
                 forbidden_ids=(), vocab_limit: Optional[int] = None, impl: str = "auto"):
        super().__init__()
        self.student = student
        object.__setattr__(self, "teacher", teacher)  # not a submodule: see the module docstring
        self.spec = spec
        self.image_token_id = int(image_token_id)
        self.pad_token_id = int(pad_token_id)
        self.forbidden_ids = tuple(forbidden_ids)
        self.vocab_limit = vocab_limit
        self.impl = impl
        if spec.needs_teacher and teacher is None:
            raise ValueError("a teacher is needed for w_kd, w_iva or w_tpa > 0")
        if spec.w_iva > 0 and spec.iva_layer is None:
            raise ValueError("w_iva > 0 needs spec.iva_layer (an int; resolve 'auto' with resolve_iva_layer)")
        if teacher is not None:
            teacher.eval()
            teacher.requires_grad_(False)

    # transformers.Trainer conveniences
    def gradient_checkpointing_enable(self, **kwargs):
        self.student.gradient_checkpointing_enable(**kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Accepts the wrapper's own keys (``student.*``) or a plain student state dict (what a
        checkpoint folder holds); strict by default, so a wrong file never loads silently."""
        if state_dict and not any(k.startswith("student.") for k in state_dict):
            state_dict = {f"student.{k}": v for k, v in state_dict.items()}
        return super().load_state_dict(state_dict, strict=True, assign=assign)

    def register_zero3_heads(self) -> None:
        """Under DeepSpeed ZeRO-3, gather the student LM head when this module's forward runs
        (the ops read the weight directly, not through the head's own forward)."""
        import deepspeed  # noqa: F401  (only called when DeepSpeed is in use)

        deepspeed.zero.register_external_parameter(self, _head(self.student)[0])

    # ---------------------------------------------------------------------------------------
    def forward(self, input_ids, attention_mask, labels, pixel_values=None, instruction_mask=None,
                sample_ids=None, loss_divisors=None, epoch: int = 0, step: Optional[int] = None):
        from align_ti.ops.fused_kl import fused_linear_distill

        spec = self.spec
        student, teacher = self.student, self.teacher
        ws, bs = _head(student)
        b_size, length = input_ids.shape
        if pixel_values is not None:
            pixel_values = pixel_values.to(next(student.parameters()).dtype)
        t_pixels = None
        if teacher is not None and pixel_values is not None:
            t_pixels = pixel_values.to(next(teacher.parameters()).dtype)
        vision_mask = input_ids == self.image_token_id
        use_iva = spec.w_iva > 0
        use_tpa = spec.w_tpa > 0
        use_teacher = spec.needs_teacher

        # ---- forwards: one per model (an expanded one with TPA) ----------------------------
        eb = None
        mass = None
        if use_tpa:
            from align_ti.ops.branches import (
                build_expanded_batch,
                expanded_hidden_states,
                sample_candidates,
                select_branch_steps,
            )

            steps = select_branch_steps(labels, attention_mask, fraction=spec.tpa_fraction,
                                        max_per_sample=spec.tpa_max_per_sample, seed=spec.seed,
                                        sample_ids=sample_ids, epoch=epoch)
            with torch.no_grad():
                h0 = _base(student)(input_ids=input_ids, pixel_values=pixel_values,
                                    attention_mask=attention_mask, use_cache=False).last_hidden_state
                # checked here, not with the terms: the sampler reads h0 next and its own input
                # check would stop a diverged run with a message about its arguments (TPA's
                # branch selection syncs with the host anyway)
                if not bool(_finite(h0)):
                    raise _diverged("the student's final hidden states hold NaN or inf (the pass that "
                                   "draws TPA's candidates)", step, student)
                cands = sample_candidates(h0, ws, input_ids, steps, num_candidates=spec.tpa_d,
                                          strategy=spec.tpa_strategy, temperature=spec.tpa_temperature,
                                          exclude_ground_truth=spec.tpa_exclude_ground_truth,
                                          forbidden_ids=self.forbidden_ids, vocab_limit=self.vocab_limit,
                                          seed=spec.seed, sample_ids=sample_ids, epoch=epoch,
                                          student_bias=bs, chunk_bytes=spec.chunk_bytes,
                                          attention_mask=attention_mask)
            del h0
            eb = build_expanded_batch(input_ids, attention_mask, steps, cands, labels=labels,
                                      pad_id=self.pad_token_id)
            hs = expanded_hidden_states(student, eb, pixel_values=pixel_values)
            with torch.no_grad():
                def run_teacher():
                    return expanded_hidden_states(teacher, eb, pixel_values=t_pixels)
                if use_iva:
                    ht, mass = self._teacher_pass(run_teacher, instruction_mask, eb.attention_mask,
                                                  extra=eb.num_slots)
                else:
                    ht = run_teacher()
            targets = eb.targets
            extra = eb.num_slots
        else:
            hs = _base(student)(input_ids=input_ids, pixel_values=pixel_values,
                                attention_mask=attention_mask, use_cache=False).last_hidden_state
            ht = None
            if use_teacher:
                def run_teacher():
                    return _base(teacher)(input_ids=input_ids, pixel_values=t_pixels,
                                          attention_mask=attention_mask, use_cache=False).last_hidden_state
                with torch.no_grad():
                    if use_iva:
                        ht, mass = self._teacher_pass(run_teacher, instruction_mask, attention_mask, extra=0)
                    else:
                        ht = run_teacher()
            targets = torch.full_like(labels, IGNORE_INDEX)
            targets[:, :-1] = labels[:, 1:]
            extra = 0

        # under autocast (bf16/fp16 mixed precision) the final hidden states may come out in a
        # lower dtype than the fp32 head; each hidden/weight pair must share one dtype
        if hs.dtype != ws.dtype:
            hs = hs.to(ws.dtype)
        if ht is not None and ht.dtype != _head(teacher)[0].dtype:
            ht = ht.to(_head(teacher)[0].dtype)
        finite = {"student": _finite(hs),
                  "teacher": _finite(ht) if ht is not None else hs.new_ones((), dtype=torch.bool)}
        hs2 = hs.reshape(-1, hs.shape[-1])
        terms: dict[str, torch.Tensor] = {}
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, torch.Tensor] = {}

        # ---- SFT + KD: one pass over the student head --------------------------------------
        if spec.w_sft > 0 or spec.w_kd > 0:
            flat_targets = targets.reshape(-1)
            rows = flat_targets != IGNORE_INDEX
            if spec.w_kd > 0:
                wt, bt = _head(teacher)
                th2 = ht.reshape(-1, ht.shape[-1])
            else:  # SFT only: the student is its own (detached) teacher; KL = 0, not used
                wt, bt, th2 = ws.detach(), None if bs is None else bs.detach(), hs2.detach()
            kl_sum, ce_mean = fused_linear_distill(
                hs2, ws, th2, wt, labels=flat_targets, rows=rows, divergence=spec.divergence,
                beta=spec.beta, temperature=spec.temperature, reduction="sum",
                student_bias=bs, teacher_bias=bt, impl=self.impl, **spec.kernel_options)
            n_rows = rows.sum()
            if spec.w_sft > 0:
                sums["sft"] = ce_mean * n_rows
                counts["sft"] = n_rows
            if spec.w_kd > 0:
                sums["kd"] = kl_sum
                counts["kd"] = n_rows

        # ---- IVA ---------------------------------------------------------------------------
        if use_iva:
            from align_ti.ops.topk_align import topk_align

            vmask = vision_mask if extra == 0 else torch.cat(
                [vision_mask, vision_mask.new_zeros(b_size, extra)], 1)
            wt, bt = _head(teacher)
            iva_mean = topk_align(hs, ws, ht, wt, mass, vmask, k=spec.iva_k, ratio=spec.iva_ratio,
                                  normalize="sample", divergence=spec.divergence, beta=spec.beta,
                                  temperature=spec.temperature, student_bias=bs, teacher_bias=bt,
                                  impl=self.impl, **spec.kernel_options)
            n_samples = ((mass * vmask).sum(1) > 0).sum()
            sums["iva"] = iva_mean * n_samples
            counts["iva"] = n_samples

        # ---- TPA ---------------------------------------------------------------------------
        if use_tpa:
            from align_ti.ops.branches import tpa_loss

            wt, bt = _head(teacher)
            sums["tpa"] = tpa_loss(hs, ws, ht, wt, eb, divergence=spec.divergence, beta=spec.beta,
                                   temperature=spec.temperature, reduction="sum", student_bias=bs,
                                   teacher_bias=bt, impl=self.impl, **spec.kernel_options)
            counts["tpa"] = eb.candidate_valid.sum()

        # ---- normalise and combine ---------------------------------------------------------
        which = {"sft": 0, "kd": 0, "iva": 1, "tpa": 2}
        loss = hs2.new_zeros((), dtype=torch.float32)
        for name, s in sums.items():
            if loss_divisors is None:
                denom = counts[name].to(torch.float32).clamp(min=1)
            else:
                denom = loss_divisors[which[name]].to(torch.float32)
            value = s / denom
            terms[name] = value
            loss = loss + spec.weight(name) * value
        return {"loss": loss, "terms": {k: v.detach() for k, v in terms.items()}, "finite": finite}

    def _teacher_pass(self, run, instruction_mask, attention_mask_2d, extra: int):
        """Run the teacher (no grad) while capturing the IRS layer's q/k; return its final hidden
        states and the instruction->token attention mass [B, L + extra]."""
        from align_ti.models.capture import capture_qk
        from align_ti.ops.attention_mass import attention_mass

        if instruction_mask is None:
            raise ValueError("IVA needs the batch's instruction_mask (encode_example(..., return_instruction_mask=True))")
        layer = self.spec.iva_layer
        with capture_qk(self.teacher, layers=[layer], detach=True) as cap:
            ht = run()
        q, k = cap[layer]
        qmask = instruction_mask.bool()
        if extra:
            qmask = torch.cat([qmask, qmask.new_zeros(qmask.shape[0], extra)], 1)
        # as bool: the 0/1 masks made here need no value check (a host sync on CUDA)
        mass = attention_mass(q, k, qmask, attention_mask_2d != 0, impl=self.impl)
        return ht, mass


# --------------------------------------------------------------------------------------------
# the Trainer subclass
# --------------------------------------------------------------------------------------------

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
        if teacher is not None:
            teacher.to(self.args.device)

    def request_stop(self) -> None:
        """Save a checkpoint at the end of the current step and stop (safe in a signal handler:
        it only sets a flag, which the next per-micro-batch check shares with every process)."""
        self._stop_asked = True

    def train(self, resume_from_checkpoint=None, *args, verify: bool = True, **kwargs):
        """transformers' train, after `verify_checkpoint` of the checkpoint it resumes from
        (``verify=False`` when the caller has just verified it, as `run_distill` does)."""
        if resume_from_checkpoint is True:
            from transformers.trainer_utils import get_last_checkpoint

            # None: transformers says there is none
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir) or True
        if verify and isinstance(resume_from_checkpoint, (str, os.PathLike)):
            ckpt.verify_checkpoint(resume_from_checkpoint, run=self.run_identity, allow_changes=self.resume_anyway)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    # ---- normalisers: counted over all micro-batches of the step and all processes --------
    def _get_num_items_in_batch(self, batch_samples, device):
        if not batch_samples:
            return None
        spec, image_id = self._distill.spec, self._distill.image_token_id
        counts = sum(count_normalizers(b, spec, image_id) for b in batch_samples)
        counts = counts.to(device)
        if self.args.world_size > 1:
            counts = self.accelerator.gather(counts[None]).reshape(-1, len(_NORMALIZERS)).sum(0)
        return counts

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        world = max(1, self.accelerator.num_processes)
        divisors = None
        if num_items_in_batch is not None:
            # DDP/FSDP average gradients over processes: dividing by (global count / world)
            # makes that average the gradient of the global mean.
            divisors = num_items_in_batch.to(torch.float64).clamp(min=1) / world
        epoch = int(self.state.epoch or 0)
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
        `_diverged` scans the parameters once to say where they stand. One corner is left to
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
            raise _diverged("the student's final hidden states hold NaN or inf", step, student)
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
            raise _diverged(f"term(s) {bad or ['total']} of the loss are NaN or inf (values on this process: "
                           f"{values}; weights {weights})", step, student)

    def _get_grad_norm(self, model, grad_norm=None):
        """The Trainer's gradient norm, checked before the optimizer applies the gradients. Under
        fp16 the loss scaler expects an inf now and then (it skips that step and lowers the
        scale), so only bf16 and fp32 runs stop on it."""
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        if grad_norm is not None and not self.args.fp16 and not math.isfinite(_scalar(grad_norm)):
            raise _diverged(f"the gradient norm is {_scalar(grad_norm)} although the loss was finite; the "
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
    def _save(self, output_dir: Optional[str] = None, state_dict: Optional[dict] = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        student = self._distill.student
        if state_dict is None:
            state_dict = self.accelerator.unwrap_model(self.model).state_dict()
        state_dict = {k[len("student."):]: v for k, v in state_dict.items() if k.startswith("student.")}
        bad = next((k for k, v in state_dict.items() if v.is_floating_point() and not bool(_finite(v))), None)
        if bad is not None:
            raise _diverged(f"the student's parameter {bad} holds NaN or inf; it is not saved to {output_dir}",
                           self.state.global_step, student)
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
            ckpt.remove_staged(staged)  # a save killed earlier
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


# --------------------------------------------------------------------------------------------
# building a run from a config
# --------------------------------------------------------------------------------------------

def _folder_fingerprint(path: str) -> list:
    """(name, size, mtime) of a checkpoint folder's files: a cached result of another teacher
    saved at the same path does not match. [] for a built-in model name."""
    if not os.path.isdir(path):
        return []
    return sorted([name, st.st_size, int(st.st_mtime)] for name in os.listdir(path)
                  if os.path.isfile(os.path.join(path, name))
                  for st in [os.stat(os.path.join(path, name))])


def resolve_iva_layer(config, teacher, processor, items, cache_dir: str) -> int:
    """``config.iva_layer`` as an int: itself, or for "auto" the IRS argmax of the teacher over
    ``config.irs_samples`` calibration pairs from the training items (samples sharing an image),
    cached in ``<cache_dir>/irs.json`` (reused when the teacher -- its path, files and layer count
    --, the tiny text model, the data, the seed and the sample count match)."""
    if config.iva_layer != "auto":
        n = teacher.config.get_text_config().num_hidden_layers
        layer = int(config.iva_layer)
        if not -n <= layer < n:
            raise ValueError(f"config iva_layer={layer} is out of range for a teacher with {n} decoder layers")
        return layer % n
    from align_ti.models.irs import irs_scores, pairs_from_llava

    n_layers = teacher.config.get_text_config().num_hidden_layers
    key = {"teacher": os.path.abspath(config.teacher) if os.path.isdir(config.teacher) else config.teacher,
           "teacher_files": _folder_fingerprint(config.teacher), "tiny_text_model": config.tiny_text_model,
           "teacher_layers": n_layers, "irs_samples": config.irs_samples, "data": config.data,
           "seed": config.seed}
    path = os.path.join(cache_dir, "irs.json")
    if os.path.isfile(path):
        try:
            cached = json.loads(open(path).read())
            if cached.get("key") == key and 0 <= int(cached["layer"]) < n_layers:
                return int(cached["layer"])
        except (ValueError, KeyError, TypeError):
            pass
    pairs = pairs_from_llava(items, max_pairs=config.irs_samples)
    if not pairs:
        raise ValueError("iva_layer='auto' needs calibration pairs (two instructions on one image) in the "
                         "training data; none found: set iva_layer to a layer index")
    result = irs_scores(teacher, processor, pairs)
    os.makedirs(cache_dir, exist_ok=True)
    tmp = path + f".tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({"key": key, **result.to_dict()}, f, indent=2)
    os.replace(tmp, path)
    return int(result.layer)


def training_arguments(config, **extra) -> TrainingArguments:
    """TrainingArguments from a DistillConfig (``config.training_args`` overrides the defaults)."""
    kw: dict[str, Any] = dict(
        output_dir=config.output_dir, learning_rate=config.learning_rate,
        per_device_train_batch_size=config.per_device_train_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps, max_steps=config.max_steps,
        num_train_epochs=config.num_train_epochs, bf16=config.bf16 and torch.cuda.is_available(),
        seed=config.seed, data_seed=config.seed, remove_unused_columns=False, report_to=[],
        logging_steps=10, save_strategy="steps", save_steps=500, dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
    )
    kw.update(extra)
    kw.update(config.training_args)
    try:
        return TrainingArguments(**kw)
    except TypeError as e:
        raise ValueError(f"config training_args: {e}") from e


def build_trainer(config, student=None, teacher=None, processor=None, teacher_processor=None,
                  train_dataset=None, items=None, callbacks=None, iva_layer=None, **args_overrides):
    """A ready `DistillTrainer` for a `DistillConfig`. Models, processor and data are loaded
    from the config unless given (the demo passes its own trained teacher and encoded data)."""
    from align_ti.train.data import (
        DistillCollator,
        EncodedDataset,
        check_image_expansion,
        check_tokenizers,
        load_items,
        load_model_and_processor,
    )

    spec_probe = LossSpec.from_config(config)
    t_dtype = torch.bfloat16 if (config.bf16 and torch.cuda.is_available()) else torch.float32
    attn = getattr(config, "attn_implementation", "sdpa")
    if attn == "flex_attention" and not torch.cuda.is_available():
        raise ValueError("config attn_implementation='flex_attention' needs a CUDA device (FlexAttention "
                         "has no backward on CPU); use 'sdpa' here")
    if student is None:
        student, processor = load_model_and_processor(config.student, config.tiny_text_model, seed=config.seed,
                                                      attn_implementation=attn)
    if processor is None:
        raise ValueError("build_trainer: a student passed in needs its processor")
    if spec_probe.needs_teacher:
        if teacher is None:
            teacher, teacher_processor = load_model_and_processor(config.teacher, config.tiny_text_model,
                                                                  seed=config.seed + 1, dtype=t_dtype,
                                                                  attn_implementation=attn)
        check_tokenizers(teacher_processor if teacher_processor is not None else processor, processor,
                         vocab_size=min(_head(student)[0].shape[0], _head(teacher)[0].shape[0]))
        check_image_expansion(teacher, student)
    else:
        teacher = None
    if train_dataset is None:
        if items is None:
            items = load_items(config.data, config.image_folder, getattr(config, "synthetic_images", 200),
                               seed=config.seed, bad_samples=getattr(config, "bad_samples", "error"))
        train_dataset = EncodedDataset(items, processor, max_length=config.max_length)
    args = training_arguments(config, **args_overrides)
    layer = iva_layer
    if config.w_iva > 0 and layer is None:
        src_items = items if items is not None else getattr(train_dataset, "items", None)
        if src_items is None and config.iva_layer == "auto":
            raise ValueError("iva_layer='auto' needs the raw training items for calibration pairs")
        if config.iva_layer == "auto":
            teacher.to(args.device)  # IRS's calibration forwards run where training will
        layer = resolve_iva_layer(config, teacher, teacher_processor or processor, src_items or [],
                                  config.output_dir)
    spec = LossSpec.from_config(config, iva_layer=layer)
    tok = processor.tokenizer
    forbidden, vocab_limit = (), None
    if spec.w_tpa > 0:
        from align_ti.ops.branches import forbidden_token_ids

        forbidden, vocab_limit = forbidden_token_ids(student, tok)
        vocab_limit = min(vocab_limit, _head(student)[0].shape[0], _head(teacher)[0].shape[0])
    module = DistillModule(student, teacher, spec, image_token_id=student.config.image_token_index,
                           pad_token_id=tok.pad_token_id, forbidden_ids=forbidden, vocab_limit=vocab_limit)
    trainer = DistillTrainer(module, args=args, train_dataset=train_dataset,
                             data_collator=DistillCollator(tok.pad_token_id), processing_class=processor,
                             callbacks=callbacks)
    trainer.run_identity = ckpt.run_identity(config, args.world_size)
    return trainer


@contextlib.contextmanager
def _save_and_stop_on_sigterm(trainer: DistillTrainer):
    """While training, SIGTERM (what a scheduler sends a preempted job) makes the trainer save a
    checkpoint at the end of the current step and stop; afterwards the old handler is back."""
    if threading.current_thread() is not threading.main_thread():  # handlers live in the main thread
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: trainer.request_stop())
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_distill(config, resume_from_checkpoint=None, resume_anyway: bool = False) -> dict:
    """Train as configured; save the final student to ``output_dir``; return the train metrics.

    ``resume_from_checkpoint``: a checkpoint folder, True (the last one in output_dir; none
    there: start from step 0), or None. It is verified (`verify_checkpoint`) before any model is
    loaded; one written by a run with another teacher, data or world size is refused unless
    ``resume_anyway``. The metrics hold transformers' ``train_loss`` (the mean over the steps this
    call ran), ``first_step`` and ``global_step`` (the steps it ran), ``wall_s`` and
    ``log_history``. SIGTERM during training ends the current step with a checkpoint and returns
    early: the metrics then also hold ``stopped_by`` ("SIGTERM") and ``checkpoint`` (the folder),
    and the final student is not saved (the run is not finished).
    """
    from align_ti.train.config import save_config

    if resume_from_checkpoint is True:
        from transformers.trainer_utils import get_last_checkpoint

        resume_from_checkpoint = get_last_checkpoint(config.output_dir) if os.path.isdir(config.output_dir) else None
    if resume_from_checkpoint:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))  # what TrainingArguments will find
        ckpt.verify_checkpoint(resume_from_checkpoint, run=ckpt.run_identity(config, world_size),
                               allow_changes=resume_anyway)
    os.makedirs(config.output_dir, exist_ok=True)
    save_config(config, os.path.join(config.output_dir, "distill_config.json"))
    trainer = build_trainer(config)
    t0 = time.time()
    with _save_and_stop_on_sigterm(trainer):
        result = trainer.train(resume_from_checkpoint=resume_from_checkpoint, verify=False)
    metrics = dict(result.metrics)
    if trainer.stop_requested and result.global_step < trainer.state.max_steps:
        metrics.update(stopped_by="SIGTERM", checkpoint=trainer.last_checkpoint)
    else:
        try:
            trainer.save_model(config.output_dir)
        except NonFiniteLossError:
            raise
        except Exception as e:  # noqa: BLE001 -- said in one line, the cause chained
            raise CheckpointError(f"could not save the final student to {config.output_dir}: "
                                  f"{ckpt.save_failure_reason(e, config.output_dir)}; the checkpoints are intact: "
                                  "fix that, then run again with --resume") from e
    metrics["wall_s"] = time.time() - t0
    # train_loss (transformers) is the mean over the steps this call ran, not over the run
    metrics["first_step"] = 1 + (ckpt.checkpoint_step(resume_from_checkpoint) if resume_from_checkpoint else 0)
    metrics["global_step"] = result.global_step
    metrics["log_history"] = trainer.state.log_history
    return metrics
