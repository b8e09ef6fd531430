"""The Align-TI loss of one micro-batch (METHOD.md), computed in `DistillModule.forward`:

    L = w_sft L_SFT + w_kd L_KD + w_iva L_IVA + w_tpa L_TPA

- `LossSpec`: the weights and options of the terms (built from a `DistillConfig`).
- `DistillModule`: holds the student (trainable) and a reference to the teacher. Its forward
  runs both models to their *final hidden states* (``model.model``, never ``[B, L, V]``
  logits) and computes every term with the align_ti ops, in named steps (each a
  ``torch.profiler.record_function`` range, which the train-step benchmark reads):

  ``align_ti.tpa_sample``       TPA only: branched steps, candidates drawn from the student's
                                final hidden states of the ground truth, the expanded batch
                                (`align_ti.ops.branches`)
  ``align_ti.student_forward``  the student, with grad (with TPA: the ground truth, then the
                                candidates over its cached keys and values)
  ``align_ti.teacher_forward``  the teacher, no grad, the same way; with IVA it captures the IRS
                                layer's q/k (of the ground-truth pass)
  ``align_ti.iva_mass``         IVA: the teacher's instruction->token attention mass (inside
                                ``align_ti.teacher_forward``)
  ``align_ti.sft_kd``           SFT and KD with `fused_linear_distill` (one student-head pass)
  ``align_ti.iva``              IVA with `topk_align` over the vision rows
  ``align_ti.tpa_loss``         TPA with `tpa_loss` over the candidate rows

  TPA's candidates (`LossSpec.tpa_forward`): with "prefix_cache" (what "auto" picks where both
  models allow it) the student's training forward over the ground truth keeps its keys and
  values, the candidates are drawn from its final hidden states, and then only the candidate
  tokens run through each model; with "expanded" a no-grad student pass draws them and one
  forward per model runs ground truth and candidates together. Both give the same rows (the
  ground truth, then the candidates) and gradients. The ground-truth rows serve SFT/KD/IVA.
  The loss is computed inside this forward so that FSDP (and DeepSpeed ZeRO-3 through
  ``register_external_parameter``) has gathered the student's LM-head weight when the ops
  read it.
- Where the teacher lives: on every device, whole (replicated), frozen (``requires_grad``
  False), in eval mode, run under ``torch.no_grad``, in its own dtype. It is deliberately *not*
  a submodule of the wrapper, so it is never sharded, wrapped by DDP, put in train mode or
  written into checkpoints (a 7-8B teacher takes 15-16 GiB in bf16 per GPU).
- Normalisation (`count_normalizers`): token-mean terms (SFT, KD) are sums over the response
  rows of a micro-batch divided by the number of response rows of the whole optimizer step
  over all processes; IVA (a per-sample mean) by the number of samples with an image and an
  instruction in the step; TPA by the number of candidates in the step. So gradient
  accumulation and any process count give exactly the gradient of the global mean.
- Divergence: `NonFiniteLossError`, raised by `diverged` with what went non-finite, the step,
  where the parameters stand and the remedies (the trainer's checks, and here the pass that
  draws TPA's candidates, before the sampler reads it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from torch.profiler import record_function

from align_ti.constants import IGNORE_INDEX
from align_ti.models.capture import capture_qk
from align_ti.models.families import family_of
from align_ti.ops.attention_mass import attention_mass
from align_ti.ops.branches import (
    ExpandedBatch,
    branch_count,
    build_expanded_batch,
    candidate_hidden_states,
    eligible_steps,
    expanded_hidden_states,
    ground_truth_pass,
    next_token_targets,
    prefix_cache_unsupported,
    sample_candidates,
    select_branch_steps,
    tpa_loss,
)
from align_ti.ops.fused_kl import fused_linear_distill, fused_linear_kl
from align_ti.ops.heuristics import resolve_chunk_bytes
from align_ti.ops.topk_align import topk_align, topk_weights
from align_ti.train.sharding import layer_classes, vision_modules

__all__ = [
    "LossSpec",
    "DistillModule",
    "NonFiniteLossError",
    "count_normalizers",
    "TERMS",
    "NORMALIZERS",
    "SECTIONS",
]

TERMS = ("sft", "kd", "iva", "tpa")
IVA_WEIGHTINGS = ("attention", "uniform")  # LossSpec.iva_weighting (config iva_weighting)
NORMALIZERS = ("tokens", "images", "candidates")  # the entries of count_normalizers / loss_divisors
_DIVISOR_OF = {"sft": 0, "kd": 0, "iva": 1, "tpa": 2}  # term -> its entry of NORMALIZERS
# the record_function ranges of DistillModule.forward (the train-step benchmark reads them):
# common to both kl_pass settings, then the single pass's one range, then per_term's three
SECTIONS = ("align_ti.tpa_sample", "align_ti.student_forward", "align_ti.teacher_forward", "align_ti.iva_mass")
SINGLE_PASS_SECTIONS = ("align_ti.kl",)
PER_TERM_SECTIONS = ("align_ti.sft_kd", "align_ti.iva", "align_ti.tpa_loss")


# --------------------------------------------------------------------------------------------
# divergence
# --------------------------------------------------------------------------------------------

class NonFiniteLossError(FloatingPointError):
    """Training diverged: a loss term, the gradient norm, a parameter or a model output became
    NaN or inf; training stops instead of going on with it."""


_REMEDIES = ("Lower learning_rate, keep gradient clipping on (training_args max_grad_norm > 0), train in "
             "bf16 or fp32 rather than fp16, check the data of this step; then resume from the last "
             "checkpoint (--resume) or start again.")


def all_finite(t: torch.Tensor) -> torch.Tensor:
    """Whether every element of t is finite, as a bool scalar (no host sync): min and max carry
    any NaN or inf, and one aminmax pass is ~15x faster than isfinite().all() on CPU."""
    if t.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=t.device)
    return torch.isfinite(torch.stack(torch.aminmax(t.detach()))).all()


def _on_every_process(flag: torch.Tensor) -> torch.Tensor:
    """A bool scalar that holds on every process (a MIN all-reduce when several run): a check
    raises on all of them together, not on one while the others wait in the next collective."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        flag = flag.to(torch.int32)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return flag.bool()


