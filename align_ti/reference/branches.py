"""Plain-PyTorch definition of TPA's expanded sequences (DESIGN.md, appended layout).

The ground-truth stream keeps its L tokens and position ids. After it come C candidate slots
per sample (C = the largest candidate count in the batch; shorter samples leave slots empty).
A candidate slot c of sample b holds a token that is an alternative to the ground-truth token
at index t = steps[b, c] (1 <= t < L, a real token); steps[b, c] = -1 marks an empty slot.

- position ids: ground-truth tokens keep theirs (by default `cumsum(attention_mask) - 1`,
  i.e. 0..L-1 for right padding); a candidate for step t takes the position id of token t.
- mask (query i may see key j):
  * ground-truth query i: keys j <= i of the ground-truth stream with attention_mask[j] = 1,
    and itself (so a padding query's row is never empty; nothing reads that row);
  * candidate for step t: ground-truth keys j < t with attention_mask[j] = 1, and itself;
  * empty slot: itself only;
  * no query but a candidate itself sees a candidate key.
- targets (per row, for the losses, never `labels=` to the model): ground-truth row i ->
  labels[i + 1] (the next token, or -100); candidate and empty rows -> -100.
This is a loop-based oracle for tests and benchmarks; the fast builder lives in
align_ti/ops/branches/. A leaf: it imports only torch and checks no argument (the ops do, and
their tests give it bad input); an index it cannot use fails as plain indexing does.
"""
from __future__ import annotations

import torch

IGNORE_INDEX = -100  # the oracle's own copy of align_ti.constants.IGNORE_INDEX


def _position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """0.. over real tokens, counted in a loop. An intentional twin of
    align_ti.ops.branches.default_position_ids (an oracle shares no code with what it checks)."""
    pos = torch.zeros(attention_mask.shape, dtype=torch.long)
    for b in range(attention_mask.shape[0]):
        seen = 0
        for i in range(attention_mask.shape[1]):
            if attention_mask[b, i]:
                seen += 1
            pos[b, i] = max(seen - 1, 0)  # padding: the last real position (0 before any)
    return pos


def expanded_batch_reference(input_ids, attention_mask, steps, candidates, labels=None, pad_id=0, position_ids=None):
    """-> dict(input_ids [B, T], position_ids [B, T], attention_mask [B, T] (1 = real token or
    filled candidate slot), allowed bool [B, T, T], targets [B, T] or None), T = L + C."""
    b_size, length = input_ids.shape
    mask = attention_mask.bool()
    if position_ids is None:
        position_ids = _position_ids(attention_mask)

    n_cand = steps.shape[1]
    total = length + n_cand
    ids = torch.full((b_size, total), pad_id, dtype=torch.long)
    pos = torch.zeros((b_size, total), dtype=torch.long)
    real = torch.zeros((b_size, total), dtype=torch.long)
    allowed = torch.zeros((b_size, total, total), dtype=torch.bool)
    targets = None if labels is None else torch.full((b_size, total), IGNORE_INDEX, dtype=torch.long)
    for b in range(b_size):
        ids[b, :length] = input_ids[b]
        pos[b, :length] = position_ids[b]
        real[b, :length] = mask[b].long()
        for i in range(length):
            allowed[b, i, i] = True
            for j in range(i + 1):
                if mask[b, j]:
                    allowed[b, i, j] = True
            if targets is not None and i + 1 < length:
                targets[b, i] = labels[b, i + 1]
        for c in range(n_cand):
            row = length + c
            allowed[b, row, row] = True
            t = int(steps[b, c])
            if t < 0:
                continue
            ids[b, row] = candidates[b, c]
            pos[b, row] = position_ids[b, t]
            real[b, row] = 1
            for j in range(t):
                if mask[b, j]:
                    allowed[b, row, j] = True
    return {"input_ids": ids, "position_ids": pos, "attention_mask": real, "allowed": allowed, "targets": targets}


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, T, T] bool -> [B, 1, T, T] additive mask for eager attention: 0 where allowed, the
    dtype's most negative finite value elsewhere (a bool mask under eager is silently wrong)."""
    zero = torch.zeros((), dtype=dtype)
    neg = torch.tensor(torch.finfo(dtype).min, dtype=dtype)
    return torch.where(allowed, zero, neg).unsqueeze(1)
