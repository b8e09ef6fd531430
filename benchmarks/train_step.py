"""End-to-end distillation training-step benchmark (issues 8 and 20).

    python -m align_ti.benchmarks.train_step [--device cpu|cuda] [--scale full|reduced|tiny]
        [--case long-response,llava-665k] [--family llava,qwen2_5_vl] [--ways ...] [--rounds N] [--steps N] [--threads 1] [--out DIR]
    python -m align_ti.benchmarks.train_step --iva-share [--scale ...] [--steps N] [--threads 1]

Times ONE distillation step (student + teacher forwards, loss, backward, optimizer step) and
its peak memory, in several ways:

==========================  ===================================================================
way                         what runs
==========================  ===================================================================
paper-code                  both models ``attn_implementation="eager"`` and
                            ``output_attentions=True``; full fp32 ``[B, L, V]`` logits of both
                            models are materialised and every term is computed on them in plain
                            PyTorch; `align_ti.benchmarks.train_step_paper` says what it does.
align-ti                    both models ``sdpa``; the loss is `align_ti.train.loss.DistillModule`'s
                            forward with the defaults: TPA over a cached prefix
                            (``tpa_forward=auto`` -> ``prefix_cache``), one fused KL pass for every
                            term (``kl_pass=single``).
align-ti expanded+per_term  the design before issue 20 ("before"): TPA's candidates drawn by a
                            separate no-grad student pass, then one forward per model over the
                            ground truth with the candidates appended under a dense mask
                            (``tpa_forward=expanded``), and one fused KL call per term
                            (``kl_pass=per_term``).
align-ti prefix+per_term    the prefix cache with a KL call per term: the first change alone.
align-ti bf16-dw            the align-ti way with ``fp32_weight_grad=False``: the LM head's weight
                            gradient accumulates in bf16 over the row chunks, not in an fp32
                            ``[V, H]`` buffer.
align-ti flex               (CUDA) the align-ti way with both language models on FlexAttention
                            (config ``attn_implementation: flex_attention``), which takes the
                            expanded forward and skips the masked blocks of its sequence.
==========================  ===================================================================

each for two objectives:

- ``vanilla-KD``: SFT (cross-entropy) + forward KL(p_T || p_S) over the response rows.
- ``Align-TI``: vanilla-KD + IVA (teacher instruction->vision attention mass at one teacher
  layer, weighting a KL at every vision token; ``iva_k=None``, i.e. all vision tokens
  mass-weighted, the `LossSpec` default) + TPA (d = 4 candidates at 25% of the response
  positions, sampled from the student).

and for two shapes per sample, ``[template 2][vision 729][instruction][response]``
(``--case``, default both):

- ``long-response``: 32 instruction and 1285 response tokens, L = 2048 (the paper's length cap):
  TPA's candidates add 63% to the sequence;
- ``llava-665k``: like LLaVA-665K's training data, 64 instruction and 192 response tokens,
  L = 987: candidates add 19%.

The ways compute the same *kind* of terms at the same cost class; the loss values are not
identical (different candidate sampling; the paper-code way's branches share a sequence). Both
compare the first V' = min(Vs, Vt) vocabulary entries (student 151936 rows, teacher 152064).

Models (random weights, built from configs, nothing downloaded):

- ``--scale full``: LlavaForConditionalGeneration with a Qwen2.5-0.5B-shaped student
  (hidden 896, 24 layers, 14/2 heads, FFN 4864, vocab 151936) and a Qwen2-7B-shaped teacher
  (hidden 3584, 28 layers, 28/4 heads, FFN 18944, vocab 152064); micro-batch 2; bf16 weights on
  CUDA, AdamW on the student's (bf16) parameters.
  APPROXIMATION: the vision tower is a *tiny* 1-layer SigLIP (hidden 64) with 378 px / 14 px
  patches = 729 patches, standing in for SigLIP-so400m: it produces the right number of image
  tokens through the real LLaVA projector, but its own compute/memory (identical in all
  runs) is left out.
- ``--scale reduced``: the full-scale pair with every width (hidden, FFN, head_dim) and both
  vocabularies divided by 8, layer and head counts kept, 81 = 9 x 9 vision tokens and the other
  lengths scaled like them (/ 9: long-response L = 228 with 4 instruction and 141 response tokens,
  llava-665k L = 110 with 7 and 20): per token, body (~H^2 per layer) : LM head (V*H) :
  attention (L*H) costs keep the full-scale proportions, so cost *shares* carry over; runs on a CPU.
- ``--family qwen2_5_vl`` (issue 19): a Qwen2.5-VL-7B-shaped teacher and a Qwen2.5-VL-3B-shaped
  student (`align_ti.models.shaped`: vocabularies 152064 / 151936, 28 / 36 layers, multimodal
  RoPE whose 3-D position ids the trainer's family adapter computes from the image grid), the
  same cases' lengths plus its <|vision_start|> / <|vision_end|> tokens; full scale, reduced
  (/ 8, real depths) or tiny (/ 16, 2 layers). APPROXIMATION: a one-block vision tower (hidden
  64) with the real patch, merge and temporal sizes, so the real 729 image tokens. The
  paper-code way is LLaVA's (its branches share a sequence under 1-D position ids): "not
  applicable" here.
- ``--scale tiny``: the `align_ti.models.tiny` pair (36 vision tokens; long-response L = 160,
  llava-665k L = 102; fp32, CPU); proves the script runs in well under a minute; its numbers say
  nothing about the real scale.

FLOPs: next to each measured ratio the report gives the ratio of the FLOP model
(`align_ti.benchmarks.flops`, validated against FlopCounterMode) for the same designs and
shapes, and for Align-TI / vanilla-KD the ratio of Align-TI's unavoidable work.

``--iva-share`` (issue 5): the IVA share of a vanilla-KD step instead (`align_ti.benchmarks.train_step_iva`).

Sections: `DistillModule.forward` names its steps with ``torch.profiler.record_function``
ranges (`align_ti.train.loss.SECTIONS`). After timing, each align-ti way runs one more step
under torch.profiler and reports the time of each range (`harness.section_times`: CPU time, or
on CUDA the device time of the kernels launched inside it); a range that recorded nothing is
an error, never a zero.

Timing: the ways that share an attention implementation share one pair of models and take
turns: ``--rounds`` rounds of ``--steps`` steps of every (way, objective), in alternating order
(A B C, C B A, ...), after ``--warmup`` steps of each, so that a slow spell of a shared machine
falls on all of them alike. A time is the median of the round medians, by the wall clock (CUDA:
synchronised) and by process CPU time (meaningful on a CPU with ``--threads 1``). Peak memory:
CUDA ``max_memory_allocated`` during each (way, objective)'s steps (models + optimizer state
included); CPU: peak RSS sampled by `harness.RssSampler` during them (the process's, so with the
other ways' models and buffers still mapped: an upper bound). An out-of-memory run is reported
as such instead of stopping the script.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time

import torch

from align_ti.constants import IGNORE_INDEX

from . import flops, harness
from .train_step_iva import main_iva_share
from .train_step_paper import paper_step_fn
from .train_step_report import fmt, markdown

REDUCED_DIVISOR = 8  # --scale reduced: full-scale widths and vocabularies / 8
# tokens per sample after [template 2][vision]: (instruction, response), at full and tiny scale
CASES = {"long-response": (32, 1285), "llava-665k": (64, 192)}
TINY_CASES = {"long-response": (32, 90), "llava-665k": (16, 48)}
N_PREFIX = 2
# the model pairs (``--family``): LLaVA with a Qwen2-7B-shaped teacher and a Qwen2.5-0.5B-shaped
# student, and Qwen2.5-VL 7B -> 3B (`align_ti.models.shaped`: multimodal RoPE, unequal vocabularies)
FAMILIES = ("llava", "qwen2_5_vl")
FULL_VISION = 729  # SigLIP-so400m-384: 27 x 27 patches


def _check_case(case: str) -> None:
    if case not in CASES:
        raise ValueError(f"case must be one of {list(CASES)}, got {case!r}")


def case_lengths(case: str, n_vision: int) -> dict:
    """n_instruction, n_response and length of a sample of `case` with `n_vision` vision tokens:
    the full-scale lengths, or (fewer vision tokens) every length scaled like the vision tokens,
    the response taking what rounding leaves (the vision share of the sequence stays)."""
    _check_case(case)
    n_instruction, n_response = CASES[case]
    if n_vision != FULL_VISION:
        scale = n_vision / FULL_VISION
        length = round((N_PREFIX + FULL_VISION + n_instruction + n_response) * scale)
        n_instruction = max(1, round(n_instruction * scale))
        n_response = length - N_PREFIX - n_vision - n_instruction
    return dict(n_instruction=n_instruction, n_response=n_response,
                length=N_PREFIX + n_vision + n_instruction + n_response)


# ------------------------------------------------------------------------------------------
# models and batch
# ------------------------------------------------------------------------------------------

def _full_configs(div: int = 1, case: str = "long-response"):
    """The full-scale pair, or (``div`` > 1) the same pair with every width and the vocabularies
    divided by ``div`` (layer and head counts kept) and the sequence lengths scaled like the
    vision tokens (`case_lengths`).

    Why that keeps the cost shares: per token, a decoder layer costs ~H^2 and an LM head V*H, so
    dividing H and V by the same factor keeps every body : head ratio (student, teacher, both
    heads) with the layer counts unchanged; attention costs L*H per token, so L shrinks with H;
    and the vision / instruction / response fractions of the sequence stay the same.
    """
    from transformers import LlavaConfig, Qwen2Config, SiglipVisionConfig

    image_token_id, pad_id, eos_id = 151655, 151643, 151645
    # reduced vocabularies keep the special ids below the vocabulary size
    if div > 1:
        image_token_id, pad_id, eos_id = (151936 // div) - 3, (151936 // div) - 2, (151936 // div) - 1
    n_side = max(2, int((FULL_VISION / div) ** 0.5))  # 27 x 27 patches; div 8: 9 x 9
    n_vision = n_side * n_side

    def text(**kw):
        return Qwen2Config(max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False,
                           pad_token_id=pad_id, eos_token_id=eos_id, bos_token_id=None,
                           rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, **kw)

    def llava(text_cfg):
        vision = SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                    num_attention_heads=4, image_size=14 * n_side, patch_size=14,
                                    vision_use_head=False)
        return LlavaConfig(vision_config=vision, text_config=text_cfg, image_token_index=image_token_id,
                           image_seq_length=n_vision, vision_feature_select_strategy="full",
                           vision_feature_layer=-1, projector_hidden_act="gelu", tie_word_embeddings=False)

    student = llava(text(vocab_size=151936 // div, hidden_size=896 // div, intermediate_size=4864 // div,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         head_dim=64 // div))
    teacher = llava(text(vocab_size=152064 // div, hidden_size=3584 // div, intermediate_size=18944 // div,
                         num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                         head_dim=128 // div))
    return student, teacher, dict(image_token_id=image_token_id, pad_id=pad_id, batch=2, n_vision=n_vision,
                                  image_size=14 * n_side, iva_layer=14, token_low=1000 // div,
                                  token_high=150000 // div, divisor=div, case=case,
                                  **case_lengths(case, n_vision))


def _qwen2_5_vl_setup(scale: str, device: torch.device, attn, case: str):
    """The Qwen2.5-VL 7B -> 3B pair (`align_ti.models.shaped`) with `case`'s lengths: full scale,
    reduced (widths, vocabularies and lengths / 8, real depths) or tiny (/ 16, 2 layers each)."""
    from align_ti.models.shaped import qwen2_5_vl_pair

    divisor = {"full": 1, "reduced": REDUCED_DIVISOR, "tiny": 16}[scale]
    dtype = torch.bfloat16 if device.type == "cuda" and scale != "tiny" else torch.float32
    student, teacher, meta = qwen2_5_vl_pair(divisor, device, dtype, attn, num_layers=2 if scale == "tiny" else None)
    return student, teacher, qwen2_5_vl_case(meta, case)


def qwen2_5_vl_case(meta: dict, case: str) -> dict:
    """`align_ti.models.shaped`'s meta of the Qwen2.5-VL pair with `case`'s lengths."""
    lengths = case_lengths(case, meta["n_vision"])
    # its template: [2][<|vision_start|>][vision][<|vision_end|>]: two tokens more before the instruction
    return meta | dict(case=case, n_prefix=N_PREFIX + 2, n_instruction=lengths["n_instruction"],
                       n_response=lengths["n_response"], length=lengths["length"] + 2)


def build_setup(scale: str, device: torch.device, attn: str, case: str = "long-response", family: str = "llava"):
    """(student, teacher, meta) of `family` (`FAMILIES`) with the given attention implementation
    (FlexAttention: for the language models only, as the trainer does; the unmasked vision
    tower keeps sdpa)."""
    from transformers import LlavaForConditionalGeneration

    from align_ti.train.data import language_model_attention

    _check_case(case)
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {list(FAMILIES)}, got {family!r}")
    if attn == "flex_attention":
        attn = language_model_attention(attn)
    if family == "qwen2_5_vl":  # built on `device`, the student training, the teacher frozen
        return _qwen2_5_vl_setup(scale, device, attn, case)

    if scale == "tiny":
        from align_ti.models.tiny import IMAGE_SIZE, IMAGE_TOKEN_ID, PAD_TOKEN_ID, build_tiny_llava

        student = build_tiny_llava("student", seed=0, attn_implementation=attn)
        teacher = build_tiny_llava("teacher", seed=1, attn_implementation=attn)
        n_vision = student.config.image_seq_length
        n_instruction, n_response = TINY_CASES[case]
        meta = dict(image_token_id=IMAGE_TOKEN_ID, pad_id=PAD_TOKEN_ID, batch=2, n_vision=n_vision,
                    n_instruction=n_instruction, n_response=n_response,
                    length=N_PREFIX + n_vision + n_instruction + n_response, image_size=IMAGE_SIZE,
                    iva_layer=2, token_low=64, token_high=1000, case=case, family="llava")
    else:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        s_cfg, t_cfg, meta = _full_configs(REDUCED_DIVISOR if scale == "reduced" else 1, case)
        meta["family"] = "llava"
        # built on the target device: a 7B-shaped teacher's random init takes tens of seconds
        # on a CPU and well under one on a GPU (a lent GPU's time is short)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device:
            torch.manual_seed(0)
            student = LlavaForConditionalGeneration._from_config(s_cfg, attn_implementation=attn, dtype=dtype)
            torch.manual_seed(1)
            teacher = LlavaForConditionalGeneration._from_config(t_cfg, attn_implementation=attn, dtype=dtype)
    student.to(device).train()
    teacher.to(device).eval().requires_grad_(False)
    return student, teacher, meta


def make_batch(meta: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """[prefix 2][vision n_vision][instruction n_instruction][response n_response] per sample, seeded
    (Qwen2.5-VL: `align_ti.models.shaped.qwen2_5_vl_batch`, its vision tokens between
    <|vision_start|> and <|vision_end|>, with its image grid)."""
    if meta.get("family") == "qwen2_5_vl":
        from align_ti.models.shaped import qwen2_5_vl_batch

        return qwen2_5_vl_batch(meta, device, dtype)
    g = torch.Generator().manual_seed(1234)
    b, length, nv = meta["batch"], meta["length"], meta["n_vision"]
    ids = torch.randint(meta["token_low"], meta["token_high"], (b, length), generator=g)
    ids[:, N_PREFIX:N_PREFIX + nv] = meta["image_token_id"]
    instr_end = N_PREFIX + nv + meta["n_instruction"]
    instruction_mask = torch.zeros(b, length, dtype=torch.long)
    instruction_mask[:, N_PREFIX + nv:instr_end] = 1
    labels = ids.clone()
    labels[:, :instr_end] = IGNORE_INDEX
    pixel_values = torch.randn(b, 3, meta["image_size"], meta["image_size"], generator=g)
    return {
        "input_ids": ids.to(device), "attention_mask": torch.ones(b, length, dtype=torch.long, device=device),
        "labels": labels.to(device), "instruction_mask": instruction_mask.to(device),
        "pixel_values": pixel_values.to(device, dtype),
    }


# ------------------------------------------------------------------------------------------
# the ways
# ------------------------------------------------------------------------------------------

BEFORE = "align-ti expanded+per_term"        # the design before issue 20
PREFIX_PER_TERM = "align-ti prefix+per_term"  # the prefix cache alone
BF16_DW = "align-ti bf16-dw"                  # fp32_weight_grad=False
FLEX = "align-ti flex"                        # on FlexAttention
# the LossSpec options of each align-ti way (the rest: LossSpec's defaults)
WAY_OPTIONS = {
    "align-ti": {},
    BEFORE: dict(tpa_forward="expanded", kl_pass="per_term"),
    PREFIX_PER_TERM: dict(tpa_forward="prefix_cache", kl_pass="per_term"),
    BF16_DW: dict(fp32_weight_grad=False),
    FLEX: {},
}
WAYS = ("paper-code", *WAY_OPTIONS)
DEFAULT_WAYS = ("paper-code", "align-ti", BEFORE, BF16_DW)
OBJECTIVES = (flops.KD, flops.ALIGN_TI)


def attention_of(way: str) -> str:
    return {"paper-code": "eager", FLEX: "flex_attention"}.get(way, "sdpa")


def _distill_module(student, teacher, meta, spec):
    """The trainer's loss module over the benchmark's models (the batch's image and pad ids
    never become TPA candidates; candidates come from the shared vocabulary V')."""
    from align_ti.train.loss import DistillModule

    vprime = min(student.config.text_config.vocab_size, teacher.config.text_config.vocab_size)
    return DistillModule(student, teacher, spec, image_token_id=meta["image_token_id"],
                         pad_token_id=meta["pad_id"], forbidden_ids=(meta["image_token_id"], meta["pad_id"]),
                         vocab_limit=vprime)


def aligned_module(student, teacher, meta, align_ti: bool, **options):
    """The `DistillModule` of an align-ti way (`WAY_OPTIONS`) for one objective."""
    from align_ti.train.loss import LossSpec

    spec = LossSpec(w_sft=1.0, w_kd=1.0, w_iva=1.0 if align_ti else 0.0, w_tpa=1.0 if align_ti else 0.0,
                    iva_layer=meta["iva_layer"], tpa_d=4, tpa_fraction=0.25, **options)
    return _distill_module(student, teacher, meta, spec)


def model_flops(student, teacher, meta: dict, way: str, objective: str, module) -> dict | None:
    """The FLOP model's count of one step of an align-ti way's `module` (a DistillModule): what
    it computes and what of that is unavoidable. None for the ways the model does not describe:
    the paper-code way, and FlexAttention (which skips masked blocks)."""
    if module is None or attention_of(way) != "sdpa":
        return None
    s, t = flops.ModelDims.of(student.config, meta), flops.ModelDims.of(teacher.config, meta)
    spec = module.spec
    shape = flops.StepShape(batch=meta["batch"], n_vision=meta["n_vision"], n_instruction=meta["n_instruction"],
                            n_response=meta["n_response"], n_prefix=meta.get("n_prefix", N_PREFIX), tpa_d=spec.tpa_d,
                            tpa_fraction=spec.tpa_fraction, iva_k=spec.iva_k, iva_ratio=spec.iva_ratio)
    tpa_forward = module.tpa_way() if objective == flops.ALIGN_TI else flops.PREFIX
    spent = flops.step_flops(s, t, shape, objective, tpa_forward, spec.kl_pass)
    return {"tpa_forward": tpa_forward, "kl_pass": spec.kl_pass, "flops": flops.total(spent),
            "unavoidable_flops": flops.total(flops.unavoidable_flops(s, t, shape, objective)),
            "flops_by_component": spent}


# ------------------------------------------------------------------------------------------
# measuring
# ------------------------------------------------------------------------------------------


def expected_sections(objective: str, kl_pass: str = "single") -> tuple[str, ...]:
    """The record_function ranges of `DistillModule.forward` an align-ti step of `objective`
    must record (vanilla KD: the two forwards and the KL ranges; Align-TI: every one)."""
    from align_ti.train.loss import PER_TERM_SECTIONS, SECTIONS, SINGLE_PASS_SECTIONS

    if objective == flops.ALIGN_TI:
        return SECTIONS + (SINGLE_PASS_SECTIONS if kl_pass == "single" else PER_TERM_SECTIONS)
    kl = SINGLE_PASS_SECTIONS if kl_pass == "single" else ("align_ti.sft_kd",)
    return ("align_ti.student_forward", "align_ti.teacher_forward") + kl


class _Timed:
    """One (way, objective) of a group: its step function and what its steps measured."""

    def __init__(self, way: str, objective: str, fn, module=None):
        self.way, self.objective, self.fn, self.module = way, objective, fn, module
        self.wall, self.cpu, self.losses, self.peak = [], [], [], 0  # wall / cpu: a list per round
        self.error = None

    def record(self, meta: dict) -> dict:
        rec = {"way": self.way, "objective": self.objective, "attn_implementation": attention_of(self.way),
               "case": meta["case"], "family": meta.get("family", "llava")}
        if self.error is not None:
            return rec | self.error
        rounds = [statistics.median(r) for r in self.wall if r]
        cpu_rounds = [statistics.median(r) for r in self.cpu if r]
        if not rounds:
            return rec | {"status": "not measured"}
        return rec | {
            "status": "ok", "step_s_median": statistics.median(rounds), "step_s_round_medians": rounds,
            "step_s_all": [t for r in self.wall for t in r], "cpu_s_median": statistics.median(cpu_rounds),
            "cpu_s_round_medians": cpu_rounds, "peak_mem_bytes": int(self.peak),
            "peak_mem_gib": self.peak / 2 ** 30, "loss": self.losses[-1] if self.losses else None}


def _fail(e: BaseException) -> dict:
    status = "OOM" if isinstance(e, torch.OutOfMemoryError) else f"failed: {type(e).__name__}"
    return {"status": status, "error": str(e).splitlines()[0][:300] if str(e) else ""}


def _group_steps(ways, student, teacher, batch, meta, device) -> list[_Timed]:
    """A `_Timed` per (way, objective) of ways that share the models."""
    timed = []
    for way in ways:
        for objective in OBJECTIVES:
            align = objective == flops.ALIGN_TI
            if way == "paper-code":
                item = _Timed(way, objective, None)
                if meta.get("family", "llava") == "llava":
                    item.fn = paper_step_fn(student, teacher, batch, meta, align)
                else:  # its branches share one sequence under 1-D position ids
                    item.error = {"status": "not applicable",
                                  "error": "the paper-code way is written for LLaVA (1-D position ids)"}
                timed.append(item)
                continue
            module = aligned_module(student, teacher, meta, align, **WAY_OPTIONS[way])

            def fn(module=module):
                out = module(**batch)
                out["loss"].backward()
                return out["loss"].detach()

            timed.append(_Timed(way, objective, fn, module))
    return timed


def _run_steps(item: _Timed, opt, device, steps: int, round_index: int | None) -> None:
    """`steps` steps of one (way, objective); timed into its round `round_index` (None: warm-up)."""
    def step():
        loss = item.fn()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    if round_index is None:
        for _ in range(steps):
            step()
        return
    wall, cpu = [], []
    harness.release_memory()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with harness.RssSampler() if device.type == "cpu" else contextlib.nullcontext() as rss:
        for _ in range(steps):
            harness.sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            item.losses.append(float(step()))
            harness.sync(device)
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else rss.peak
    item.peak = max(item.peak, peak)
    item.wall.append(wall)
    item.cpu.append(cpu)


def measure_group(ways, scale: str, case: str, device: torch.device, warmup: int, steps: int, rounds: int,
                  profile: bool = False, log=print, on_round=None, family: str = "llava") -> list[dict]:
    """Every objective of `ways` (which share one attention implementation) on one pair of
    models, the (way, objective)s taking turns for `rounds` rounds of `steps` steps; a record
    per (way, objective). `on_round(records)` after each round (partial reports)."""
    harness.release_memory()
    student = teacher = opt = timed = None
    meta = {"case": case, "family": family}
    try:
        student, teacher, meta = build_setup(scale, device, attention_of(ways[0]), case, family)
        batch = make_batch(meta, device, next(student.parameters()).dtype)
        opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-5)
        timed = _group_steps(ways, student, teacher, batch, meta, device)
    except Exception as e:  # noqa: BLE001  (the models do not fit or cannot be built: every way says so)
        student = teacher = opt = timed = None
        _release(device)
        return [{"way": w, "objective": o, "attn_implementation": attention_of(w), "case": case, "family": family}
                | _fail(e) for w in ways for o in OBJECTIVES]

    def run(item, round_index, n):
        if item.error is None:
            try:
                _run_steps(item, opt, device, n, round_index)
            except Exception as e:  # noqa: BLE001  (reported; the other ways go on)
                item.error = _fail(e)
                opt.zero_grad(set_to_none=True)
                _release(device)

    for item in timed:
        run(item, None, warmup)
    for r in range(rounds):
        for item in (timed if r % 2 == 0 else timed[::-1]):
            run(item, r, steps)
        log(f"  {case} round {r + 1}/{rounds}: " + ", ".join(
            f"{it.way} {it.objective} {fmt(it.wall[-1] and statistics.median(it.wall[-1]))} s"
            f" (cpu {fmt(it.cpu[-1] and statistics.median(it.cpu[-1]))} s)"
            for it in timed if it.error is None))
        if on_round is not None:
            on_round([it.record(meta) for it in timed])
    records = []
    for item in timed:
        rec = item.record(meta)
        if rec["status"] == "ok" and item.module is not None:
            try:  # where the step's time goes, by the trainer's ranges (one more step)
                prof = harness.section_times(lambda it=item: _run_steps(it, opt, device, 1, None), device,
                                             expected_sections(item.objective, item.module.spec.kl_pass))
                rec.update(sections_s=prof["sections_s"], profiled_step_s=prof["step_s"])
                if profile and device.type == "cuda":  # where the GPU time goes, and where it waits
                    rec["profile_top"] = harness.profile_top(item.fn, top=15)
                    opt.zero_grad(set_to_none=True)
                    rec["host_syncs"] = harness.host_syncs(item.fn)
                    opt.zero_grad(set_to_none=True)
            except Exception as e:  # noqa: BLE001
                rec.update(_fail(e))
            rec["model_flops"] = model_flops(student, teacher, meta, item.way, item.objective, item.module)
        if rec["status"] == "ok":
            rec.update(batch=meta["batch"], length=meta["length"], n_vision=meta["n_vision"],
                       n_instruction=meta["n_instruction"], response_tokens=meta["n_response"],
                       dtype=str(next(student.parameters()).dtype))
        records.append(rec)
    student = teacher = opt = timed = batch = None  # the models go before the next group's
    _release(device)
    return records


