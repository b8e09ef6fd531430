"""FLOP accounting of one distillation step (issue #20): an analytic model of what an align-ti
step computes, per component, validated against `torch.utils.flop_counter.FlopCounterMode` on
real tensors, and what of it Align-TI cannot avoid.

    python -m align_ti.benchmarks.flops [--validate tiny,reduced] [--out DIR]

Counted: matrix products (2 m n k), as FlopCounterMode counts them. Elementwise work (norms,
RoPE, softmax, the KL's exp/log, AdamW) is not counted; neither is a gather or an embedding.

What a step computes (`step_flops`), per component:

- the vision towers and projectors: the student's forward and backward (the patch convolution's
  backward computes only its weight gradient: the pixels need none), the teacher's forward;
- each decoder's linear layers (q, k, v, o, the gated MLP) over its tokens: forward, and for the
  student a backward of twice that (input and weight gradients); "ground truth" (the L tokens of
  a sequence) and "candidates" (TPA's C tokens) apart;
- attention: 4 h d FLOPs per (query, key) pair forward, 2.5 times that backward (the scores
  recomputed, then four products: flash, cuDNN and the CPU's flash kernel). A causal pass over
  the ground truth computes L (L + 1) / 2 pairs with a causal kernel (``causal="computed"``:
  flash/cuDNN and the CPU's flash kernel skip the blocks above the diagonal); a dense-masked SDPA
  computes every pair of its mask's square whatever the mask allows: the expanded forward's
  [T, T], the prefix way's candidate rows [C, L + C]. ``causal="counted"`` counts the full
  square of a causal pass too, as FlopCounterMode does (the validation's convention);
- the sampling pass (``tpa_forward="expanded"``): a no-grad student forward over the ground truth
  that only draws the candidates;
- the sampling head: the student's LM head at the branched rows, to draw the candidates;
- "LM head, last row": transformers' head on one row per sample of each model call that
  returns the decoder's states (``logits_to_keep=1``), unused;
- the fused KL rows: per row the student head (2 Hs Vs), the teacher head (2 Ht V'), and the
  student's input and weight gradients (2 x 2 Hs Vs); Vs = the student's columns when the call
  also computes SFT's cross-entropy, else V'; with the cross-entropy, its own input and weight
  gradients again (2 x 2 Hs Vs) where the call keeps them apart: "per_term"'s SFT+KD call (the
  op's forward computes gradients before it knows the upstream ones of its two outputs). Rows:
  SFT+KD at the response rows, IVA at the kept vision rows, TPA at the candidate rows: one call
  for all with ``kl_pass="single"`` (the cross-entropy over Vs at every row, its gradient folded
  into the KL's: ``fused_linear_distill(ce_weight=...)``), a call per term with "per_term";
- IVA's attention mass: one teacher layer's logits of the instruction queries over the keys up to
  the last instruction token.

What Align-TI cannot avoid (`unavoidable_flops`): vanilla KD's own work (both towers, both
decoders over the ground truth with causal attention, the SFT+KD rows), plus the candidates'
own pass through both models (their linear layers, the student's backward), their attention to
their own prefix (candidate k of step t sees the t ground-truth keys before it and itself: t + 1
pairs, averaged over uniformly drawn steps), their KL rows, and IVA's rows and attention mass;
a KL row with one set of gradients (the cross-entropy's folded into the KL's, as the single pass
does). Everything else a step computes is overhead: the dense masks' extra pairs, the sampling
pass and head, the unused LM-head rows, the cross-entropy's gradients kept apart (per_term), its
columns past V' at the IVA and TPA rows (single).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace

from align_ti.ops.topk_align.selection import kept_count

KD, ALIGN_TI = "vanilla-KD", "Align-TI"
OBJECTIVES = (KD, ALIGN_TI)
PREFIX, EXPANDED = "prefix_cache", "expanded"
# an attention backward recomputes the scores (flash / cuDNN / the CPU's flash kernel), then takes
# four products: 5 of the forward's 2
ATTENTION_BACKWARD = 2.5


# ------------------------------------------------------------------------------------------
# shapes
# ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TextDims:
    """A decoder's widths (from a transformers Qwen2/Llama-like text config)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int

    @classmethod
    def from_config(cls, c) -> "TextDims":
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return cls(c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, head_dim,
                   c.intermediate_size, c.vocab_size)

    def linear(self, tokens: float) -> float:
        """Forward FLOPs of every layer's q, k, v, o and gated-MLP products over `tokens` tokens."""
        h, d = self.hidden, self.head_dim
        per_token = 2 * h * self.heads * d + 2 * h * self.kv_heads * d + 3 * h * self.ffn
        return 2 * tokens * self.layers * per_token

    def attention(self, pairs: float) -> float:
        """Forward FLOPs of every layer's attention over `pairs` (query, key) pairs: q k^T and p v."""
        return 4 * self.heads * self.head_dim * self.layers * pairs