def _parameter_report(model) -> str:
    """Where a model's parameters stand (run only once a check has failed: a full pass). A -inf
    entry (a vocabulary mask in an LM-head bias) is not a fault; NaN and +inf are."""
    bad, largest, where = [], 0.0, None
    with torch.no_grad():
        for name, p in model.named_parameters():
            # an FSDP2 parameter is a DTensor, which cannot be boolean-indexed: read this
            # process's shard (every process reports its own)
            p = p.to_local() if hasattr(p, "to_local") else p
            if p.numel() == 0:
                continue
            low, high = torch.aminmax(p.detach())
            if bool(torch.isnan(high) | torch.isnan(low) | (high == float("inf"))):
                bad.append(name)
                continue
            finite = p[torch.isfinite(p)]
            m = float(finite.abs().max()) if finite.numel() else 0.0
            if m > largest:
                largest, where = m, name
    if bad:
        return f"{len(bad)} parameter tensor(s) hold NaN or +inf, the first {bad[0]}"
    return f"its parameters are finite (or -inf masks), the largest finite |value| {largest:.3g} (in {where})"


def diverged(what: str, step: Optional[int], model=None) -> NonFiniteLossError:
    """The error of a divergence check: what went non-finite, at which step (the Trainer's
    global_step: optimizer updates done so far), where the student's parameters stand, and what
    to do about it."""
    where = f"step {step}" if step is not None else "this step"
    updates = f" after {step} optimizer update(s)" if step is not None else ""
    state = f"; {_parameter_report(model)}{updates}" if model is not None else ""
    return NonFiniteLossError(f"training diverged at {where}: {what}{state}. {_REMEDIES}")


