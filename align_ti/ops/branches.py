"""TPA: branched positions, candidate sampling, expanded sequences with their masks, the model
run on them, and the transition loss.

One training step of TPA, per batch (METHOD.md "TPA", DESIGN.md "TPA expanded sequences"):

1. ``steps = select_branch_steps(labels, attention_mask, fraction=..., max_per_sample=...,
   seed=..., sample_ids=..., epoch=...)`` -- which response positions are branched ([B, S],
   ascending, -1 = empty).
2. A no-grad student pass over the original batch gives its final hidden states ``h`` [B, L, H];
   ``cands = sample_candidates(h, student_head_weight, input_ids, steps, num_candidates=d, ...)``
   draws d candidates per step ([B, S, d]) through the student head in row chunks.
3. ``batch = build_expanded_batch(input_ids, attention_mask, steps, cands, labels=labels,
   pad_id=..., max_expanded_len=...)`` -- the expanded batch (an :class:`ExpandedBatch`).
4. ``hs = expanded_hidden_states(student, batch, pixel_values=...)`` and the same for the
   teacher (under no_grad): final hidden states [B, T, H], T = L + C, from one forward each.
5. ``tpa = tpa_loss(hs, W_s, ht, W_t, batch, divergence=...)``; the ground-truth rows for
   SFT/KD/IVA are the first L rows of each sample of the same forwards
   (:meth:`ExpandedBatch.ground_truth`, :meth:`ExpandedBatch.expand_rows`, ``batch.targets``).

Layout (the same as ``align_ti.reference.branches.expanded_batch_reference``, the oracle): the
ground-truth stream keeps its L tokens and position ids; C candidate slots follow it. Slot c of
sample b holds a candidate for step ``t = steps[b, c]`` (an alternative to the ground-truth token
y_t, ``1 <= t < L``, a real response token), with position id ``position_ids[b, t]``; it sees the
real ground-truth keys ``j < t`` and itself. Empty slots (``t = -1``) see only themselves. No
other query sees a candidate key. One rule gives the whole mask (used by the dense masks and the
FlexAttention ``mask_mod`` alike)::

    allowed(b, q, k) = (q == k) or (key_is_real_ground_truth[b, k] and k <= query_limit[b, q])

with ``query_limit = q`` for ground-truth queries, ``t - 1`` for a candidate of step t and -1 for
an empty slot.

Randomness is counter-based: every random number is a hash of (seed, sample id, epoch, step,
token id), so branched positions and candidates of a sample do not depend on the batch it is in,
on the padding, on the chunking or on the number of processes.
"""
from __future__ import annotations

import numbers
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from align_ti.ops import heuristics as _heur
from align_ti.ops.fused_kl import _head_logits, fused_linear_kl
from align_ti.reference.branches import default_position_ids
from align_ti.validation import (
    check_bool,
    check_choice,
    check_dim,
    check_index_range,
    check_positive,
    check_same_device,
    check_same_dtype,
    check_tensor,
    describe,
    value_checks_enabled,
)

IGNORE_INDEX = -100
STRATEGIES = ("sample", "topk")
_INT_DTYPES = (torch.int64, torch.int32)
_F32 = torch.float32

__all__ = [
    "ExpandedBatch",
    "build_expanded_batch",
    "select_branch_steps",
    "sample_candidates",
    "forbidden_token_ids",
    "expanded_hidden_states",
    "tpa_loss",
    "sample_keys",
]


# --------------------------------------------------------------------------------------------
# counter-based randomness
# --------------------------------------------------------------------------------------------