def _release(device: torch.device) -> None:
    harness.release_memory()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def attention_groups(ways) -> list[list[str]]:
    """The ways grouped by attention implementation (a group shares one pair of models), in the
    order of their first appearance."""
    groups: dict[str, list[str]] = {}
    for way in ways:
        groups.setdefault(attention_of(way), []).append(way)
    return list(groups.values())


def _ratio(a, b, key):
    if a.get("status") == "ok" and b.get("status") == "ok" and a.get(key) and b.get(key):
        return a[key] / b[key]
    return None


def _flop_ratio(a, b, key="flops"):
    fa, fb = a.get("model_flops"), b.get("model_flops")
    return fa[key] / fb[key] if fa and fb else None


def _compare(a, b, extra_mem: bool = True, unavoidable: bool = False) -> dict:
    """Step a against step b: time (wall, process CPU), FLOP model and memory ratios (and a's
    extra memory in GiB); with `unavoidable`, the ratio of their unavoidable FLOPs too."""
    out = {"time_ratio": _ratio(a, b, "step_s_median"), "cpu_time_ratio": _ratio(a, b, "cpu_s_median"),
           "flop_ratio": _flop_ratio(a, b)}
    if unavoidable:
        out["unavoidable_flop_ratio"] = _flop_ratio(a, b, "unavoidable_flops")
    if extra_mem:
        both_ok = a.get("status") == b.get("status") == "ok"
        out["extra_mem_gib"] = (a["peak_mem_gib"] - b["peak_mem_gib"]) if both_ok else None
    out["mem_ratio"] = _ratio(a, b, "peak_mem_bytes")
    return out


