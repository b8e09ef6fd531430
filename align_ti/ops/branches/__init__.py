"""TPA (transition probability alignment, METHOD.md "TPA"): branched steps, candidates, the
expanded batch with its masks, the model run on it, and the transition loss.

One training step of TPA, per batch (DESIGN.md "TPA expanded sequences"):

1. ``steps = select_branch_steps(labels, attention_mask, fraction=..., max_per_sample=...,
   seed=..., sample_ids=..., epoch=...)`` -- which response positions are branched ([B, S],
   ascending, -1 = empty).  (`steps.py`)
2. The student's final hidden states of the ground truth ``h`` [B, L, H] -- the training
   forward itself, run by ``prefix = ground_truth_pass(student, ...)``, which keeps every
   layer's keys and values -- give ``cands = sample_candidates(h, student_head_weight,
   input_ids, steps, num_candidates=d, ...)``, d candidates per step ([B, S, d]) drawn through
   the student head in row chunks.  (`sampling.py`, `forward.py`)
3. ``batch = build_expanded_batch(input_ids, attention_mask, steps, cands, labels=labels,
   pad_id=..., position_ids=...)`` -- the expanded batch (an :class:`ExpandedBatch`: the
   candidates appended after the ground truth, position ids, targets, and the mask as bool,
   additive or BlockMask).  (`batch.py`)
4. ``candidate_hidden_states(student, batch, prefix)`` runs only the candidate tokens over the
   cached prefix ([B, C, H]); the teacher likewise under no_grad. The other way,
   ``expanded_hidden_states(model, batch)``, runs ground truth and candidates in one forward
   (after a no-grad pass for the sampling): the same hidden states and gradients, at the cost
   of attention over the whole [T, T] square; it serves where `prefix_cache_unsupported` says
   the cache cannot (gradient checkpointing, sliding windows, dynamic RoPE, FlexAttention), and
   as the oracle.  (`forward.py`)
5. ``tpa = tpa_loss(hs, W_s, ht, W_t, batch, divergence=...)`` over ``hs``, ``ht`` [B, T, H]
   (T = L + C: the ground-truth rows, then the candidate rows); the ground-truth rows serve
   SFT/KD/IVA (:meth:`ExpandedBatch.ground_truth`, :meth:`ExpandedBatch.expand_rows`,
   ``batch.targets``).  (`loss.py`)

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
from align_ti.ops.branches.forward import (
    PrefixPass,
    candidate_hidden_states,
    expanded_hidden_states,
    ground_truth_pass,
    prefix_cache_unsupported,
)
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
    "ground_truth_pass",
    "candidate_hidden_states",
    "prefix_cache_unsupported",
    "PrefixPass",
    "tpa_loss",
    "sample_keys",
    "branch_count",
    "eligible_steps",
    "default_position_ids",
    "next_token_targets",
]