_M32 = 0xFFFFFFFF
# Odd multipliers below 2**31: a 32-bit value times one stays below 2**63, so int64 never
# overflows on any device (lowbias32-style integer hash).
_C1 = 0x7FEB352D
_C2 = 0x5BD1E995
_STREAM_STEPS = 0x1B873593   # which positions are branched
_STREAM_GUMBEL = 0x68E31DA4  # candidate noise, per step
_STREAM_COLS = 0x2C1B3C6D    # candidate noise, per token id


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective integer hash of int64 values in [0, 2**32) (stays in that range)."""
    x = x ^ (x >> 16)
    x = (x * _C1) & _M32
    x = x ^ (x >> 15)
    x = (x * _C2) & _M32
    return x ^ (x >> 16)


def _uniform(h: torch.Tensor) -> torch.Tensor:
    """Hash values -> fp32 uniforms in (0, 1) (24 random bits)."""
    return ((h >> 8).to(_F32) + 0.5) * (2.0 ** -24)


def _check_nonneg_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return value


def _real_offset(attention_mask: Optional[torch.Tensor], batch_size: int, device) -> torch.Tensor:
    """int64 [B]: each sample's first real token (0 without a mask or a real token). The
    randomness keys on positions counted from there, so left padding does not change it."""
    if attention_mask is None:
        return torch.zeros(batch_size, dtype=torch.int64, device=device)
    return attention_mask.to(device).bool().to(torch.int8).argmax(1)  # the first maximum


def sample_keys(seed: int, sample_ids: Optional[torch.Tensor], epoch: int, batch_size: int,
                device) -> torch.Tensor:
    """int64 [B] keys in [0, 2**32): a hash of (seed, sample id, epoch) per sample.

    ``sample_ids`` are int64 [B] ids >= 0 that identify each sample across batches (e.g. the
    dataset index); None uses 0..B-1, which then *does* depend on the batch composition.
    """
    _check_nonneg_int("seed", seed)
    _check_nonneg_int("epoch", epoch)
    if sample_ids is None:
        sid = torch.arange(batch_size, device=device)
    else:
        check_tensor("sample_ids", sample_ids, ndim=1, dtypes=_INT_DTYPES)
        check_dim("sample_ids", sample_ids, 0, batch_size, "the batch size")
        sid = sample_ids.to(device=device, dtype=torch.int64)
        if value_checks_enabled() and sid.numel() and bool((sid < 0).any()):
            raise ValueError(f"sample_ids must be >= 0, got {sid[sid < 0][:5].tolist()}")
    k = _mix32(torch.full_like(sid, (seed & _M32) ^ 0x9E3779B9))
    k = _mix32(k ^ (sid & _M32))
    k = _mix32(k ^ ((sid >> 32) & _M32))
    k = _mix32(k ^ ((seed >> 32) & _M32))
    return _mix32(k ^ (epoch & _M32))


# --------------------------------------------------------------------------------------------
# which positions are branched
# --------------------------------------------------------------------------------------------

def branch_count(n: torch.Tensor, fraction: float, max_per_sample: Optional[int] = None) -> torch.Tensor:
    """How many of a sample's n eligible positions are branched: ``ceil(fraction * n)`` with a
    1e-9 slack for float rounding (0.3 * 10 -> 3, not 4), at most ``max_per_sample``. The one
    rule for `select_branch_steps` and for anything that counts its steps in advance (the
    trainer's loss normalisers)."""
    k = n if fraction >= 1 else torch.ceil(n.to(torch.float64) * fraction - 1e-9).long()
    return k if max_per_sample is None else k.clamp(max=max_per_sample)


def select_branch_steps(
    labels: torch.Tensor,
    attention_mask: Optional[torch.Tensor] = None,
    fraction: float = 1.0,
    max_per_sample: Optional[int] = None,
    seed: int = 0,
    sample_ids: Optional[torch.Tensor] = None,
    epoch: int = 0,
) -> torch.Tensor:
    """The response positions to branch: int64 [B, S], ascending per sample, -1 = empty.

    A position t is eligible when ``labels[b, t] != -100``, it is a real token
    (``attention_mask[b, t] == 1``) and ``t >= 1`` (a candidate for y_t is drawn from the
    student's output at row t - 1). Per sample with n eligible positions,
    ``k = min(ceil(fraction * n), max_per_sample)`` of them are branched (ceil with a 1e-9
    slack for float rounding; every sample with a response gets at least one branch); all of
    them when ``fraction == 1`` and ``max_per_sample`` is None. Which k is a uniformly random subset keyed by
    (seed, sample id, epoch) and the position counted from the sample's first real token: it
    does not depend on the rest of the batch or on padding (left or right).
    S = the largest k in the batch (one host sync: the shape must be known).
    """
    check_tensor("labels", labels, ndim=2, dtypes=_INT_DTYPES)
    b_size, length = labels.shape
    if attention_mask is not None:
        check_tensor("attention_mask", attention_mask, ndim=2)
        if attention_mask.shape != labels.shape:
            raise ValueError(f"attention_mask must have the shape of labels: got "
                             f"{describe(attention_mask)} vs {describe(labels)}")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ValueError(f"fraction must be a number with 0 < fraction <= 1, got {fraction!r}")
    if max_per_sample is not None and (isinstance(max_per_sample, bool) or not isinstance(max_per_sample, int)
                                       or max_per_sample < 1):
        raise ValueError(f"max_per_sample must be None or an int >= 1, got {max_per_sample!r}")
    device = labels.device
    pos = torch.arange(length, device=device)
    eligible = (labels != IGNORE_INDEX) & (pos >= 1)
    if attention_mask is not None:
        eligible &= attention_mask.bool()
    n = eligible.sum(1)
    k = branch_count(n, fraction, max_per_sample)
    keys = sample_keys(seed, sample_ids, epoch, b_size, device)  # validates them in any case
    if fraction >= 1 and max_per_sample is None:
        chosen = eligible
    else:
        rel = (pos[None, :] - _real_offset(attention_mask, b_size, device)[:, None]) & _M32
        h = _mix32(keys[:, None] ^ _mix32(rel ^ _STREAM_STEPS))
        prio = torch.where(eligible, _uniform(h), torch.full((), 2.0, device=device))
        rank = prio.argsort(dim=1, stable=True).argsort(dim=1)
        chosen = eligible & (rank < k[:, None])
    width = int(k.max()) if b_size else 0  # host sync: the output shape
    big = torch.full((), length, device=device)
    ordered = torch.where(chosen, pos[None, :], big).sort(1).values[:, :width]
    return torch.where(ordered < length, ordered, torch.full((), -1, device=device))


# --------------------------------------------------------------------------------------------
# candidate sampling
# --------------------------------------------------------------------------------------------

def forbidden_token_ids(model_or_config, tokenizer=None) -> tuple[tuple[int, ...], Optional[int]]:
    """The default ``(forbidden_ids, vocab_limit)`` for candidate sampling.

    forbidden_ids: the image and video token ids of a (Llava-like) config and the pad token id
    (of the tokenizer, else of the text config); an image token id among the candidates would
    break Llava's image splicing. vocab_limit: ``len(tokenizer)`` (LM-head rows at or above it
    are padding rows that were never trained), or None without a tokenizer.
    """
    config = getattr(model_or_config, "config", model_or_config)
    ids = set()
    for name in ("image_token_id", "image_token_index", "video_token_id", "video_token_index"):
        v = getattr(config, name, None)
        if isinstance(v, int) and v >= 0:
            ids.add(v)
    pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    if pad is None:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        pad = getattr(text, "pad_token_id", None)
    if isinstance(pad, int) and pad >= 0:
        ids.add(pad)
    return tuple(sorted(ids)), (len(tokenizer) if tokenizer is not None else None)


def _forbidden_list(forbidden_ids) -> list[int]:
    """forbidden_ids (None, a sequence of ints or an integer tensor) as a sorted list."""
    if forbidden_ids is None:
        return []
    if isinstance(forbidden_ids, torch.Tensor):
        check_tensor("forbidden_ids", forbidden_ids, dtypes=_INT_DTYPES)
        forbidden_ids = forbidden_ids.flatten().tolist()
    if isinstance(forbidden_ids, (str, bytes)) or not isinstance(forbidden_ids, Iterable):
        raise TypeError(f"forbidden_ids must be None or a sequence of ints, got {forbidden_ids!r}")
    ids = list(forbidden_ids)
    if any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in ids):
        raise TypeError(f"forbidden_ids must hold ints, got {ids[:8]!r}")
    return sorted({int(v) for v in ids})