@dataclass(frozen=True)
class VisionDims:
    """A vision tower (patch convolution, pre-norm encoder layers with full attention over one
    image's patches) and its projector into a decoder of width `out_hidden`: SigLIP with
    LLaVA's two-layer projector, or Qwen2.5-VL's tower (gated MLP) with its patch merger (MLP
    over `merge` neighbouring patches: Linear(merge h, merge h), Linear(merge h, out))."""

    hidden: int
    ffn: int
    layers: int
    patches: int
    patch_dim: int      # channels x patch x patch (x temporal patch): one convolution window
    out_hidden: int
    mlp_matrices: int = 2   # SigLIP's MLP; a gated MLP has 3
    merge: int = 0          # 0: LLaVA's projector; k > 0: a Qwen-VL patch merger over k patches

    @classmethod
    def from_llava(cls, config) -> "VisionDims":
        v = config.vision_config
        side = v.image_size // v.patch_size
        return cls(v.hidden_size, v.intermediate_size, v.num_hidden_layers, side * side,
                   v.num_channels * v.patch_size ** 2, config.text_config.hidden_size)

    @classmethod
    def from_qwen2_5_vl(cls, config, patches: int) -> "VisionDims":
        """Qwen2.5-VL's tower over one image of `patches` patches (its grid's t x h x w).
        APPROXIMATION: every layer attends over the whole image, as the benchmark's one-layer
        tower does (its layer is in ``fullatt_block_indexes``); the real tower's windowed layers
        attend within windows."""
        v = config.vision_config
        return cls(v.hidden_size, v.intermediate_size, v.depth, patches,
                   v.in_channels * v.temporal_patch_size * v.patch_size ** 2, config.text_config.hidden_size,
                   mlp_matrices=3, merge=v.spatial_merge_size ** 2)

    def parts(self) -> tuple[float, float, float]:
        """(patch convolution, linear layers and projector, attention) forward FLOPs for one image."""
        p, h, out = self.patches, self.hidden, self.out_hidden
        conv = 2 * p * self.patch_dim * h
        projector = 2 * p * (h * out + out ** 2) if not self.merge else 2 * p * (self.merge * h * h + h * out)
        linear = self.layers * 2 * p * (4 * h * h + self.mlp_matrices * h * self.ffn) + projector
        return conv, linear, self.layers * 4 * p * p * h

    def forward(self, images: int) -> float:
        return images * sum(self.parts())

    def forward_backward(self, images: int) -> float:
        conv, linear, attention = self.parts()
        # the convolution's backward: its weight gradient only (the pixels need none)
        return images * (2 * conv + 3 * linear + (1 + ATTENTION_BACKWARD) * attention)


# SigLIP-so400m-384 (the paper's tower), for the line of the report that replaces the benchmark's
# 1-layer stand-in by it
SO400M = dict(hidden=1152, ffn=4304, layers=27, patches=729, patch_dim=3 * 14 * 14)


@dataclass(frozen=True)
class ModelDims:
    text: TextDims
    vision: VisionDims

    @classmethod
    def of(cls, config, meta: dict) -> "ModelDims":
        """The dims of a train-step benchmark model (LLaVA, or Qwen2.5-VL with the batch's
        image grid from `meta`)."""
        if meta.get("family", "llava") == "qwen2_5_vl":
            vision = VisionDims.from_qwen2_5_vl(config, patches=meta["grid"] ** 2)
        else:
            vision = VisionDims.from_llava(config)
        return cls(TextDims.from_config(config.text_config), vision)

    def with_so400m(self) -> "ModelDims":
        return replace(self, vision=VisionDims(out_hidden=self.text.hidden, **SO400M))


