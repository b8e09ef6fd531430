"""Constants that several modules share: each is defined here once.

Plain Python, no imports: the config loader and `align-ti --help` read it without torch.
(The references in `align_ti.reference` keep their own copies: an oracle imports only torch.)
"""

IGNORE_INDEX = -100
"""A label (or per-row target) that carries no loss: the prompt, padding, the last row."""

DIVERGENCES = ("forward", "reverse", "jsd")
"""The vocabulary divergences of the fused KL ops (and of KD, IVA and TPA in the trainer)."""

IMPLS = ("auto", "triton", "torch")
"""``impl=`` of the ops: Triton on CUDA tensors and chunked PyTorch elsewhere, or one forced."""

TPA_STRATEGIES = ("sample", "topk")
"""How TPA draws its d candidates per step: Gumbel-top-d sampling, or the d most likely."""

TPA_FORWARDS = ("auto", "prefix_cache", "expanded")
"""How TPA runs its candidates: over a cached ground-truth prefix (the training forward's own
keys and values), in one expanded forward per model, or the first where the models allow it."""

ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flex_attention")
"""Language-model attention implementations that take TPA's 4-D branch mask."""

BAD_SAMPLES = ("error", "skip")
"""What loading LLaVA data does with a sample that would not train as written."""

KL_PASSES = ("single", "per_term")
"""How the trainer runs the fused KL ops: one call over the rows of every term (SFT, KD, IVA,
TPA), or one call per term (the same loss; a benchmark's and a test's comparison)."""

TEACHER_SHARDINGS = ("replicate", "fsdp")
"""Where the frozen teacher lives with several processes: whole on each, or sharded with FSDP2."""
