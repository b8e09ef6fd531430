"""L_TPA: the vocabulary divergence between teacher and student at the candidate rows of the two
expanded forwards, through the fused KL op (the LM heads run on the candidate rows only).
"""
from __future__ import annotations

from typing import Optional

import torch

from align_ti.ops.branches.batch import ExpandedBatch
from align_ti.ops.fused_kl import fused_linear_kl
from align_ti.validation import check_tensor, describe


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
    weights = batch.candidate_valid.to(device=student_hidden.device, dtype=torch.float32)
    return fused_linear_kl(
        student_hidden.reshape(-1, student_hidden.shape[-1]), student_weight,
        teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).detach(), teacher_weight.detach(),
        rows=rows, weights=weights, divergence=divergence, beta=beta, temperature=temperature,
        vocab_size=vocab_size, reduction=reduction, student_bias=student_bias,
        teacher_bias=None if teacher_bias is None else teacher_bias.detach(), impl=impl,
        chunk_bytes=chunk_bytes, fp32_weight_grad=fp32_weight_grad,
    )