def _banned_columns(ids: list[int], vlim: int, device) -> torch.Tensor:
    """bool [vlim]: True at `ids` (token ids in [0, vlim); built on the host: a short list)."""
    banned = torch.zeros(vlim, dtype=torch.bool)
    if ids:
        banned[torch.tensor(ids)] = True
    if torch.device(device).type == "cuda":  # pinned + non_blocking: the host does not wait
        return banned.pin_memory().to(device, non_blocking=True)
    return banned.to(device)


@torch.no_grad()
def sample_candidates(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    input_ids: torch.Tensor,
    steps: torch.Tensor,
    num_candidates: int = 4,
    strategy: str = "sample",
    temperature: float = 1.0,
    exclude_ground_truth: bool = True,
    forbidden_ids: Optional[Sequence[int]] = None,
    vocab_limit: Optional[int] = None,
    seed: int = 0,
    sample_ids: Optional[torch.Tensor] = None,
    epoch: int = 0,
    student_bias: Optional[torch.Tensor] = None,
    chunk_bytes: Optional[int] = None,
    attention_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """d candidate tokens per branched step, from a no-grad student pass: int64 [B, S, d].

    The candidates for step t (alternatives to y_t = ``input_ids[b, t]``) come from the student's
    next-token distribution at row t - 1: ``z = student_hidden[b, t-1] @ student_weight[:V]^T
    (+ bias)`` over the first ``V = vocab_limit`` (default: all head rows) token ids.

    - ``strategy="sample"``: d distinct tokens drawn *without replacement* from
      ``softmax(z / temperature)`` restricted to the allowed tokens (Gumbel-top-d: the d largest
      of ``z / temperature + Gumbel noise``).
    - ``strategy="topk"``: the d most likely allowed tokens (temperature is irrelevant).

    Allowed tokens: ids ``< vocab_limit``, not in ``forbidden_ids`` (see
    :func:`forbidden_token_ids` for the defaults a trainer should pass: image/video/pad ids and
    ids >= len(tokenizer)), and, with ``exclude_ground_truth=True`` (the default), not y_t
    itself -- TPA aligns transitions *off* the ground-truth path, which KD already covers;
    ``False`` lets y_t be drawn like any other token.

    Randomness: the Gumbel noise of (step t, token v) is a hash of (seed, ``sample_ids[b]``,
    epoch, t, v), so a sample gets the same candidates in any batch, chunking or process
    count. Pass the dataset index as ``sample_ids``; None uses 0..B-1. t counts from the
    sample's first real token when ``attention_mask`` ([B, L], 1 = real) is given, so left
    padding changes nothing either (without it, t is the absolute position).

    Memory: logits are computed for row chunks only (``heuristics.rows_per_chunk``, or
    ``chunk_bytes``: bytes, or a string such as "512M"); [rows, V] logits are never held at
    once. Empty slots (step -1) get 0.

    A -inf logit (e.g. in ``student_bias``) masks its token: it is never drawn. NaN or +inf in
    the student's logits at a branched row (from student_hidden, student_weight or
    student_bias), or fewer than d unmasked allowed tokens there, raise ValueError (content
    checks, see ``align_ti.set_value_checks``): candidates drawn from them would be arbitrary.
    """
    check_tensor("student_hidden", student_hidden, ndim=3, floating=True)
    b_size, length, width = student_hidden.shape
    check_tensor("student_weight", student_weight, ndim=2, floating=True)
    check_dim("student_weight", student_weight, 1, width, "the hidden size of student_hidden")
    check_same_dtype("student_hidden", student_hidden, "student_weight", student_weight)
    check_tensor("input_ids", input_ids, ndim=2, dtypes=_INT_DTYPES)
    if input_ids.shape != (b_size, length):
        raise ValueError(f"input_ids must be [B, L] = {[b_size, length]} like student_hidden, got {describe(input_ids)}")
    check_tensor("steps", steps, ndim=2, dtypes=_INT_DTYPES)
    check_dim("steps", steps, 0, b_size, "the batch size of student_hidden")
    if isinstance(num_candidates, bool) or not isinstance(num_candidates, int) or num_candidates <= 0:
        raise ValueError(f"num_candidates (d) must be an int >= 1, got {num_candidates!r}")
    check_choice("strategy", strategy, STRATEGIES)
    if strategy == "sample":
        check_positive("temperature", temperature)
    n_vocab = student_weight.shape[0]
    vlim = n_vocab if vocab_limit is None else vocab_limit
    if isinstance(vlim, bool) or not isinstance(vlim, int) or not 0 < vlim <= n_vocab:
        raise ValueError(f"vocab_limit must be None or an int in [1, {n_vocab}] (the student head's rows), "
                         f"got {vocab_limit!r}")
    if student_bias is not None:
        check_tensor("student_bias", student_bias, ndim=1, floating=True)
        check_dim("student_bias", student_bias, 0, n_vocab, "the rows of student_weight")
    if attention_mask is not None:
        check_tensor("attention_mask", attention_mask, ndim=2)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask must have the shape of input_ids {list(input_ids.shape)}, "
                             f"got {describe(attention_mask)}")
    check_same_device({"student_hidden": student_hidden, "student_weight": student_weight,
                       "student_bias": student_bias})
    check_bool("exclude_ground_truth", exclude_ground_truth)
    banned_ids = [v for v in _forbidden_list(forbidden_ids) if 0 <= v < vlim]
    chunk_bytes = _heur.resolve_chunk_bytes(chunk_bytes)
    n_allowed = vlim - len(banned_ids) - (1 if exclude_ground_truth else 0)
    if n_allowed < num_candidates:
        pool = f"vocab_limit = {vlim}" if vocab_limit is not None else f"student_weight's {vlim} rows"
        less = ([f"{len(banned_ids)} forbidden_ids"] if banned_ids else []) + (
            ["the ground truth"] if exclude_ground_truth else [])
        pool += f", less {' and '.join(less)}" if less else ""
        raise ValueError(f"num_candidates = {num_candidates} exceeds the {max(n_allowed, 0)} tokens a "
                         f"candidate may be ({pool})")
    device = student_hidden.device
    steps = steps.to(device=device, dtype=torch.int64)
    if value_checks_enabled() and steps.numel():
        bad = (steps != -1) & ((steps < 1) | (steps >= length))
        if bool(bad.any()):
            raise ValueError(f"steps must be -1 or in [1, {length}) (L = {length}), got e.g. {steps[bad][:5].tolist()}")
    n_steps = steps.shape[1]
    d = num_candidates
    valid = steps >= 0
    t = steps.clamp(min=1)
    rows = (torch.arange(b_size, device=device)[:, None] * length + t - 1).reshape(-1)
    gt = input_ids.to(device).long().gather(1, t).reshape(-1)
    gt_in = gt < vlim
    gt_col = torch.where(gt_in, gt, torch.zeros_like(gt)).clamp(min=0)[:, None]
    banned = _banned_columns(banned_ids, vlim, device)
    if strategy == "sample":
        keys = sample_keys(seed, sample_ids, epoch, b_size, device)
        rel = (steps - _real_offset(attention_mask, b_size, device)[:, None]).clamp(min=0)
        row_key = _mix32(keys[:, None] ^ _mix32(rel ^ _STREAM_GUMBEL)).reshape(-1)
        col_key = _mix32(torch.arange(vlim, device=device) ^ _STREAM_COLS)
    flat = student_hidden.reshape(b_size * length, width)
    n = rows.numel()
    out = torch.zeros(n, d, dtype=torch.int64, device=device)
    # per row: fp32 logits + (sample) up to three int64 hash temporaries and an fp32 noise row
    per_row = vlim * (4 if strategy == "topk" else 4 + 3 * 8 + 4)
    chunk = _heur.rows_per_chunk(per_row, device, chunk_bytes)
    neg_inf = torch.full((), float("-inf"), device=device)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        h = flat.index_select(0, rows[s:e])
        z = torch.empty(e - s, vlim, dtype=_F32, device=device)
        _head_logits(h, student_weight, student_bias, vlim, z)
        if value_checks_enabled() and bool((torch.isnan(z) | (z == float("inf"))).any()):
            raise ValueError("student_hidden, student_weight or student_bias hold NaN or inf: the "
                             "student's logits at a branched row are NaN or +inf (-inf masks a token)")
        if strategy == "sample":
            if temperature != 1.0:
                z.div_(temperature)
            noise = _uniform(_mix32(row_key[s:e, None] ^ col_key[None, :]))
            z.sub_(noise.log_().neg_().log_())  # + Gumbel = - log(-log u)
            del noise
        z.masked_fill_(banned, float("-inf"))
        if exclude_ground_truth:
            cur = z.gather(1, gt_col[s:e])
            z.scatter_(1, gt_col[s:e], torch.where(gt_in[s:e, None], neg_inf, cur))
        top = z.topk(d, dim=1)
        if value_checks_enabled() and bool((valid.reshape(-1)[s:e] & (top.values[:, -1] == float("-inf"))).any()):
            raise ValueError(f"num_candidates = {d} exceeds the allowed tokens at a branched step whose "
                             "student logits are -inf (masked) at all but fewer than d of them")
        out[s:e] = top.indices
    out = out.view(b_size, n_steps, d)
    return torch.where(valid[:, :, None], out, torch.zeros((), dtype=torch.int64, device=device))