def summarize(results: list[dict]) -> dict:
    """The comparisons of one case's results; pairs not measured (yet) are left out."""
    by = {(r["way"], r["objective"]): r for r in results}
    kd, ti = OBJECTIVES
    pairs = [(f"{way}: Align-TI / vanilla-KD", (way, ti), (way, kd), True, True) for way in WAYS]
    pairs += [(f"{obj}: align-ti / paper-code", ("align-ti", obj), ("paper-code", obj), False, False)
              for obj in OBJECTIVES]
    pairs += [(f"{obj}: align-ti / {before}", ("align-ti", obj), (before, obj), True, False)
              for before in (BEFORE, PREFIX_PER_TERM) for obj in OBJECTIVES]
    pairs += [(f"{obj}: {variant} / align-ti", (variant, obj), ("align-ti", obj), True, False)
              for variant in (BF16_DW, FLEX) for obj in OBJECTIVES]
    return {label: _compare(by[num], by[den], extra, unavoidable) for label, num, den, extra, unavoidable in pairs
            if num in by and den in by}


def _parse_list(p, flag: str, value: str, allowed) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [v for v in items if v not in allowed]
    if unknown or not items:
        p.error(f"{flag}: unknown {unknown}; choose from {list(allowed)}")
    return items


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--scale", choices=("full", "reduced", "tiny"), default=None,
                   help="default: full on cuda, tiny on cpu (reduced: full / %d, see _full_configs)" % REDUCED_DIVISOR)
    p.add_argument("--case", default=",".join(CASES),
                   help=f"comma-separated shapes to measure, in order, from {', '.join(CASES)}")
    p.add_argument("--family", default=",".join(FAMILIES),
                   help=f"comma-separated model pairs, from {', '.join(FAMILIES)} (each measured at every case)")
    p.add_argument("--iva-share", action="store_true",
                   help="instead of the ways: vanilla KD vs vanilla KD + IVA (align-ti), alternating "
                        "steps, and the IVA share of the step; writes train_step-iva_share.{json,md}")
    p.add_argument("--out", default=None, help="default: benchmarks/results/<device>/")
    p.add_argument("--ways", default=",".join(DEFAULT_WAYS),
                   help=f"comma-separated ways to measure, from {', '.join(WAYS)} (ways with the same attention "
                        "take turns on one pair of models)")
    p.add_argument("--stem", default="train_step", help="results file name (without .json/.md)")
    p.add_argument("--profile", action="store_true",
                   help="CUDA: after timing, profile one more step of each way (top ops by GPU time)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3, help="steps per (way, objective) per round")
    p.add_argument("--rounds", type=int, default=1,
                   help="rounds in which the (way, objective)s take turns (a time: the median of round medians)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's). 1 makes process CPU time a load-proof "
                        "measure on a shared machine (no OpenMP spin-waiting for preempted threads)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    scale = args.scale or ("full" if args.device == "cuda" else "tiny")
    device = torch.device(args.device)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", args.device)
    torch.manual_seed(0)
    if args.iva_share:
        return main_iva_share(args, scale, device, out)
    if args.steps < 1 or args.rounds < 1 or args.warmup < 0:
        p.error(f"--steps and --rounds must be >= 1 and --warmup >= 0, got {args.steps}, {args.rounds}, "
                f"{args.warmup}")
    ways = _parse_list(p, "--ways", args.ways, WAYS)
    cases = _parse_list(p, "--case", args.case, CASES)
    families = _parse_list(p, "--family", args.family, FAMILIES)
    if FLEX in ways and args.device != "cuda":
        p.error(f"--ways: {FLEX!r} needs --device cuda (FlexAttention has no backward on CPU)")
    report = {"benchmark": "train_step", "device_type": args.device, "scale": scale, "warmup": args.warmup,
              "steps": args.steps,
              "rounds": args.rounds, "torch_threads": torch.get_num_threads(),
              "memory_metric": ("torch.cuda.max_memory_allocated" if device.type == "cuda"
                                else "peak sampled RSS (process)"),
              "provenance": harness.provenance(args.device), "cases": []}

    def write():
        for entry in report["cases"]:
            entry["summary"] = summarize(entry["results"])
        report["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
        harness.write_json_md(report, markdown(report), out, args.stem)

    t_start = time.perf_counter()
    for family, case in ((f, c) for f in families for c in cases):
        entry = {"case": case, "family": family, "results": []}
        report["cases"].append(entry)
        for group in attention_groups(ways):
            done = list(entry["results"])
            t0 = time.perf_counter()

            def on_round(partial, done=done, entry=entry):  # so a run stopped by a time limit keeps them
                entry["results"] = done + partial
                write()

            entry["results"] = done + measure_group(group, scale, case, device, args.warmup, args.steps,
                                                    args.rounds, profile=args.profile, on_round=on_round,
                                                    family=family)
            for r in entry["results"][len(done):]:
                print(f"{family:>10} {case:>13} {r['way']:>26} {r['objective']:>10}: {r['status']:>3}  step "
                      f"{fmt(r.get('step_s_median'))} s  cpu {fmt(r.get('cpu_s_median'))} s  peak "
                      f"{fmt(r.get('peak_mem_gib'), '{:.3f}')} GiB", flush=True)
            print(f"  ({', '.join(group)}: {time.perf_counter() - t0:.1f} s)", flush=True)
            write()
    report["wall_s"] = time.perf_counter() - t_start
    write()
    print(markdown(report))
    print(f"wrote {out}/{args.stem}.json and {args.stem}.md")
    return report


if __name__ == "__main__":
    main()