# --------------------------------------------------------------------------------------------
# what the loss computes
# --------------------------------------------------------------------------------------------

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
    # "attention": IVA weights the vision tokens by the teacher's instruction->vision attention
    # at iva_layer (METHOD.md); "uniform": every vision token of a sample weighs the same, the
    # control without instruction-aware weights (no attention capture, no iva_layer needed)
    iva_weighting: str = "attention"
    tpa_d: int = 4
    tpa_strategy: str = "sample"
    tpa_exclude_ground_truth: bool = True
    tpa_fraction: float = 0.25
    tpa_temperature: float = 1.0
    tpa_max_per_sample: Optional[int] = None
    tpa_forward: str = "auto"          # "prefix_cache" | "expanded" | "auto" (see DistillConfig)
    kl_pass: str = "single"            # "single": one fused KL call for every term; "per_term"
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
            iva_weighting=getattr(config, "iva_weighting", "attention"),
            tpa_d=config.tpa_d, tpa_strategy=config.tpa_strategy, tpa_fraction=config.tpa_fraction,
            tpa_temperature=config.tpa_temperature,
            tpa_exclude_ground_truth=getattr(config, "tpa_exclude_ground_truth", True),
            tpa_max_per_sample=getattr(config, "tpa_max_per_sample", None),
            tpa_forward=getattr(config, "tpa_forward", "auto"), kl_pass=getattr(config, "kl_pass", "single"),
            seed=config.seed,
            chunk_bytes=resolve_chunk_bytes(getattr(config, "kl_chunk_bytes", None), "config kl_chunk_bytes"),
            fp32_weight_grad=getattr(config, "fp32_weight_grad", True),
        )

    @property
    def divergence_options(self) -> dict:
        """Keyword options every fused KL op of the step takes: the divergence and the kernel's
        memory/time options."""
        return {"divergence": self.divergence, "beta": self.beta, "temperature": self.temperature,
                "chunk_bytes": self.chunk_bytes, "fp32_weight_grad": self.fp32_weight_grad}


def count_normalizers(batch: dict, spec: LossSpec, image_token_id: int) -> torch.Tensor:
    """float64 [3] (`NORMALIZERS`): response rows, samples with image + instruction, and TPA
    candidates of a batch (its branched steps counted as `select_branch_steps` chooses them)."""
    labels = batch["labels"]
    tokens = (labels[:, 1:] != IGNORE_INDEX).sum()
    has_image = (batch["input_ids"] == image_token_id).any(1)
    if "instruction_mask" in batch:
        has_image = has_image & batch["instruction_mask"].bool().any(1)
    images = has_image.sum()
    if spec.w_tpa > 0:
        steps = branch_count(eligible_steps(labels, batch["attention_mask"]).sum(1), spec.tpa_fraction,
                             spec.tpa_max_per_sample)
        cands = steps.sum() * spec.tpa_d
    else:
        cands = tokens * 0
    return torch.stack([tokens, images, cands]).to(torch.float64)


# --------------------------------------------------------------------------------------------
# the wrapper module
# --------------------------------------------------------------------------------------------

def lm_head(model) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(weight [V, H], bias or None) of a transformers model's LM head."""
    head = model.get_output_embeddings()
    return head.weight, getattr(head, "bias", None)


def _base(model):
    """The part of a *ForConditionalGeneration / *ForCausalLM model that returns hidden states."""
    base = getattr(model, "model", None)
    if base is None:
        raise TypeError(f"{type(model).__name__} has no .model (expected a transformers LLaVA or causal LM)")
    return base


def _dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype


