"""TPA's expanded batch: the ground-truth stream with the candidates appended, their position
ids and per-row targets, and the one mask rule in the forms attention implementations take
(bool for SDPA, additive for eager, a BlockMask for FlexAttention).

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
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from align_ti.constants import IGNORE_INDEX
from align_ti.ops.branches.rng import INDEX_DTYPES
from align_ti.ops.branches.sampling import forbidden_list
from align_ti.validation import check_dim, check_index_range, check_tensor, describe, value_checks_enabled


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """[B, L] per-row targets of a causal LM: row i -> ``labels[i + 1]`` (the next token), the
    last row -> -100. What SFT and KD align at each row; never ``labels=`` to a model, which
    shifts by itself."""
    ign = torch.full_like(labels[:, :1], IGNORE_INDEX)
    return torch.cat([labels[:, 1:], ign], 1)


def default_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, L] int64: 0.. over each sample's real tokens (padding gets the last real position,
    harmlessly). What a right-padded batch gets without explicit position ids."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@dataclass
class ExpandedBatch:
    """The expanded batch of :func:`build_expanded_batch` (T = L + C).

    Tensors (all on the device of input_ids):
      input_ids [B, T]: ground truth, then the candidates (pad_id in empty slots).
      position_ids [B, T] (or [R, B, T] for multimodal RoPE): ground-truth position ids, then
        those of each slot's step in every component (0 if empty).
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
        check_tensor("positions", positions, ndim=2, dtypes=INDEX_DTYPES)
        check_dim("positions", positions, 0, self.batch_size, "the batch size")
        check_index_range("positions", positions, self.length, "the ground-truth length L")
        base = torch.arange(self.batch_size, device=positions.device)[:, None] * self.total_length
        return base + positions.long()

    # --- masks -----------------------------------------------------------------------------
    def allowed(self, first_query: int = 0) -> torch.Tensor:
        """bool [B, T - first_query, T]: query i (from ``first_query`` on) may see key j. The
        candidate rows alone (``first_query = L``) are the mask of the candidates' own pass over
        a cached ground-truth prefix (:func:`candidate_hidden_states`)."""
        t = self.total_length
        dev = self.input_ids.device
        keys = torch.arange(t, device=dev)
        queries = keys[first_query:]
        limit = self.query_limit[:, first_query:]
        mask = self.key_real[:, None, :] & (keys[None, None, :] <= limit[:, :, None])
        return mask | (queries[:, None] == keys[None, :])

    def sdpa_mask(self, first_query: int = 0) -> torch.Tensor:
        """bool [B, 1, T - first_query, T] for SDPA (True = attend)."""
        return self.allowed(first_query).unsqueeze(1)

    def eager_mask(self, dtype: torch.dtype, first_query: int = 0) -> torch.Tensor:
        """additive [B, 1, T - first_query, T] in ``dtype`` for eager attention: 0 where allowed,
        the dtype's most negative finite value elsewhere (a bool mask under eager is silently
        wrong)."""
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        zero = torch.zeros((), dtype=dtype, device=self.input_ids.device)
        neg = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=self.input_ids.device)
        return torch.where(self.allowed(first_query), zero, neg).unsqueeze(1)

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

    def attention_mask_for(self, attn_implementation: str, dtype: torch.dtype = torch.float32,
                           first_query: int = 0):
        """The 4-D mask form for a model's attention implementation: ``"sdpa"`` -> bool,
        ``"eager"`` -> additive in ``dtype`` (the model's compute dtype), ``"flex_attention"`` ->
        BlockMask (all queries only). flash-attention kernels cannot take an arbitrary mask:
        ValueError. ``first_query``: the rows from that query on (L: the candidates' pass)."""
        impl = attn_implementation or "eager"
        if impl == "sdpa":
            return self.sdpa_mask(first_query)
        if impl == "eager":
            return self.eager_mask(dtype, first_query)
        if impl == "flex_attention" and first_query == 0:
            return self.block_mask()
        raise ValueError(
            f"attn_implementation {impl!r} cannot take TPA's branch mask: use 'sdpa', 'eager' or "
            "'flex_attention' (expanded forward only) for TPA"
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


def _drop_latest(steps: torch.Tensor, budget: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep, per sample, the slots of the earliest steps whose total slot count fits `budget`
    (whole steps only), set the rest to -1, and compact kept slots to the left (stable); the
    result has min(C, budget) columns, with the gather order of the kept slots."""
    big = torch.iinfo(torch.int64).max
    key = torch.where(steps >= 0, steps, torch.full((), big, device=steps.device))
    srt = key.sort(1).values
    # number of filled slots whose step is <= this slot's step
    count_le = torch.searchsorted(srt.contiguous(), key.contiguous(), right=True)
    keep = (steps >= 0) & (count_le <= budget)
    order = (~keep).to(torch.int8).argsort(dim=1, stable=True)
    kept = torch.where(keep, steps, torch.full((), -1, device=steps.device)).gather(1, order)
    return kept[:, :budget], order[:, :budget]


def _check_slot_contents(slot_steps, slot_cands, mask, labels, vocab_size, forbidden_ids) -> None:
    """The content checks of `build_expanded_batch` (one host sync each): every filled slot's
    step is a real token in [1, L) (a response position when labels are given) and its
    candidate is in the vocabulary and not forbidden."""
    length = mask.shape[1]
    filled = slot_steps >= 0
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
        off = filled & (labels.to(slot_steps.device).gather(1, safe) == IGNORE_INDEX)
        if bool(off.any()):
            raise ValueError(f"steps must be response positions (labels != -100), got positions "
                             f"outside the response e.g. {slot_steps[off][:5].tolist()}")
    if vocab_size is not None:
        oov = filled & ((slot_cands < 0) | (slot_cands >= vocab_size))
        if bool(oov.any()):
            raise ValueError(f"candidates must be token ids in [0, {vocab_size}) (vocab_size), got e.g. "
                             f"{slot_cands[oov][:5].tolist()}")
    if forbidden_ids:  # a sorted list of ints (forbidden_list)
        fb = torch.tensor(forbidden_ids, dtype=torch.int64, device=slot_steps.device)
        hit = filled & torch.isin(slot_cands, fb)
        if bool(hit.any()):
            raise ValueError(f"candidates hold forbidden_ids, e.g. {slot_cands[hit][:5].tolist()}")


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
            Multimodal RoPE (Qwen-VL): [R, B, L], one row per component (temporal, height,
            width); a candidate of step t takes y_t's ids in every component.
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
    check_tensor("input_ids", input_ids, ndim=2, dtypes=INDEX_DTYPES)
    b_size, length = input_ids.shape
    device = input_ids.device
    check_tensor("attention_mask", attention_mask, ndim=2)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask must have the shape of input_ids {list(input_ids.shape)}, "
                         f"got {describe(attention_mask)}")
    check_tensor("steps", steps, ndim=2, dtypes=INDEX_DTYPES)
    check_dim("steps", steps, 0, b_size, "the batch size of input_ids")
    check_tensor("candidates", candidates, ndim=(2, 3), dtypes=INDEX_DTYPES)
    check_dim("candidates", candidates, 0, b_size, "the batch size of input_ids")
    if labels is not None:
        check_tensor("labels", labels, ndim=2, dtypes=INDEX_DTYPES)
        if labels.shape != input_ids.shape:
            raise ValueError(f"labels must have the shape of input_ids {list(input_ids.shape)}, got {describe(labels)}")
    if position_ids is not None:
        check_tensor("position_ids", position_ids, ndim=(2, 3), dtypes=INDEX_DTYPES)
        if position_ids.shape[-2:] != input_ids.shape:
            raise ValueError(f"position_ids must be [B, L] like input_ids {list(input_ids.shape)} or [R, B, L] "
                             f"(one row per RoPE component), got {describe(position_ids)}")
    if max_expanded_len is not None and (isinstance(max_expanded_len, bool) or not isinstance(max_expanded_len, int)
                                         or max_expanded_len < 1):
        raise ValueError(f"max_expanded_len must be None or an int >= 1, got {max_expanded_len!r}")
    if vocab_size is not None and (isinstance(vocab_size, bool) or not isinstance(vocab_size, int)
                                   or vocab_size < 1):
        raise ValueError(f"vocab_size must be None or an int >= 1, got {vocab_size!r}")
    if isinstance(pad_id, bool) or not isinstance(pad_id, int):
        raise TypeError(f"pad_id must be an int token id, got {pad_id!r}")
    forbidden_ids = forbidden_list(forbidden_ids)
    slot_steps, slot_cands = _flatten_slots(steps.to(device).long(), candidates.to(device).long())
    mask = attention_mask.to(device).bool()
    filled = slot_steps >= 0

    if value_checks_enabled() and slot_steps.numel():
        _check_slot_contents(slot_steps, slot_cands, mask, labels, vocab_size, forbidden_ids)

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
    # a candidate takes y_t's position id, in every RoPE component ([R, B, L] ids: one gather per row)
    slot_pos = position_ids.gather(-1, safe.expand(*position_ids.shape[:-2], *safe.shape))
    pos = torch.cat([position_ids, torch.where(filled, slot_pos, zero)], -1)
    real = torch.cat([mask.long(), filled.long()], 1)
    targets = None
    if labels is not None:
        ign = torch.full((b_size, n_slots), IGNORE_INDEX, dtype=torch.int64, device=device)
        targets = torch.cat([next_token_targets(labels.to(device).long()), ign], 1)
    ar = torch.arange(length, device=device)
    limit = torch.cat([ar.expand(b_size, length), torch.where(filled, slot_steps - 1, zero - 1)], 1)
    key_real = torch.cat([mask, torch.zeros(b_size, n_slots, dtype=torch.bool, device=device)], 1)
    return ExpandedBatch(
        input_ids=ids, position_ids=pos, attention_mask=real, targets=targets,
        steps=slot_steps, candidates=torch.where(filled, slot_cands, torch.full((), pad_id, device=device)),
        query_limit=limit, key_real=key_real, length=length,
    )
