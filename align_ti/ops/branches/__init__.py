"""TPA (transition probability alignment, METHOD.md "TPA"): branched steps, candidates, the
expanded batch with its masks, the model run on it, and the transition loss.

One training step of TPA, per batch (DESIGN.md "TPA expanded sequences"):

1. ``steps = select_branch_steps(labels, attention_mask, fraction=..., max_per_sample=...,
   seed=..., sample_ids=..., epoch=...)`` -- which response positions are branched ([B, S],
   ascending, -1 = empty).  (`steps.py`)
2. A no-grad student pass over the original batch gives its final hidden states ``h`` [B, L, H];
   ``cands = sample_candidates(h, student_head_weight, input_ids, steps, num_candidates=d, ...)``
   draws d candidates per step ([B, S, d]) through the student head in row chunks.
   (`sampling.py`)
3. ``batch = build_expanded_batch(input_ids, attention_mask, steps, cands, labels=labels,
   pad_id=..., max_expanded_len=...)`` -- the expanded batch (an :class:`ExpandedBatch`: the
   candidates appended after the ground truth, position ids, targets, and the mask as bool,
   additive or BlockMask).  (`batch.py`)
4. ``hs = expanded_hidden_states(student, batch, pixel_values=...)`` and the same for the
   teacher (under no_grad): final hidden states [B, T, H], T = L + C, from one forward each.
   (`forward.py`)
5. ``tpa = tpa_loss(hs, W_s, ht, W_t, batch, divergence=...)``; the ground-truth rows for
   SFT/KD/IVA are the first L rows of each sample of the same forwards
   (:meth:`ExpandedBatch.ground_truth`, :meth:`ExpandedBatch.expand_rows`, ``batch.targets``).
   (`loss.py`)

Randomness is counter-based (`rng.py`): every random number is a hash of (seed, sample id,
epoch, step, token id), so branched positions and candidates of a sample do not depend on the
batch it is in, on the padding, on the chunking or on the number of processes.

The loop-based oracle of the expanded batch is ``align_ti.reference.branches``.
"""
from align_ti.ops.branches.batch import (
    ExpandedBatch,
    build_expanded_batch,
    default_position_ids,
    next_token_targets,
)
from align_ti.ops.branches.forward import expanded_hidden_states
from align_ti.ops.branches.loss import tpa_loss
from align_ti.ops.branches.rng import sample_keys
from align_ti.ops.branches.sampling import forbidden_token_ids, sample_candidates
from align_ti.ops.branches.steps import branch_count, eligible_steps, select_branch_steps

__all__ = [
    "ExpandedBatch",
    "build_expanded_batch",
    "select_branch_steps",
    "sample_candidates",
    "forbidden_token_ids",
    "expanded_hidden_states",
    "tpa_loss",
    "sample_keys",
    "branch_count",
    "eligible_steps",
    "default_position_ids",
    "next_token_targets",
]