@dataclass
class _Forwards:
    """Both models' final hidden states over one layout of the batch: the plain sequences, or
    TPA's expanded ones (T = L + C, the C candidate slots after the L ground-truth rows)."""

    student: torch.Tensor            # [B, T, Hs], with grad, in the student head's dtype
    teacher: Optional[torch.Tensor]  # [B, T, Ht] in the teacher head's dtype; None for SFT only
    targets: torch.Tensor            # [B, T] next-token id per row, -100 = no SFT/KD
    expanded: Optional[ExpandedBatch]
    mass: Optional[torch.Tensor]     # [B, T] teacher instruction->token attention mass (IVA)


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
        # what the ops need to know of the model family (vision tokens, position ids, image inputs)
        self.family = family_of(student, "student")
        self.image_token_id = int(image_token_id)
        self.pad_token_id = int(pad_token_id)
        self.forbidden_ids = tuple(forbidden_ids)
        self.vocab_limit = vocab_limit
        self.impl = impl
        if spec.needs_teacher and teacher is None:
            raise ValueError("a teacher is needed for w_kd, w_iva or w_tpa > 0")
        if spec.iva_weighting not in IVA_WEIGHTINGS:
            raise ValueError(f"spec.iva_weighting must be one of {list(IVA_WEIGHTINGS)}, got {spec.iva_weighting!r}")
        if spec.w_iva > 0 and spec.iva_weighting == "attention" and spec.iva_layer is None:
            raise ValueError("w_iva > 0 needs spec.iva_layer (an int; resolve 'auto' with resolve_iva_layer)")
        if teacher is not None:
            teacher.eval()
            teacher.requires_grad_(False)

    # transformers.Trainer's activation checkpointing: the newest releases call
    # activation_checkpointing_enable (gradient_checkpointing_enable is deprecated there and warns),
    # the oldest supported one (5.17) gradient_checkpointing_enable; both reach the student's
    def activation_checkpointing_enable(self, **kwargs):
        self.student.activation_checkpointing_enable(**kwargs)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, **kwargs):
        if hasattr(self.student, "activation_checkpointing_enable"):
            self.student.activation_checkpointing_enable(activation_checkpointing_kwargs=gradient_checkpointing_kwargs,
                                                         **kwargs)
        else:
            self.student.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs,
                                                       **kwargs)

    @property
    def _no_split_modules(self):
        """The student's language-model layer classes: accelerate's FSDP auto-wrap makes each one
        a unit (not the vision tower's: `align_ti.train.sharding.layer_classes`)."""
        return layer_classes(self.student)

    def _vision_in_every_backward(self, loss: torch.Tensor) -> torch.Tensor:
        """Under FSDP2, ``loss`` plus 0 x the sum of the student's vision tower and projector
        parameters: a micro-batch without images leaves them without gradients, and the unit
        that holds them must reduce the same gradients on every process (else it deadlocks)."""
        from torch.distributed.fsdp import FSDPModule

        if not isinstance(self, FSDPModule):
            return loss
        params = [p for m in vision_modules(self.student) for p in m.parameters() if p.requires_grad]
        return loss + 0.0 * sum(p.sum() for p in params) if params else loss

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Accepts the wrapper's own keys (``student.*``) or a plain student state dict (what a
        checkpoint folder holds); ``strict`` as in `nn.Module.load_state_dict` (True by default,
        so a wrong file never loads silently)."""
        if state_dict and not any(k.startswith("student.") for k in state_dict):
            state_dict = {f"student.{k}": v for k, v in state_dict.items()}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def register_zero3_heads(self) -> None:
        """Under DeepSpeed ZeRO-3, gather the student LM head when this module's forward runs
        (the ops read the weight directly, not through the head's own forward)."""
        import deepspeed  # noqa: F401  (only called when DeepSpeed is in use)

        deepspeed.zero.register_external_parameter(self, lm_head(self.student)[0])

    # ---------------------------------------------------------------------------------------
    def forward(self, input_ids, attention_mask, labels, pixel_values=None, instruction_mask=None,
                sample_ids=None, loss_divisors=None, epoch: int = 0, step: Optional[int] = None, **image_inputs):
        """``pixel_values`` and ``image_inputs``: the image inputs of the student's family (e.g.
        Qwen-VL's ``image_grid_thw``), as `align_ti.data.llava.pad_batch` collates them."""
        spec = self.spec
        images = self._images(pixel_values, image_inputs)
        # the ground truth's position ids ([3, B, L] for multimodal RoPE), one set for both models
        # (build_trainer checks that the teacher's family gives the same)
        positions = self.family.position_ids(self.student, input_ids, attention_mask, images)
        if spec.w_tpa == 0:
            fw = self._forwards(input_ids, attention_mask, labels, images, positions, instruction_mask, None)
        elif self.tpa_way() == "expanded":
            with record_function("align_ti.tpa_sample"):
                expanded = self._expand(input_ids, attention_mask, labels, images, positions, sample_ids, epoch,
                                        step)
            fw = self._forwards(input_ids, attention_mask, labels, images, positions, instruction_mask, expanded)
        else:
            fw = self._prefix_cached_forwards(input_ids, attention_mask, labels, images, positions, instruction_mask,
                                              sample_ids, epoch, step)
        vision_mask = self.family.vision_mask(self.student.config, input_ids)
        if spec.kl_pass == "single" and spec.needs_teacher:
            with record_function("align_ti.kl"):
                loss, terms = self._single_kl_pass(fw, vision_mask, loss_divisors)
        else:
            parts: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # term -> (sum, count)
            if spec.w_sft > 0 or spec.w_kd > 0:
                with record_function("align_ti.sft_kd"):
                    parts.update(self._sft_kd(fw))
            if spec.w_iva > 0:
                with record_function("align_ti.iva"):
                    parts["iva"] = self._iva(fw, vision_mask)
            if spec.w_tpa > 0:
                with record_function("align_ti.tpa_loss"):
                    parts["tpa"] = self._tpa(fw)
            loss, terms = self._combine(parts, loss_divisors, fw.student.new_zeros((), dtype=torch.float32))
        loss = self._vision_in_every_backward(loss)
        finite = {"student": all_finite(fw.student),
                  "teacher": all_finite(fw.teacher) if fw.teacher is not None
                  else fw.student.new_ones((), dtype=torch.bool)}
        return {"loss": loss, "terms": terms, "finite": finite}

    def _images(self, pixel_values, image_inputs: dict) -> dict:
        """The batch's image inputs by name (None ones dropped); a name the student's family does
        not take is an error naming it."""
        images = {k: v for k, v in {"pixel_values": pixel_values, **image_inputs}.items() if v is not None}
        unknown = sorted(set(images) - set(self.family.image_inputs))
        if unknown:
            raise TypeError(f"DistillModule.forward: unexpected batch key(s) {unknown}; a {self.family.title} "
                            f"student takes the image inputs {list(self.family.image_inputs)}")
        return images

    @staticmethod
    def _images_for(model, images: dict) -> dict:
        """``images`` as ``model``'s family takes them, floating ones in its dtype."""
        return family_of(model).model_images(images, _dtype(model))

    # ---- TPA: which way, the candidates and the expanded batch --------------------------------
    def tpa_way(self) -> str:
        """"prefix_cache" or "expanded": how this forward runs TPA's candidates (`LossSpec.tpa_forward`;
        "auto" takes the prefix cache where both models allow it). Decided per forward, since the
        Trainer may turn gradient checkpointing on after the module is built."""
        wanted = self.spec.tpa_forward
        if wanted == "expanded":
            return "expanded"
        why = prefix_cache_unsupported(self.student) or prefix_cache_unsupported(self.teacher)
        if why is None:
            return "prefix_cache"
        if wanted == "prefix_cache":
            raise ValueError(f"tpa_forward='prefix_cache' cannot run here: {why}; use tpa_forward='expanded' "
                             "(or 'auto')")
        return "expanded"

    def _candidates(self, hidden, input_ids, attention_mask, labels, sample_ids, epoch, step, position_ids=None):
        """Branched steps and d candidates each, drawn from the student's final hidden states of
        the ground truth (``hidden``, read without grad), and the expanded batch appending them."""
        spec, student = self.spec, self.student
        ws, bs = lm_head(student)
        # checked here, not with the terms: the sampler reads the states next and its own input
        # check would stop a diverged run with a message about its arguments (TPA's branch
        # selection syncs with the host anyway)
        if not bool(_on_every_process(all_finite(hidden))):
            raise diverged("the student's final hidden states hold NaN or inf (the pass that draws TPA's "
                           "candidates)", step, student)
        steps = select_branch_steps(labels, attention_mask, fraction=spec.tpa_fraction,
                                    max_per_sample=spec.tpa_max_per_sample, seed=spec.seed,
                                    sample_ids=sample_ids, epoch=epoch)
        with torch.no_grad():
            cands = sample_candidates(hidden.detach(), ws, input_ids, steps, num_candidates=spec.tpa_d,
                                      strategy=spec.tpa_strategy, temperature=spec.tpa_temperature,
                                      exclude_ground_truth=spec.tpa_exclude_ground_truth,
                                      forbidden_ids=self.forbidden_ids, vocab_limit=self.vocab_limit, seed=spec.seed,
                                      sample_ids=sample_ids, epoch=epoch, student_bias=bs,
                                      chunk_bytes=spec.chunk_bytes, attention_mask=attention_mask)
        if steps.shape[1] == 0:  # one empty slot, so that every process runs the candidates' pass
            steps = steps.new_full((steps.shape[0], 1), -1)
            cands = cands.new_zeros((steps.shape[0], 1, spec.tpa_d))
        return build_expanded_batch(input_ids, attention_mask, steps, cands, labels=labels, pad_id=self.pad_token_id,
                                    position_ids=position_ids)

    @torch.no_grad()
    def _expand(self, input_ids, attention_mask, labels, images, positions, sample_ids, epoch,
                step) -> ExpandedBatch:
        """The expanded way's candidates: drawn from a no-grad student pass over the batch."""
        h0 = _base(self.student)(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                                 use_cache=False, **self._images_for(self.student, images)).last_hidden_state
        return self._candidates(h0, input_ids, attention_mask, labels, sample_ids, epoch, step, position_ids=positions)

    def _prefix_cached_forwards(self, input_ids, attention_mask, labels, images, positions, instruction_mask,
                                sample_ids, epoch, step) -> _Forwards:
        """TPA over a cached prefix: each model runs the ground truth once, keeping its keys and
        values (the student's pass, with grad, is the training forward and the candidates are
        drawn from it), then only the candidate tokens. The rows come out as in the expanded way:
        [B, L + C], the ground truth first."""
        student, teacher = self.student, self.teacher

        with record_function("align_ti.student_forward"):
            s_prefix = ground_truth_pass(student, input_ids, attention_mask, positions,
                                         **self._images_for(student, images))
        with record_function("align_ti.tpa_sample"):
            expanded = self._candidates(s_prefix.hidden, input_ids, attention_mask, labels, sample_ids, epoch, step,
                                        position_ids=positions)
        with record_function("align_ti.student_forward"):
            hs = torch.cat([s_prefix.hidden, candidate_hidden_states(student, expanded, s_prefix)], 1)
        del s_prefix
        with torch.no_grad(), record_function("align_ti.teacher_forward"):
            def teacher_prefix():
                return ground_truth_pass(teacher, input_ids, attention_mask, positions,
                                         **self._images_for(teacher, images))

            mass = None
            if self.spec.w_iva > 0 and self.spec.iva_weighting == "attention":
                # the IRS layer's q/k of the ground-truth pass only
                t_prefix, mass = self._teacher_with_mass(teacher_prefix, instruction_mask, attention_mask)
                mass = _pad_slots(mass, expanded.total_length)
            else:
                t_prefix = teacher_prefix()
            ht = torch.cat([t_prefix.hidden, candidate_hidden_states(teacher, expanded, t_prefix)], 1)
        if self.spec.w_iva > 0 and self.spec.iva_weighting == "uniform":
            mass = _uniform_mass(self.family.vision_mask(student.config, input_ids), instruction_mask,
                                 expanded.total_length)
        return _Forwards(student=hs.to(lm_head(student)[0].dtype), teacher=ht.to(lm_head(teacher)[0].dtype),
                         targets=expanded.targets, expanded=expanded, mass=mass)

    # ---- the forwards: one per model ---------------------------------------------------------
    def _forwards(self, input_ids, attention_mask, labels, images, positions, instruction_mask,
                  expanded: Optional[ExpandedBatch]) -> _Forwards:
        """Both models over the batch (over the expanded batch with TPA), the teacher under
        no_grad and, with IVA, capturing the IRS layer's attention mass."""
        student, teacher = self.student, self.teacher

        def run(model):
            model_images = self._images_for(model, images)
            if expanded is not None:
                return expanded_hidden_states(model, expanded, **model_images)
            return _base(model)(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                                use_cache=False, **model_images).last_hidden_state

        with record_function("align_ti.student_forward"):
            hs = run(student)
        ht = mass = None
        if self.spec.needs_teacher:
            real = expanded.attention_mask if expanded is not None else attention_mask
            with torch.no_grad(), record_function("align_ti.teacher_forward"):
                if self.spec.w_iva > 0 and self.spec.iva_weighting == "attention":
                    ht, mass = self._teacher_with_mass(lambda: run(teacher), instruction_mask, real)
                else:
                    ht = run(teacher)
            if self.spec.w_iva > 0 and self.spec.iva_weighting == "uniform":
                mass = _uniform_mass(self.family.vision_mask(student.config, input_ids), instruction_mask,
                                     real.shape[1])
        # under autocast (bf16/fp16 mixed precision) the final hidden states may come out in a
        # lower dtype than the fp32 head; each hidden/weight pair must share one dtype
        hs = hs.to(lm_head(student)[0].dtype)
        if ht is not None:
            ht = ht.to(lm_head(teacher)[0].dtype)
        targets = expanded.targets if expanded is not None else next_token_targets(labels)
        return _Forwards(student=hs, teacher=ht, targets=targets, expanded=expanded, mass=mass)

    def _teacher_with_mass(self, run, instruction_mask, real_tokens):
        """Run the teacher (no grad) while capturing the IRS layer's q/k; return its final hidden
        states and the instruction->token attention mass [B, T] (0 on the candidate slots, whose
        queries are never instructions)."""
        if instruction_mask is None:
            raise ValueError("IVA needs the batch's instruction_mask (encode_example(..., return_instruction_mask=True))")
        layer = self.spec.iva_layer
        with capture_qk(self.teacher, layers=[layer], detach=True) as cap:
            ht = run()
        q, k = cap[layer]
        queries = _pad_slots(instruction_mask.bool(), real_tokens.shape[1])
        with record_function("align_ti.iva_mass"):
            # as bool: the 0/1 masks made here need no value check (a host sync on CUDA)
            mass = attention_mass(q, k, queries, real_tokens != 0, impl=self.impl)
        return ht, mass

    # ---- the terms: (sum over this micro-batch, its count) each ------------------------------
    def _sft_kd(self, fw: _Forwards) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """SFT cross-entropy and KD at every row with a target, from one student-head pass."""
        spec = self.spec
        ws, bs = lm_head(self.student)
        hs = fw.student.reshape(-1, fw.student.shape[-1])
        flat_targets = fw.targets.reshape(-1)
        rows = flat_targets != IGNORE_INDEX
        if spec.w_kd > 0:
            wt, bt = lm_head(self.teacher)
            ht = fw.teacher.reshape(-1, fw.teacher.shape[-1])
        else:  # SFT only: the student is its own (detached) teacher; KL = 0, not used
            wt, bt, ht = ws.detach(), None if bs is None else bs.detach(), hs.detach()
        kl_sum, ce_mean = fused_linear_distill(hs, ws, ht, wt, labels=flat_targets, rows=rows, reduction="sum",
                                               student_bias=bs, teacher_bias=bt, impl=self.impl,
                                               **spec.divergence_options)
        n_rows = rows.sum()
        parts = {}
        if spec.w_sft > 0:
            parts["sft"] = (ce_mean * n_rows, n_rows)
        if spec.w_kd > 0:
            parts["kd"] = (kl_sum, n_rows)
        return parts

    def _iva(self, fw: _Forwards, vision_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """IVA: the divergence at the vision rows, weighted by the teacher's attention mass (top-k
        or all), a mean per sample; counted over the samples with vision mass."""
        spec = self.spec
        ws, bs = lm_head(self.student)
        wt, bt = lm_head(self.teacher)
        vision = _pad_slots(vision_mask, fw.student.shape[1])
        mean = topk_align(fw.student, ws, fw.teacher, wt, fw.mass, vision, k=spec.iva_k, ratio=spec.iva_ratio,
                          normalize="sample", student_bias=bs, teacher_bias=bt, impl=self.impl,
                          **spec.divergence_options)
        n_samples = ((fw.mass * vision).sum(1) > 0).sum()
        return mean * n_samples, n_samples

    def _tpa(self, fw: _Forwards) -> tuple[torch.Tensor, torch.Tensor]:
        """TPA: the divergence at every candidate row of the expanded forwards."""
        ws, bs = lm_head(self.student)
        wt, bt = lm_head(self.teacher)
        total = tpa_loss(fw.student, ws, fw.teacher, wt, fw.expanded, reduction="sum", student_bias=bs,
                         teacher_bias=bt, impl=self.impl, **self.spec.divergence_options)
        return total, fw.expanded.candidate_valid.sum()

    def _single_kl_pass(self, fw: _Forwards, vision_mask: torch.Tensor, loss_divisors):
        """Every term from one fused KL call over all their rows (one pass over both LM heads, one
        weight-gradient accumulator): each row's weight folds in its term's weight and
        normaliser, so the call's KL is ``w_kd L_KD + w_iva L_IVA + w_tpa L_TPA``, and its CE,
        weighted by ``ce_weight``, adds ``w_sft L_SFT`` with its gradient folded into the
        divergence's (no CE gradient matmuls of their own); the per-row divergences it also
        returns give each term's value for the logs. The same terms and gradient as `per_term`
        (`_sft_kd`, `_iva`, `_tpa`), in one call."""
        spec = self.spec
        ws, bs = lm_head(self.student)
        wt, bt = lm_head(self.teacher)
        b_size, total = fw.targets.shape
        targets = fw.targets.reshape(-1)
        token_rows = targets != IGNORE_INDEX
        within = {}  # KL term -> its own fp32 weight of every row [B * T] (0 off its rows)
        counts = {"sft": token_rows.sum()}
        if spec.w_kd > 0:
            within["kd"], counts["kd"] = token_rows.float(), counts["sft"]
        if spec.w_iva > 0:
            vision = _pad_slots(vision_mask, total)
            within["iva"] = topk_weights(fw.mass, vision, k=spec.iva_k, ratio=spec.iva_ratio).reshape(-1)
            counts["iva"] = ((fw.mass * vision).sum(1) > 0).sum()
        if spec.w_tpa > 0:
            slots = fw.expanded.steps >= 0  # [B, C]: the filled candidate slots
            within["tpa"] = torch.cat([slots.new_zeros(b_size, fw.expanded.length), slots], 1).reshape(-1).float()
            counts["tpa"] = slots.sum()

        def divisor(term):
            if loss_divisors is None:
                return counts[term].to(torch.float32).clamp(min=1)
            return loss_divisors[_DIVISOR_OF[term]].to(torch.float32)

        denom = {term: divisor(term) for term in counts}
        weights = sum(w * (spec.weight(term) / denom[term]) for term, w in within.items())
        rows = token_rows if spec.w_sft > 0 else torch.zeros_like(token_rows)  # SFT reads its rows' CE
        for w in within.values():
            rows = rows | (w > 0)
        hs = fw.student.reshape(-1, fw.student.shape[-1])
        ht = fw.teacher.reshape(-1, fw.teacher.shape[-1])
        common = dict(rows=rows, weights=weights, reduction="sum", student_bias=bs, teacher_bias=bt,
                      impl=self.impl, row_divergence=True, **spec.divergence_options)
        terms = {}
        if spec.w_sft > 0:  # the CE's gradient folded into the divergence's: no second set of matmuls
            sft_scale = counts["sft"] / denom["sft"]  # the mean CE -> its share of the normalised sum
            loss, ce, d = fused_linear_distill(hs, ws, ht, wt, labels=targets, ce_weight=spec.w_sft * sft_scale,
                                               **common)
            terms["sft"] = ce * sft_scale
        else:
            loss, d = fused_linear_kl(hs, ws, ht, wt, **common)
        zero = torch.zeros((), dtype=d.dtype, device=d.device)
        for term, w in within.items():  # where, not w * d: a row outside the term may hold D = +inf
            terms[term] = torch.where(w > 0, w * d, zero).sum() / denom[term]
        return loss, {name: value.detach() for name, value in terms.items()}

    def _combine(self, parts: dict, loss_divisors, loss: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Each term's sum over its normaliser (the step's global count, or this micro-batch's
        own count), and the weighted total added to ``loss`` (a zero)."""
        terms = {}
        for name, (total, count) in parts.items():
            if loss_divisors is None:
                denom = count.to(torch.float32).clamp(min=1)
            else:
                denom = loss_divisors[_DIVISOR_OF[name]].to(torch.float32)
            terms[name] = total / denom
            loss = loss + self.spec.weight(name) * terms[name]
        return loss, {name: value.detach() for name, value in terms.items()}


def _uniform_mass(vision_mask: torch.Tensor, instruction_mask, total_length: int) -> torch.Tensor:
    """IVA's weights with ``iva_weighting="uniform"``: 1 on every vision token of a sample that
    has an instruction (the samples the attention weights cover too, so the normaliser is the
    same), 0 elsewhere, [B, T] fp32."""
    if instruction_mask is None:
        raise ValueError("IVA needs the batch's instruction_mask (encode_example(..., return_instruction_mask=True))")
    mass = vision_mask & instruction_mask.bool().any(1, keepdim=True)
    return _pad_slots(mass, total_length).float()


def _pad_slots(mask: torch.Tensor, total_length: int) -> torch.Tensor:
    """A [B, L] mask over the ground-truth rows, False on the candidate slots up to T rows."""
    extra = total_length - mask.shape[1]
    return mask if extra == 0 else torch.cat([mask, mask.new_zeros(mask.shape[0], extra)], 1)