@dataclass(frozen=True)
class StepShape:
    """One micro-batch as the train-step benchmark builds it: every sample is [template
    n_prefix][one image: n_vision][instruction][response] (no padding), and the loss options
    that set its row counts."""

    batch: int
    n_vision: int
    n_instruction: int
    n_response: int
    n_prefix: int = 2
    tpa_d: int = 4
    tpa_fraction: float = 0.25
    iva_k: int | None = None
    iva_ratio: float | None = None

    @property
    def length(self) -> int:
        return self.n_prefix + self.n_vision + self.n_instruction + self.n_response

    @property
    def first_response(self) -> int:
        return self.n_prefix + self.n_vision + self.n_instruction

    @property
    def steps(self) -> int:
        """Branched steps per sample (`align_ti.ops.branches.branch_count` of the eligible
        positions: every response token, none at t = 0 here)."""
        import torch

        from align_ti.ops.branches import branch_count

        return int(branch_count(torch.tensor([self.n_response]), self.tpa_fraction)[0])

    @property
    def candidates(self) -> int:
        return self.tpa_d * self.steps

    @property
    def iva_rows(self) -> int:
        return kept_count(self.n_vision, self.iva_k, self.iva_ratio)

    @property
    def kd_rows(self) -> int:
        """Rows with a next-token target: one per response token."""
        return self.n_response

    def candidate_prefix_pairs(self) -> float:
        """(query, key) pairs a sample's candidates need: t + 1 for a candidate of step t, with the
        steps drawn uniformly from the response positions (the expected value)."""
        mean_t = self.first_response + (self.n_response - 1) / 2
        return self.candidates * (mean_t + 1)


def causal_pairs(length: int, causal: str) -> float:
    if causal not in ("computed", "counted"):
        raise ValueError(f"causal must be 'computed' or 'counted', got {causal!r}")
    return length * (length + 1) / 2 if causal == "computed" else float(length * length)


# ------------------------------------------------------------------------------------------
# the model
# ------------------------------------------------------------------------------------------

def _kl_row(student: TextDims, teacher: TextDims, with_ce: bool, split_ce: bool) -> float:
    """One fused KL row: both heads, the student's input and weight gradients, and with
    `split_ce` those of SFT's cross-entropy again, apart (the op's forward computes the
    gradients before it knows the upstream ones of its two outputs, so it keeps two sets)."""
    vprime = min(student.vocab, teacher.vocab)
    ns = student.vocab if with_ce else vprime
    grads = 2 if (with_ce and split_ce) else 1
    return 2 * teacher.hidden * vprime + 2 * student.hidden * ns * (1 + 2 * grads)


def _models(student: ModelDims, teacher: ModelDims, b: int, gt_tokens: int, cand_tokens: int,
            gt_pairs: float, cand_pairs: float) -> dict[str, float]:
    """Both models over the ground truth (and candidates): student forward + backward, teacher
    forward."""
    s, t = student.text, teacher.text
    return {
        "vision towers": student.vision.forward_backward(b) + teacher.vision.forward(b),
        "student linear, ground truth": 3 * s.linear(gt_tokens),
        "student linear, candidates": 3 * s.linear(cand_tokens),
        "student attention, ground truth": (1 + ATTENTION_BACKWARD) * s.attention(gt_pairs),
        "student attention, candidates": (1 + ATTENTION_BACKWARD) * s.attention(cand_pairs),
        "teacher linear, ground truth": t.linear(gt_tokens),
        "teacher linear, candidates": t.linear(cand_tokens),
        "teacher attention, ground truth": t.attention(gt_pairs),
        "teacher attention, candidates": t.attention(cand_pairs),
    }


def _iva_mass(teacher: TextDims, shape: StepShape) -> float:
    """One teacher layer's logits of the instruction queries over the keys up to the last one."""
    keys = shape.first_response
    return 2 * shape.batch * teacher.heads * shape.n_instruction * keys * teacher.head_dim


