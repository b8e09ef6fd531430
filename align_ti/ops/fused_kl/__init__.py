"""Vocabulary divergence fused with both LM heads: `fused_linear_kl`, `fused_linear_distill`,
`fused_kl`.

The selected rows are processed in row chunks sized by bytes. For a chunk of r rows both LM
heads are applied with an fp32 result (bf16/fp16 logits are never rounded before the softmax),
giving [r, V] fp32 logits for that chunk only; the chunk step then computes the log-sum-exps,
the divergence, the CE and the gradient with respect to the raw student logits, and the
gradient matmuls follow, so no logits are recomputed. Memory: one chunk of both heads' logits
plus the gradient accumulators.

Modules, from the leaves up:

- `options`: option types (KLOptions, FusedKLOptions) and the input checks.
- `rows`: the row plan (indices or a mask applied inside), row weights and reductions.
- `chunk_torch`: the chunk step in PyTorch (impl="torch").
- `chunk_op`: the chunk step as the custom ops `align_ti::kl_chunk` / `kl_chunk_into`, the
  schema that the native CPU kernel (align_ti.native, csrc/) implements.
- `chunk_triton`: the chunk step on the Triton row kernel (kernels/fused_kl.py).
- `matmuls`: the LM-head and gradient matmuls with an fp32 result.
- `driver`: every row chunk of a call, on the chosen chunk implementation.
- `autograd`: the custom ops `align_ti::fused_linear_kl` / `fused_kl` with their backward ops,
  fake tensors and autograd (torch.compile traces through them).
- `api`: the public functions.
"""
from align_ti.ops.fused_kl.api import fused_kl, fused_linear_distill, fused_linear_kl
# ops/branches imports the chunk logits helper from here
from align_ti.ops.fused_kl.matmuls import head_logits as _head_logits  # noqa: F401

__all__ = ["fused_linear_kl", "fused_linear_distill", "fused_kl"]
