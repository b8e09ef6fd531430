"""Options and input checks of the vocabulary-divergence ops (`fused_linear_kl`,
`fused_linear_distill`, `fused_kl`; `topk_align` shares them).

Every check raises a one-line TypeError / ValueError naming the argument (align_ti.validation).
The reference (align_ti.reference.fused_kl) checks nothing: bad input is the ops' business.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from align_ti.constants import DIVERGENCES, IGNORE_INDEX
from align_ti.validation import (
    check_choice,
    check_dim,
    check_finite_nonnegative,
    check_index_range,
    check_open_unit,
    check_positive,
    check_same_device,
    check_same_dtype,
    check_tensor,
)

REDUCTIONS = ("mean", "sum", "none")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: The kernels' DIVERGENCE constexpr and the native op's div_code.
DIVERGENCE_CODES = {"forward": 0, "reverse": 1, "jsd": 2}

# temperature and 1 / temperature both normal float32 numbers (the kernels scale in fp32)
_TEMPERATURE_RANGE = (1e-37, 1e37)


@dataclass(frozen=True)
class KLOptions:
    """The divergence options of every vocabulary-divergence op, validated once."""

    divergence: str = "forward"
    beta: float = 0.5
    temperature: float = 1.0
    reduction: str = "mean"

    def __post_init__(self):
        check_choice("divergence", self.divergence, DIVERGENCES)
        check_choice("reduction", self.reduction, REDUCTIONS)
        check_positive("temperature", self.temperature)
        if not _TEMPERATURE_RANGE[0] <= self.temperature <= _TEMPERATURE_RANGE[1]:
            raise ValueError(f"temperature must be in [{_TEMPERATURE_RANGE[0]:.0e}, "
                             f"{_TEMPERATURE_RANGE[1]:.0e}] (the kernels scale by 1 / temperature in "
                             f"float32), got {self.temperature!r}")
        if self.divergence == "jsd":
            check_open_unit("beta", self.beta)

    @property
    def code(self) -> int:
        return DIVERGENCE_CODES[self.divergence]


@dataclass(frozen=True)
class FusedKLOptions:
    """The resolved non-tensor options of one call: what the drivers take, and (`op_kwargs`)
    the last arguments of every custom op of the fused KL and of topk_align."""

    kl: KLOptions
    vocab_size: int      # V', already resolved (`resolve_vocab_size`)
    impl: str            # "torch" or "triton" (resolved from "auto")
    chunk_bytes: int = 0  # the row-chunk budget; 0 = align_ti.ops.heuristics decides

    def op_kwargs(self) -> dict:
        """The options as the ops' schemas name them (their last arguments, in this order)."""
        k = self.kl
        return dict(divergence=k.divergence, beta=float(k.beta), temperature=float(k.temperature),
                    reduction=k.reduction, vocab_size=int(self.vocab_size), impl=self.impl,
                    chunk_bytes=int(self.chunk_bytes))

    @classmethod
    def from_op_args(cls, divergence, beta, temperature, reduction, vocab_size, impl, chunk_bytes):
        """The inverse of `op_kwargs` (positional in schema order, or by name)."""
        return cls(KLOptions(divergence, beta, temperature, reduction), vocab_size, impl, chunk_bytes)


def resolve_vocab_size(vocab_size, vs: int, vt: int) -> int:
    """V' = min(Vs, Vt) by default; an explicit value must fit both heads."""
    if min(vs, vt) == 0:
        raise ValueError(f"the heads must have at least one vocabulary row: the student has {vs}, "
                         f"the teacher {vt} (student_weight / teacher_weight, or the logits' last dim)")
    if vocab_size is None:
        return min(vs, vt)
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= 0:
        raise ValueError(f"vocab_size must be a positive int or None, got {vocab_size!r}")
    if vocab_size > min(vs, vt):
        raise ValueError(
            f"vocab_size={vocab_size} is larger than a head: the student has {vs} rows, "
            f"the teacher {vt}"
        )
    return vocab_size


def check_head(prefix: str, hidden, weight, bias, n: int | None) -> None:
    """One model's hidden [N, H], weight [V, H] and optional bias [V] fit together."""
    check_tensor(f"{prefix}_hidden", hidden, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor(f"{prefix}_weight", weight, ndim=2, dtypes=FLOAT_DTYPES)
    check_same_dtype(f"{prefix}_hidden", hidden, f"{prefix}_weight", weight)
    check_dim(f"{prefix}_weight", weight, 1, hidden.shape[1], f"the width of {prefix}_hidden")
    if n is not None:
        check_dim(f"{prefix}_hidden", hidden, 0, n, "the number of rows of student_hidden")
    if bias is not None:
        check_tensor(f"{prefix}_bias", bias, ndim=1, dtypes=FLOAT_DTYPES)
        check_dim(f"{prefix}_bias", bias, 0, weight.shape[0], f"the rows of {prefix}_weight")


def check_logits(student_logits, teacher_logits) -> None:
    check_tensor("student_logits", student_logits, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("teacher_logits", teacher_logits, ndim=2, dtypes=FLOAT_DTYPES)
    check_dim("teacher_logits", teacher_logits, 0, student_logits.shape[0], "the rows of student_logits")
    check_same_device({"student_logits": student_logits, "teacher_logits": teacher_logits})


def _check_per_row(name: str, t, rows, n: int) -> None:
    """A per-selected-row tensor (weights, labels) has M entries (M = len(rows) for indices,
    N without rows), or N with a bool mask."""
    if rows is None:
        check_dim(name, t, 0, n, "the number of rows N (rows=None)")
    elif rows.dtype != torch.bool:
        check_dim(name, t, 0, rows.shape[0], "the number of indices in rows")
    elif t.shape[0] != n:
        m = int(rows.sum())  # [M] with a bool mask: M is only known by counting (a host sync)
        if t.shape[0] != m:
            raise ValueError(f"{name} has {t.shape[0]} entries; with a bool rows mask it must have "
                             f"N = {n} or M = {m} (the number of True rows)")


def check_weights(weights, rows, n: int, device) -> None:
    """weights: float [M] (M = len(rows) for indices, N without rows) or [N] with a bool mask;
    finite and >= 0."""
    if weights is None:
        return
    check_tensor("weights", weights, ndim=1, floating=True)
    if weights.device != device:
        raise ValueError(f"weights is on {weights.device} but the hidden states are on {device}")
    _check_per_row("weights", weights, rows, n)
    # the ops weigh in float32: an fp64 weight that overflows it is as bad as an inf
    check_finite_nonnegative("weights", weights.float() if weights.dtype == torch.float64 else weights)


def check_labels(labels, rows, n: int, vs: int, device) -> None:
    """labels: int [M] (or [N] with a bool mask), each in [0, Vs) or IGNORE_INDEX."""
    check_tensor("labels", labels, ndim=1, dtypes=(torch.int64, torch.int32))
    if labels.device != device:
        raise ValueError(f"labels is on {labels.device} but the hidden states are on {device}")
    _check_per_row("labels", labels, rows, n)
    check_index_range("labels", labels, vs, "the student vocabulary Vs", allow=IGNORE_INDEX)