def _kl_rows(student: TextDims, teacher: TextDims, shape: StepShape, objective: str, kl_pass: str,
             split_ce: bool = True) -> dict:
    b = shape.batch
    out = {"KL rows, SFT+KD": b * shape.kd_rows * _kl_row(student, teacher, True, split_ce)}
    if objective == ALIGN_TI:
        # the single pass computes SFT's cross-entropy at all its rows (its gradient folded into
        # the KL's); per_term only in SFT+KD's call
        ce = kl_pass == "single"
        out["KL rows, IVA"] = b * shape.iva_rows * _kl_row(student, teacher, ce, split_ce)
        out["KL rows, TPA"] = b * shape.candidates * _kl_row(student, teacher, ce, split_ce)
    return out


def step_flops(student: ModelDims, teacher: ModelDims, shape: StepShape, objective: str = ALIGN_TI,
               tpa_forward: str = PREFIX, kl_pass: str = "single", causal: str = "computed") -> dict[str, float]:
    """FLOPs per component of one step of `DistillModule` (forward, backward; not AdamW)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if tpa_forward not in (PREFIX, EXPANDED):
        raise ValueError(f"tpa_forward must be {PREFIX!r} or {EXPANDED!r}, got {tpa_forward!r}")
    if kl_pass not in ("single", "per_term"):
        raise ValueError(f"kl_pass must be 'single' or 'per_term', got {kl_pass!r}")
    s, t = student.text, teacher.text
    b, length = shape.batch, shape.length
    gt_pairs = b * causal_pairs(length, causal)
    if objective == KD:
        out = _models(student, teacher, b, b * length, 0, gt_pairs, 0)
    else:
        c = shape.candidates
        total = length + c
        if tpa_forward == PREFIX:  # causal ground truth, then the candidates' rows of [L + C] keys
            out = _models(student, teacher, b, b * length, b * c, gt_pairs, b * c * total)
            calls = 2
        else:  # one dense-masked pass over T = L + C, after a no-grad sampling pass
            out = _models(student, teacher, b, b * length, b * c, b * length * total, b * c * total)
            calls = 1
            out["sampling pass"] = student.vision.forward(b) + s.linear(b * length) + s.attention(gt_pairs)
        out["LM head, last row"] = calls * 2 * b * (s.vocab * s.hidden + t.vocab * t.hidden)
        out["sampling head"] = 2 * b * shape.steps * min(s.vocab, t.vocab) * s.hidden
        out["IVA mass"] = _iva_mass(t, shape)
    # the single pass folds the cross-entropy's gradient into the KL's; per_term keeps it apart
    out.update(_kl_rows(s, t, shape, objective, kl_pass, split_ce=kl_pass == "per_term"))
    return out


def unavoidable_flops(student: ModelDims, teacher: ModelDims, shape: StepShape, objective: str = ALIGN_TI,
                      causal: str = "computed") -> dict[str, float]:
    """The part of `step_flops` that Align-TI (or vanilla KD) cannot do without (module docstring)."""
    b = shape.batch
    cand_tokens = b * shape.candidates if objective == ALIGN_TI else 0
    cand_pairs = b * shape.candidate_prefix_pairs() if objective == ALIGN_TI else 0
    out = _models(student, teacher, b, b * shape.length, cand_tokens, b * causal_pairs(shape.length, causal),
                  cand_pairs)
    if objective == ALIGN_TI:
        out["IVA mass"] = _iva_mass(teacher.text, shape)
    out.update(_kl_rows(student.text, teacher.text, shape, objective, "per_term", split_ce=False))
    return out


def total(parts: dict[str, float]) -> float:
    return float(sum(parts.values()))


# ------------------------------------------------------------------------------------------
# counting on real tensors
# ------------------------------------------------------------------------------------------

def _cpu_sdpa_formulas() -> dict:
    """FlopCounterMode's own SDPA formulas for the CPU's fused SDPA ops, which it does not list
    (it knows the CUDA ones): the full s_q x s_k square of each call, masked or causal alike."""
    import torch
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten

    def forward(query, key, value, *args, out_shape=None, **kwargs):
        return fc.sdpa_flop_count(query, key, value)

    def backward(grad_out, query, key, value, *args, out_shape=None, **kwargs):
        return fc.sdpa_backward_flop_count(grad_out, query, key, value)

    return {aten._scaled_dot_product_flash_attention_for_cpu: forward,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: backward}


def _custom_op_formulas() -> dict:
    """Formulas for align_ti's custom ops (fused KL, topk_align, attention_mass and their
    backwards): FlopCounterMode sees such an op as one opaque call, so each formula runs the op's
    Python implementation again on the same tensors under a counter of its own and returns what
    that counted (the matrix products the op really executes)."""
    import torch
    from torch._library.custom_ops import OPDEFS

    import align_ti.ops.attention_mass  # noqa: F401  (registers the ops)
    import align_ti.ops.fused_kl  # noqa: F401
    import align_ti.ops.topk_align  # noqa: F401

    def rerun(impl):
        def formula(*args, out_val=None, **kwargs):
            return counted_flops(lambda: impl(*args, **kwargs))["total"]

        formula._get_raw = True  # the tensors themselves, not their shapes
        return formula

    return {getattr(torch.ops.align_ti, name.split("::")[1]): rerun(OPDEFS[name]._init_fn)
            for name in list(OPDEFS) if name.startswith("align_ti::")}


def counted_flops(fn) -> dict:
    """Run ``fn()`` under `torch.utils.flop_counter.FlopCounterMode`, with the CPU's SDPA ops
    and align_ti's custom ops counted: ``{"total": FLOPs, "by_op": {op name: FLOPs}}``."""
    from torch.utils.flop_counter import FlopCounterMode

    mapping = {**_cpu_sdpa_formulas(), **_custom_op_formulas()}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    by_op = {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return {"total": int(counter.get_total_flops()), "by_op": by_op}


# ------------------------------------------------------------------------------------------
# the report: validation at small scales, evaluation at full scale
# ------------------------------------------------------------------------------------------

# (label, objective, tpa_forward, kl_pass): the designs the report counts
DESIGNS = (("vanilla-KD", KD, PREFIX, "single"),
           ("Align-TI (default: prefix_cache, single)", ALIGN_TI, PREFIX, "single"),
           ("Align-TI prefix_cache, per_term", ALIGN_TI, PREFIX, "per_term"),
           ("Align-TI before (expanded, per_term)", ALIGN_TI, EXPANDED, "per_term"),
           ("Align-TI expanded, single", ALIGN_TI, EXPANDED, "single"))


def _benchmark_pair(scale: str, case: str, attn: str = "sdpa", build: bool = True, family: str = "llava"):
    """The train-step benchmark's (student, teacher, meta) of `family` at `scale` for `case`:
    built models, or (build=False, full scale) their configs."""
    import torch

    from . import train_step

    if not build:
        if family == "qwen2_5_vl":
            from align_ti.models.shaped import qwen2_5_vl_configs

            s, t, meta = qwen2_5_vl_configs(1)
            return s, t, train_step.qwen2_5_vl_case(meta, case)
        s, t, meta = train_step._full_configs(1, case)
        return s, t, meta | {"family": "llava"}
    return train_step.build_setup(scale, torch.device("cpu"), attn, case, family)


def shape_of(meta: dict, **loss_options) -> StepShape:
    """The `StepShape` of a train-step benchmark batch (its meta) with the benchmark's loss options."""
    options = {"tpa_d": 4, "tpa_fraction": 0.25} | loss_options
    return StepShape(batch=meta["batch"], n_vision=meta["n_vision"], n_instruction=meta["n_instruction"],
                     n_response=meta["n_response"], n_prefix=meta.get("n_prefix", 2), **options)


def validate(scale: str, case: str, log=print, family: str = "llava") -> list[dict]:
    """Each design of `DESIGNS` on the train-step benchmark's models at `scale` (one forward +
    backward of `DistillModule`, fp32, CPU): FlopCounterMode's count against the model's (with
    its convention for causal attention, the full square)."""
    import torch

    from . import train_step

    student, teacher, meta = _benchmark_pair(scale, case, family=family)
    batch = train_step.make_batch(meta, torch.device("cpu"), torch.float32)
    s, t = ModelDims.of(student.config, meta), ModelDims.of(teacher.config, meta)
    rows = []
    for label, objective, tpa_forward, kl_pass in DESIGNS:
        module = train_step.aligned_module(student, teacher, meta, objective == ALIGN_TI, tpa_forward=tpa_forward,
                                           kl_pass=kl_pass)

        def step(module=module):
            module(**batch)["loss"].backward()
            student.zero_grad(set_to_none=True)

        counted = counted_flops(step)["total"]
        model = total(step_flops(s, t, shape_of(meta), objective, tpa_forward, kl_pass, causal="counted"))
        rows.append({"scale": scale, "case": case, "family": family, "design": label, "counted": counted,
                     "model": model, "relative_error": model / counted - 1})
        log(f"  {family} {scale} {case} {label}: FlopCounterMode {counted:.4g}, model {model:.4g} "
            f"({rows[-1]['relative_error']:+.2e})")
    return rows


def evaluate(case: str, so400m: bool = False, family: str = "llava", **loss_options) -> dict:
    """Full-scale FLOPs of `case` (the train-step benchmark's pair of `family`; with `so400m`,
    LLaVA's towers SigLIP-so400m instead of its 1-layer stand-ins): every design of `DESIGNS`
    and Align-TI's unavoidable work, by component, and the ratios the targets read."""
    if so400m and family != "llava":
        raise ValueError("so400m replaces LLaVA's towers only")
    s_cfg, t_cfg, meta = _benchmark_pair("full", case, build=False, family=family)
    s, t = ModelDims.of(s_cfg, meta), ModelDims.of(t_cfg, meta)
    if so400m:
        s, t = s.with_so400m(), t.with_so400m()
    shape = shape_of(meta, **loss_options)
    parts = {label: step_flops(s, t, shape, objective, tpa_forward, kl_pass)
             for label, objective, tpa_forward, kl_pass in DESIGNS}
    parts["Align-TI unavoidable"] = unavoidable_flops(s, t, shape, ALIGN_TI)
    parts["vanilla-KD unavoidable"] = unavoidable_flops(s, t, shape, KD)
    totals = {label: total(p) for label, p in parts.items()}
    kd = totals["vanilla-KD"]
    default, before = DESIGNS[1][0], DESIGNS[3][0]
    return {"case": case, "family": family, "so400m": so400m, "loss_options": loss_options, "length": shape.length,
            "candidates_per_sample": shape.candidates, "iva_rows_per_sample": shape.iva_rows,
            "flops": totals, "by_component": parts,
            "ratios": {"Align-TI / vanilla-KD (default)": totals[default] / kd,
                       "Align-TI / vanilla-KD (before)": totals[before] / kd,
                       "Align-TI / vanilla-KD (unavoidable)": totals["Align-TI unavoidable"]
                       / totals["vanilla-KD unavoidable"],
                       "default / unavoidable": totals[default] / totals["Align-TI unavoidable"],
                       "before / unavoidable": totals[before] / totals["Align-TI unavoidable"],
                       "vanilla-KD / its unavoidable": kd / totals["vanilla-KD unavoidable"]}}


PAIRS = {"llava": "LLaVA", "qwen2_5_vl": "Qwen2.5-VL"}  # train_step.FAMILIES, as the tables name them


def _tflop(x) -> str:
    return "-" if x is None else f"{x / 1e12:.3f}"


def markdown(report: dict) -> str:
    prov = report["provenance"]
    lines = ["# FLOPs of one distillation step (issue 20)", "",
             f"torch {prov['versions'].get('torch')}, transformers {prov['versions'].get('transformers')}, commit "
             f"{prov.get('git_commit')}, {prov.get('date')}; validated on {prov['device']}. Command: "
             "`python -m align_ti.benchmarks.flops`. The model: `align_ti/benchmarks/flops.py` (its docstring "
             "says what each component counts).", ""]
    if report["validation"]:
        lines += ["## Validation: the model against FlopCounterMode on real tensors", "",
                  "One forward + backward of the trainer's `DistillModule` on the train-step benchmark's models "
                  "(fp32, CPU), counted by `torch.utils.flop_counter.FlopCounterMode` (plus the CPU's SDPA ops, "
                  "and align_ti's custom ops re-run under a counter of their own), against the model with the "
                  "counter's convention for causal attention (its full square).", "",
                  "| pair | scale | case | design | FlopCounterMode (GFLOP) | model (GFLOP) | model / counted - 1 |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {PAIRS[r.get('family', 'llava')]} | {r['scale']} | {r['case']} | {r['design']} | {r['counted'] / 1e9:.4f} | {r['model'] / 1e9:.4f} "
                  f"| {r['relative_error']:+.2e} |" for r in report["validation"]]
        lines.append("")
    lines += ["## Full scale: Align-TI / vanilla-KD, and what a step spends over its unavoidable work", "",
              "The train-step benchmark's pairs, micro-batch 2: LLaVA with a Qwen2.5-0.5B-shaped student and a "
              "Qwen2-7B-shaped teacher, and Qwen2.5-VL 3B <- 7B. Towers: the benchmark's 1-layer stand-ins (what "
              "it measures), or for LLaVA SigLIP-so400m in both models (student's trained). \"default\": prefix_cache + one KL pass; \"before\": expanded + a "
              "KL call per term. Unavoidable: vanilla KD's work, the candidates' own pass, their attention to "
              "their prefix, their KL rows and IVA.", "",
              "| case | IVA rows | towers | default / KD | before / KD | unavoidable / KD's unavoidable | "
              "default over unavoidable | before over unavoidable | KD over its unavoidable |",
              "|---|---|---|---|---|---|---|---|---|"]
    for e in report["full_scale"]:
        r = e["ratios"]
        iva = "all vision" if not e["loss_options"] else ", ".join(f"{k}={v}" for k, v in e["loss_options"].items())
        lines.append(f"| {PAIRS[e.get('family', 'llava')]} {e['case']} (L = {e['length']}, C = "
                     f"{e['candidates_per_sample']}) | {iva} "
                     f"({e['iva_rows_per_sample']}) | {'so400m' if e['so400m'] else 'stand-in'} | "
                     f"{r['Align-TI / vanilla-KD (default)']:.3f}x | {r['Align-TI / vanilla-KD (before)']:.3f}x | "
                     f"{r['Align-TI / vanilla-KD (unavoidable)']:.3f}x | {r['default / unavoidable'] - 1:+.1%} | "
                     f"{r['before / unavoidable'] - 1:+.1%} | {r['vanilla-KD / its unavoidable'] - 1:+.1%} |")
    for e in report["full_scale"]:
        if e["so400m"] or e["loss_options"]:
            continue
        labels = ["vanilla-KD", DESIGNS[1][0], DESIGNS[2][0], DESIGNS[3][0], "Align-TI unavoidable"]
        names = list(dict.fromkeys(n for label in labels for n in e["by_component"][label]))
        lines += ["", f"### {PAIRS[e.get('family', 'llava')]} {e['case']}: TFLOP per step by component (stand-in towers, IVA over all vision rows)", "",
                  "| component | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
        for n in names:
            lines.append(f"| {n} | " + " | ".join(_tflop(e["by_component"][label].get(n)) for label in labels) + " |")
        lines.append("| **total** | " + " | ".join(_tflop(e["flops"][label]) for label in labels) + " |")
    return "\n".join(lines + [""])


def main(argv=None) -> dict:
    import argparse

    import torch

    from . import harness, train_step

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--validate", default="tiny,reduced",
                   help="comma-separated scales at which to check the model against FlopCounterMode ('' for none)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "cpu"))
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads for the validation")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    scales = [s.strip() for s in args.validate.split(",") if s.strip()]
    bad = [s for s in scales if s not in ("tiny", "reduced")]
    if bad:
        p.error(f"--validate: unknown scale(s) {bad}; choose from tiny, reduced (full scale does not fit a CPU)")
    report = {"benchmark": "flops", "provenance": harness.provenance("cpu"),
              # the Qwen2.5-VL pair at tiny scale only: reduced, its 64 layers take minutes under the counter
              "validation": [row for scale in scales for family in train_step.FAMILIES for case in train_step.CASES
                             if family == "llava" or scale == "tiny"
                             for row in validate(scale, case, family=family)],
              "full_scale": [evaluate(case, so400m, family, **options) for family in train_step.FAMILIES
                             for case in train_step.CASES for options in ({}, {"iva_ratio": 0.1})
                             for so400m in ((False, True) if family == "llava" else (False,))]}
    md = markdown(report)
    harness.write_json_md(report, md, args.out, "flops")
    print(md)
    print(f"wrote {args.out}/flops.json and flops.md")
    return report


if __name__ == "__main__":
    main()