# --------------------------------------------------------------------------------------------
# the expanded batch
# --------------------------------------------------------------------------------------------

@dataclass
class ExpandedBatch:
    """The expanded batch of :func:`build_expanded_batch` (T = L + C).

    Tensors (all on the device of input_ids):
      input_ids [B, T]: ground truth, then the candidates (pad_id in empty slots).
      position_ids [B, T]: ground-truth position ids, then those of each slot's step (0 if empty).
      attention_mask [B, T] int64: 1 = real ground-truth token or filled candidate slot (the
        2-D real-token mask; never hand it to the model, hand it the 4-D mask).
      targets [B, T] int64 or None: ground-truth row i -> labels[i + 1] (the next token, or
        -100); candidate, empty and last rows -> -100. Per-row token ids for SFT/KD; never pass
        them as ``labels=`` to a model (its internal shift is wrong on an expanded sequence).
      steps [B, C] int64: the step of each slot (-1 = empty); candidates [B, C] int64 (the
        token of each slot, pad_id where empty).
      query_limit [B, T] int64, key_real [B, T] bool: the mask rule (module docstring).
    length: L (ground-truth length).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor
    targets: Optional[torch.Tensor]
    steps: torch.Tensor
    candidates: torch.Tensor
    query_limit: torch.Tensor
    key_real: torch.Tensor
    length: int

    # --- shapes and rows -------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def total_length(self) -> int:
        """T = L + C."""
        return self.input_ids.shape[1]

    @property
    def num_slots(self) -> int:
        """C, candidate slots per sample (filled or empty)."""
        return self.steps.shape[1]

    @property
    def candidate_rows(self) -> torch.Tensor:
        """int64 [B * C]: flat indices into the [B * T] rows of every candidate slot, empty
        ones included (see :attr:`candidate_valid`): a fixed size, so no host sync."""
        b, t, c = self.batch_size, self.total_length, self.num_slots
        dev = self.input_ids.device
        return ((torch.arange(b, device=dev) * t)[:, None] + self.length + torch.arange(c, device=dev)).reshape(-1)

    @property
    def candidate_valid(self) -> torch.Tensor:
        """bool [B * C]: which of :attr:`candidate_rows` hold a candidate."""
        return (self.steps >= 0).reshape(-1)

    def ground_truth_rows(self) -> torch.Tensor:
        """int64 [B * L]: flat indices into the [B * T] rows of the ground-truth rows."""
        b, t, l = self.batch_size, self.total_length, self.length
        dev = self.input_ids.device
        return ((torch.arange(b, device=dev) * t)[:, None] + torch.arange(l, device=dev)).reshape(-1)

    def ground_truth(self, x: torch.Tensor) -> torch.Tensor:
        """The ground-truth part ``x[:, :L]`` of an expanded [B, T, ...] tensor (a view): e.g.
        hidden states for SFT/KD/IVA, identical to those of the unexpanded forward."""
        if x.dim() < 2 or x.shape[0] != self.batch_size or x.shape[1] != self.total_length:
            raise ValueError(f"x must be [B, T, ...] = [{self.batch_size}, {self.total_length}, ...], got {describe(x)}")
        return x[:, : self.length]

    def expand_rows(self, mask: torch.Tensor) -> torch.Tensor:
        """A bool [B, L] selection over the original sequence (e.g. response positions, chosen
        vision tokens) -> bool [B * T] over the expanded rows (candidates never selected). Use
        it as ``rows=`` for fused_linear_kl / fused_linear_distill on the flattened hidden states."""
        check_tensor("mask", mask, ndim=2, dtypes=(torch.bool,))
        if mask.shape != (self.batch_size, self.length):
            raise ValueError(f"mask must be [B, L] = {[self.batch_size, self.length]}, got {describe(mask)}")
        pad = torch.zeros(self.batch_size, self.num_slots, dtype=torch.bool, device=mask.device)
        return torch.cat([mask, pad], 1).reshape(-1)

    def expand_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """int64 [B, K] positions in [0, L) of the original sequence -> flat row indices into
        [B * T] (same shape). Positions outside [0, L) raise ValueError (a content check)."""
        check_tensor("positions", positions, ndim=2, dtypes=_INT_DTYPES)
        check_dim("positions", positions, 0, self.batch_size, "the batch size")
        check_index_range("positions", positions, self.length, "the ground-truth length L")
        base = torch.arange(self.batch_size, device=positions.device)[:, None] * self.total_length
        return base + positions.long()

    # --- masks -----------------------------------------------------------------------------
    def allowed(self) -> torch.Tensor:
        """bool [B, T, T]: query i may see key j."""
        t = self.total_length
        dev = self.input_ids.device
        ar = torch.arange(t, device=dev)
        mask = self.key_real[:, None, :] & (ar[None, None, :] <= self.query_limit[:, :, None])
        return mask | torch.eye(t, dtype=torch.bool, device=dev)

    def sdpa_mask(self) -> torch.Tensor:
        """bool [B, 1, T, T] for SDPA (True = attend)."""
        return self.allowed().unsqueeze(1)

    def eager_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """additive [B, 1, T, T] in ``dtype`` for eager attention: 0 where allowed, the dtype's
        most negative finite value elsewhere (a bool mask under eager is silently wrong)."""
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        zero = torch.zeros((), dtype=dtype, device=self.input_ids.device)
        neg = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=self.input_ids.device)
        return torch.where(self.allowed(), zero, neg).unsqueeze(1)

    def mask_mod(self):
        """The FlexAttention ``mask_mod(b, h, q_idx, kv_idx)`` of this batch."""
        key_real, limit = self.key_real, self.query_limit

        def mask_mod(b, h, q_idx, kv_idx):
            return (q_idx == kv_idx) | (key_real[b, kv_idx] & (kv_idx <= limit[b, q_idx]))

        return mask_mod

    def block_mask(self, block_size: int = 128, compile: Optional[bool] = None):
        """A FlexAttention BlockMask [B, 1, T, T] (for attn_implementation="flex_attention";
        CUDA is the training target: on CPU FlexAttention has no backward, so CPU training uses
        the dense masks). Blocks outside the rule are skipped, so the candidate-candidate region
        costs nothing and the attention work grows linearly in the number of candidates."""
        from torch.nn.attention.flex_attention import create_block_mask

        t = self.total_length
        dev = self.input_ids.device
        kw = {}
        if compile is None:
            compile = dev.type == "cuda"
        if compile:
            kw["_compile"] = True
        return create_block_mask(self.mask_mod(), self.batch_size, None, t, t, device=dev,
                                 BLOCK_SIZE=block_size, **kw)

    def attention_mask_for(self, attn_implementation: str, dtype: torch.dtype = torch.float32):
        """The 4-D mask form for a model's attention implementation: ``"sdpa"`` -> bool,
        ``"eager"`` -> additive in ``dtype`` (the model's compute dtype), ``"flex_attention"`` ->
        BlockMask. flash-attention kernels cannot take an arbitrary mask: ValueError."""
        impl = attn_implementation or "eager"
        if impl == "sdpa":
            return self.sdpa_mask()
        if impl == "eager":
            return self.eager_mask(dtype)
        if impl == "flex_attention":
            return self.block_mask()
        raise ValueError(
            f"attn_implementation {impl!r} cannot take TPA's branch mask: use 'sdpa', 'eager' or "
            "'flex_attention' for the expanded forward"
        )


def _flatten_slots(steps, candidates):
    if candidates.dim() == 3:
        if candidates.shape[:2] != steps.shape:
            raise ValueError(f"candidates [B, S, d] must match steps [B, S]: got {describe(candidates)} vs {describe(steps)}")
        b, s, d = candidates.shape
        if d <= 0:
            raise ValueError(f"candidates has d = {d} candidates per step; need d >= 1")
        return steps[:, :, None].expand(b, s, d).reshape(b, s * d), candidates.reshape(b, s * d)
    if candidates.shape != steps.shape:
        raise ValueError(f"candidates must be [B, C] like steps or [B, S, d]: got {describe(candidates)} vs "
                         f"steps {describe(steps)}")
    return steps, candidates


def _drop_latest(steps: torch.Tensor, budget: int) -> torch.Tensor:
    """Keep, per sample, the slots of the earliest steps whose total slot count fits `budget`
    (whole steps only), set the rest to -1, and compact kept slots to the left (stable); the
    result has min(C, budget) columns."""
    b, c = steps.shape
    big = torch.iinfo(torch.int64).max
    key = torch.where(steps >= 0, steps, torch.full((), big, device=steps.device))
    srt = key.sort(1).values
    # number of filled slots whose step is <= this slot's step
    count_le = torch.searchsorted(srt.contiguous(), key.contiguous(), right=True)
    keep = (steps >= 0) & (count_le <= budget)
    order = (~keep).to(torch.int8).argsort(dim=1, stable=True)
    kept = torch.where(keep, steps, torch.full((), -1, device=steps.device)).gather(1, order)
    return kept[:, :budget], order[:, :budget]


def build_expanded_batch(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    steps: torch.Tensor,
    candidates: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    pad_id: int = 0,
    position_ids: Optional[torch.Tensor] = None,
    max_expanded_len: Optional[int] = None,
    vocab_size: Optional[int] = None,
    forbidden_ids: Optional[Sequence[int]] = None,
) -> ExpandedBatch:
    """Build TPA's expanded batch (appended layout; see the module docstring), vectorised.

    Args:
        input_ids: int64 [B, L], right padded.
        attention_mask: [B, L], 1 = real token.
        steps, candidates: either ``steps`` [B, S] with ``candidates`` [B, S, d] (what
            :func:`select_branch_steps` and :func:`sample_candidates` return; each step's d
            candidates become d consecutive slots), or both [B, C] (one slot per entry). Step -1
            marks an empty slot (its candidate is ignored).
        labels: optional int64 [B, L] (-100 outside the response). When given, every step must
            be a response position, and ``targets`` are returned.
        pad_id: token id of empty slots.
        position_ids: [B, L] ground-truth position ids; default ``cumsum(attention_mask) - 1``.
        max_expanded_len: upper bound on T = L + C. Branches are dropped deterministically to
            fit: per sample, whole steps are dropped latest first (a sample keeps its earliest
            steps with all their candidates, as many as fit in ``max_expanded_len - L`` slots).
            The ground-truth stream is never cut: if L alone exceeds it, all branches are dropped.
        vocab_size: when given, candidates must be in [0, vocab_size).
        forbidden_ids: when given, no candidate may be one of them (e.g. the image token id).

    Returns:
        :class:`ExpandedBatch`. C = S * d (or the given C), reduced to ``max_expanded_len - L``
        when that is smaller; no host sync (no data-dependent shape).

    Raises ValueError/TypeError naming the argument for wrong shapes or dtypes, steps outside
    [1, L) or on padding or (with labels) outside the response, candidates out of vocabulary
    or forbidden. The content checks can be switched off (``align_ti.set_value_checks``).
    """
    check_tensor("input_ids", input_ids, ndim=2, dtypes=_INT_DTYPES)
    b_size, length = input_ids.shape
    device = input_ids.device
    check_tensor("attention_mask", attention_mask, ndim=2)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask must have the shape of input_ids {list(input_ids.shape)}, "
                         f"got {describe(attention_mask)}")
    check_tensor("steps", steps, ndim=2, dtypes=_INT_DTYPES)
    check_dim("steps", steps, 0, b_size, "the batch size of input_ids")
    check_tensor("candidates", candidates, ndim=(2, 3), dtypes=_INT_DTYPES)
    check_dim("candidates", candidates, 0, b_size, "the batch size of input_ids")
    if labels is not None:
        check_tensor("labels", labels, ndim=2, dtypes=_INT_DTYPES)
        if labels.shape != input_ids.shape:
            raise ValueError(f"labels must have the shape of input_ids {list(input_ids.shape)}, got {describe(labels)}")
    if position_ids is not None:
        check_tensor("position_ids", position_ids, ndim=2, dtypes=_INT_DTYPES)
        if position_ids.shape != input_ids.shape:
            raise ValueError(f"position_ids must have the shape of input_ids {list(input_ids.shape)}, "
                             f"got {describe(position_ids)}")
    if max_expanded_len is not None and (isinstance(max_expanded_len, bool) or not isinstance(max_expanded_len, int)
                                         or max_expanded_len < 1):
        raise ValueError(f"max_expanded_len must be None or an int >= 1, got {max_expanded_len!r}")
    if vocab_size is not None and (isinstance(vocab_size, bool) or not isinstance(vocab_size, int)
                                   or vocab_size < 1):
        raise ValueError(f"vocab_size must be None or an int >= 1, got {vocab_size!r}")
    if isinstance(pad_id, bool) or not isinstance(pad_id, int):
        raise TypeError(f"pad_id must be an int token id, got {pad_id!r}")
    forbidden_ids = _forbidden_list(forbidden_ids)
    slot_steps, slot_cands = _flatten_slots(steps.to(device).long(), candidates.to(device).long())
    mask = attention_mask.to(device).bool()
    filled = slot_steps >= 0

    if value_checks_enabled() and slot_steps.numel():
        bad = (filled & (slot_steps < 1)) | (slot_steps >= length) | (slot_steps < -1)
        if bool(bad.any()):
            raise ValueError(f"steps must be -1 (empty) or in [1, {length}) (L = {length}), "
                             f"got e.g. {slot_steps[bad][:5].tolist()}")
        safe = slot_steps.clamp(min=0)
        on_pad = filled & ~mask.gather(1, safe)
        if bool(on_pad.any()):
            raise ValueError(f"steps must be real tokens (attention_mask = 1), got padding positions "
                             f"e.g. {slot_steps[on_pad][:5].tolist()}")
        if labels is not None:
            off = filled & (labels.to(device).gather(1, safe) == IGNORE_INDEX)
            if bool(off.any()):
                raise ValueError(f"steps must be response positions (labels != -100), got positions "
                                 f"outside the response e.g. {slot_steps[off][:5].tolist()}")
        if vocab_size is not None:
            oov = filled & ((slot_cands < 0) | (slot_cands >= vocab_size))
            if bool(oov.any()):
                raise ValueError(f"candidates must be token ids in [0, {vocab_size}) (vocab_size), got e.g. "
                                 f"{slot_cands[oov][:5].tolist()}")
        if forbidden_ids:  # already a sorted list (validated above)
            fb = torch.tensor(forbidden_ids, dtype=torch.int64, device=device)
            hit = filled & torch.isin(slot_cands, fb)
            if bool(hit.any()):
                raise ValueError(f"candidates hold forbidden_ids, e.g. {slot_cands[hit][:5].tolist()}")

    if max_expanded_len is not None and length + slot_steps.shape[1] > max_expanded_len:
        budget = max(0, max_expanded_len - length)
        slot_steps, order = _drop_latest(slot_steps, budget)
        slot_cands = slot_cands.gather(1, order)
        filled = slot_steps >= 0

    n_slots = slot_steps.shape[1]
    if position_ids is None:
        position_ids = default_position_ids(mask)
    position_ids = position_ids.to(device).long()
    safe = slot_steps.clamp(min=0)
    zero = torch.zeros((), dtype=torch.int64, device=device)
    ids = torch.cat([input_ids.long(), torch.where(filled, slot_cands, torch.full((), pad_id, device=device))], 1)
    pos = torch.cat([position_ids, torch.where(filled, position_ids.gather(1, safe), zero)], 1)
    real = torch.cat([mask.long(), filled.long()], 1)
    targets = None
    if labels is not None:
        labels = labels.to(device).long()
        ign = torch.full((b_size, 1 + n_slots), IGNORE_INDEX, dtype=torch.int64, device=device)
        targets = torch.cat([labels[:, 1:], ign], 1)
    ar = torch.arange(length, device=device)
    limit = torch.cat([ar.expand(b_size, length), torch.where(filled, slot_steps - 1, zero - 1)], 1)
    key_real = torch.cat([mask, torch.zeros(b_size, n_slots, dtype=torch.bool, device=device)], 1)
    return ExpandedBatch(
        input_ids=ids, position_ids=pos, attention_mask=real, targets=targets,
        steps=slot_steps, candidates=torch.where(filled, slot_cands, torch.full((), pad_id, device=device)),
        query_limit=limit, key_real=key_real, length=length,
    )


# --------------------------------------------------------------------------------------------
# running a transformers model on the expanded batch
# --------------------------------------------------------------------------------------------

def _unwrap(model):
    """The transformers PreTrainedModel inside DDP/FSDP/accelerate wrappers."""
    seen = 0
    while not hasattr(model, "get_decoder") and hasattr(model, "module") and seen < 8:
        model = model.module
        seen += 1
    return model


def expanded_hidden_states(
    model,
    batch: ExpandedBatch,
    pixel_values: Optional[torch.Tensor] = None,
    attn_implementation: Optional[str] = None,
    **model_kwargs,
) -> torch.Tensor:
    """Final (normed) hidden states [B, T, H] of a transformers model on an expanded batch.

    Works for decoder-only causal LMs (Qwen2/Qwen3/Llama-like) and LlavaForConditionalGeneration
    without copying model code: the model is called as usual (through any DDP/FSDP wrapper, so
    gradient synchronisation and sharding hooks run) with ``input_ids``, the 4-D mask form of
    its attention implementation (:meth:`ExpandedBatch.attention_mask_for`; transformers uses a
    4-D mask or a BlockMask as given), ``position_ids``, ``use_cache=False`` and
    ``logits_to_keep=1`` (so no [B, T, V] logits are made); a forward hook on the decoder
    captures its last hidden state. For Llava pass ``pixel_values``: image splicing replaces
    the image-token positions of ``input_ids``, which are in the untouched ground-truth stream
    (candidates are never image tokens: see :func:`forbidden_token_ids`).

    attn_implementation: the mask form follows the implementation read from the model's
    decoder config ("sdpa" | "eager" | "flex_attention"); when given, it must name that same
    implementation (a mask of another form is silently wrong, e.g. a bool mask under eager),
    else ValueError. The eager mask uses the decoder's parameter dtype.
    The LM heads are applied by the losses (fused_linear_kl), never here.
    """
    if not isinstance(batch, ExpandedBatch):
        raise TypeError(f"batch must be an ExpandedBatch (from build_expanded_batch), got {type(batch).__name__}")
    inner = _unwrap(model)
    decoder = inner.get_decoder()
    impl = getattr(decoder.config, "_attn_implementation", None) or "eager"
    if attn_implementation is not None and attn_implementation != impl:
        raise ValueError(f"attn_implementation={attn_implementation!r} does not match the model's "
                         f"decoder, which runs {impl!r}: the 4-D mask must be of its form")
    dtype = next(decoder.parameters()).dtype
    mask = batch.attention_mask_for(impl, dtype)
    captured = {}

    def hook(_module, _args, output):
        captured["h"] = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

    handle = decoder.register_forward_hook(hook)
    try:
        kwargs = dict(input_ids=batch.input_ids, attention_mask=mask, position_ids=batch.position_ids,
                      use_cache=False, logits_to_keep=1)
        if pixel_values is not None:
            kwargs["pixel_values"] = pixel_values
        kwargs.update(model_kwargs)
        model(**kwargs)
    finally:
        handle.remove()
    if "h" not in captured:
        raise RuntimeError("expanded_hidden_states: the model's decoder was not called")
    return captured["h"]


# --------------------------------------------------------------------------------------------
# the TPA loss
# --------------------------------------------------------------------------------------------

def tpa_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    batch: ExpandedBatch,
    divergence: str = "forward",
    beta: float = 0.5,
    temperature: float = 1.0,
    vocab_size: Optional[int] = None,
    reduction: str = "mean",
    student_bias: Optional[torch.Tensor] = None,
    teacher_bias: Optional[torch.Tensor] = None,
    impl: str = "auto",
    chunk_bytes: Optional[int] = None,
    fp32_weight_grad: bool = True,
) -> torch.Tensor:
    """L_TPA: the vocabulary divergence between teacher and student at every candidate row.

    ``student_hidden`` [B, T, Hs] and ``teacher_hidden`` [B, T, Ht] are the final hidden states
    of the two expanded forwards (:func:`expanded_hidden_states`) of the same ``batch``. Calls
    :func:`align_ti.fused_linear_kl` on the flattened [B * T] rows with
    ``rows = batch.candidate_rows`` and ``weights = batch.candidate_valid`` (empty slots weigh
    0), so the LM heads run on the B * C candidate rows only and no host sync is needed.
    ``reduction="mean"`` is the mean over all candidates of the batch (= mean over steps of the
    mean over their d candidates when every step has d), 0 without candidates; ``"sum"``;
    ``"none"`` -> [B * C] (0 for empty slots). divergence/beta/temperature/vocab_size/biases/
    impl/chunk_bytes/fp32_weight_grad as in fused_linear_kl. The teacher gets no gradient.
    """
    if not isinstance(batch, ExpandedBatch):
        raise TypeError(f"batch must be an ExpandedBatch (from build_expanded_batch), got {type(batch).__name__}")
    want = (batch.batch_size, batch.total_length)
    for name, h in (("student_hidden", student_hidden), ("teacher_hidden", teacher_hidden)):
        check_tensor(name, h, ndim=3, floating=True)
        if tuple(h.shape[:2]) != want:
            raise ValueError(f"{name} must be [B, T, H] with [B, T] = {list(want)} (the expanded batch), "
                             f"got {describe(h)}")
    rows = batch.candidate_rows.to(student_hidden.device)
    weights = batch.candidate_valid.to(device=student_hidden.device, dtype=_F32)
    return fused_linear_kl(
        student_hidden.reshape(-1, student_hidden.shape[-1]), student_weight,
        teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).detach(), teacher_weight.detach(),
        rows=rows, weights=weights, divergence=divergence, beta=beta, temperature=temperature,
        vocab_size=vocab_size, reduction=reduction, student_bias=student_bias,
        teacher_bias=None if teacher_bias is None else teacher_bias.detach(), impl=impl,
        chunk_bytes=chunk_bytes, fp32_weight_grad=fp32_weight_grad,
    )
