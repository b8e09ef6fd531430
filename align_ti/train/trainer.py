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
- A NaN/inf term stops the run with `NonFiniteLossError` naming the term and the step.
- Checkpoints are written atomically: the Trainer writes into ``<output_dir>/.staging`` and
  the finished folder is renamed to ``checkpoint-<step>`` (a run killed while saving leaves
  no half-written ``checkpoint-*`` for ``resume_from_checkpoint`` to pick up). A checkpoint
  folder is a plain student checkpoint (``from_pretrained`` loads it) plus the Trainer's
  optimizer/scheduler/RNG/state files.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn
from transformers import Trainer, TrainingArguments

from align_ti.data.synthetic import IGNORE_INDEX
from align_ti.ops.heuristics import resolve_chunk_bytes

__all__ = [
    "LossSpec",
    "DistillModule",
    "DistillTrainer",
    "NonFiniteLossError",
    "count_normalizers",
    "build_trainer",
    "run_distill",
    "resolve_iva_layer",
    "TERMS",
]

TERMS = ("sft", "kd", "iva", "tpa")
_NORMALIZERS = ("tokens", "images", "candidates")


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or inf: training stops instead of going on with it."""


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
    scalar}}``. ``loss_divisors`` (float [3]: response rows, image samples, candidates) are the
    global counts of the optimizer step divided by the number of processes; None = this
    micro-batch's own counts (plain means).
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
                sample_ids=None, loss_divisors=None, epoch: int = 0):
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
        return {"loss": loss, "terms": {k: v.detach() for k, v in terms.items()}}

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

class DistillTrainer(Trainer):
    """`transformers.Trainer` over a `DistillModule` (pass it as ``model``)."""

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
        if self.is_deepspeed_enabled:
            model.register_zero3_heads()
        teacher = model.teacher
        if teacher is not None:
            teacher.to(self.args.device)

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
        out = model(**inputs, loss_divisors=divisors, epoch=epoch)
        terms = out["terms"]
        self._check_finite(out["loss"], terms)
        if model.training:
            if not self._term_sums:  # a resumed run starts at its checkpoint's step, not 0
                self._terms_since_step = self.state.global_step
            for name, value in terms.items():
                acc = self._term_sums.get(name)
                self._term_sums[name] = value.detach().clone() if acc is None else acc + value.detach()
        return (out["loss"], out) if return_outputs else out["loss"]

    def _check_finite(self, loss, terms):
        names = list(terms)
        flags = torch.stack([torch.isfinite(loss)] + [torch.isfinite(terms[n]) for n in names]).to(torch.float32)
        if self.args.world_size > 1:  # every process stops, not just the one that saw it
            flags = self.accelerator.reduce(flags, reduction="mean") if hasattr(self.accelerator, "reduce") else flags
        if bool((flags < 1).any()):
            bad = [n for n, f in zip(["total"] + names, flags.tolist()) if f < 1 and n != "total"]
            values = {n: float(terms[n]) for n in names}
            raise NonFiniteLossError(
                f"non-finite loss at step {self.state.global_step}: term(s) {bad or ['total']} "
                f"(values on this process: {values}; weights "
                f"{ {n: self._distill.spec.weight(n) for n in names} }). Training stopped; lower the "
                "learning rate, check the data of this step, or resume from the last checkpoint.")

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

    # ---- checkpoints: a student checkpoint, written atomically ---------------------------
    def _save(self, output_dir: Optional[str] = None, state_dict: Optional[dict] = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        student = self._distill.student
        if state_dict is None:
            state_dict = self.accelerator.unwrap_model(self.model).state_dict()
        state_dict = {k[len("student."):]: v for k, v in state_dict.items() if k.startswith("student.")}
        student.save_pretrained(output_dir, state_dict=state_dict, is_main_process=True)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None) -> None:
        """Load the student weights of a checkpoint folder (a `save_pretrained` student: its
        keys are in the checkpoint format, which `from_pretrained` converts)."""
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        student = self._distill.student
        loaded = type(student).from_pretrained(resume_from_checkpoint, dtype=next(student.parameters()).dtype,
                                               local_files_only=True)
        student.load_state_dict(loaded.state_dict(), strict=True)
        del loaded

    def _get_output_dir(self, trial=None) -> str:
        run_dir = super()._get_output_dir(trial)
        return os.path.join(run_dir, ".staging") if getattr(self, "_staging", False) else run_dir

    def _save_checkpoint(self, model, trial) -> None:
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

        run_dir = super()._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = os.path.join(run_dir, ".staging")
        if self.args.should_save:
            shutil.rmtree(os.path.join(staging, name), ignore_errors=True)  # a save killed earlier
        self._wait()
        self._staging = True
        try:
            super()._save_checkpoint(model, trial)  # writes <run_dir>/.staging/<name>; no rotation there
        finally:
            self._staging = False
        self._wait()  # every process has written its files (RNG states, shards)
        if self.args.should_save:
            src, dst = os.path.join(staging, name), os.path.join(run_dir, name)
            _fsync_tree(src)
            if os.path.exists(dst):  # re-saving a step: move the old one out of the way first
                old = os.path.join(staging, name + ".old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(dst, old)
                shutil.rmtree(old, ignore_errors=True)
            os.replace(src, dst)
            _fsync_dir(run_dir)
            try:
                os.rmdir(staging)  # only when empty
            except OSError:
                pass
            best = self.state.best_model_checkpoint
            if best is not None and os.path.dirname(os.path.abspath(best)) == os.path.abspath(staging):
                self.state.best_model_checkpoint = os.path.join(run_dir, os.path.basename(best))
            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=False)
        self._wait()

    def _wait(self) -> None:
        if self.args.world_size > 1:
            self.accelerator.wait_for_everyone()


def _fsync_tree(path: str) -> None:
    for root, _dirs, files in os.walk(path):
        for f in files:
            fd = os.open(os.path.join(root, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(root)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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
    return DistillTrainer(module, args=args, train_dataset=train_dataset,
                          data_collator=DistillCollator(tok.pad_token_id), processing_class=processor,
                          callbacks=callbacks)


def _checkpoint_step(path) -> int:
    """The step of a checkpoint folder (its trainer_state.json, else its checkpoint-<step> name)."""
    state = os.path.join(path, "trainer_state.json")
    if os.path.isfile(state):
        with open(state, encoding="utf-8") as f:
            return int(json.load(f).get("global_step", 0))
    tail = os.path.basename(os.path.normpath(path)).rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else 0


def run_distill(config, resume_from_checkpoint=None) -> dict:
    """Train as configured; save the final student to ``output_dir``; return the train metrics.

    ``resume_from_checkpoint``: a checkpoint folder, True (the last one in output_dir), or None.
    The metrics hold transformers' ``train_loss`` (the mean over the steps this call ran),
    ``first_step`` and ``global_step`` (the steps it ran), ``wall_s`` and ``log_history``.
    """
    from align_ti.train.config import save_config

    os.makedirs(config.output_dir, exist_ok=True)
    save_config(config, os.path.join(config.output_dir, "distill_config.json"))
    trainer = build_trainer(config)
    if resume_from_checkpoint is True:
        from transformers.trainer_utils import get_last_checkpoint

        resume_from_checkpoint = get_last_checkpoint(config.output_dir)
    t0 = time.time()
    result = trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    trainer.save_model(config.output_dir)
    metrics = dict(result.metrics)
    metrics["wall_s"] = time.time() - t0
    # train_loss (transformers) is the mean over the steps this call ran, not over the run
    metrics["first_step"] = 1 + (_checkpoint_step(resume_from_checkpoint) if resume_from_checkpoint else 0)
    metrics["global_step"] = result.global_step
    metrics["log_history"] = trainer.state.log_history
    return metrics
