"""align-ti: fused kernels and a thin trainer for distilling multimodal LLMs with Align-TI.

`import align_ti` stays light: the public ops are imported on first use (PEP 562), so the
CLI's help, the config loader and the references do not pay for triton or transformers.
"""
from __future__ import annotations

from align_ti._lazy import lazy_exports

__version__ = "0.1.0"


# public name -> module that defines it
_LAZY = {
    "fused_linear_kl": "align_ti.ops.fused_kl",
    "fused_linear_distill": "align_ti.ops.fused_kl",
    "fused_kl": "align_ti.ops.fused_kl",
    "attention_mass": "align_ti.ops.attention_mass",
    "topk_align": "align_ti.ops.topk_align",
    "select_topk": "align_ti.ops.topk_align",
    "topk_weights": "align_ti.ops.topk_align",
    "topk_feature_align": "align_ti.ops.topk_align",
    "FeatureProjection": "align_ti.ops.topk_align",
    "build_expanded_batch": "align_ti.ops.branches",
    "ExpandedBatch": "align_ti.ops.branches",
    "select_branch_steps": "align_ti.ops.branches",
    "sample_candidates": "align_ti.ops.branches",
    "forbidden_token_ids": "align_ti.ops.branches",
    "expanded_hidden_states": "align_ti.ops.branches",
    "ground_truth_pass": "align_ti.ops.branches",
    "candidate_hidden_states": "align_ti.ops.branches",
    "prefix_cache_unsupported": "align_ti.ops.branches",
    "tpa_loss": "align_ti.ops.branches",
    "capture_qk": "align_ti.models.capture",
    "irs_scores": "align_ti.models.irs",
    "run_irs": "align_ti.models.irs",
    "load_calibration_pairs": "align_ti.models.irs",
    "IRSResult": "align_ti.models.irs",
    "set_value_checks": "align_ti.validation",
    "native_available": "align_ti.native",
}


__getattr__, __dir__ = lazy_exports("align_ti", _LAZY, globals())


__all__ = ["__version__", *_LAZY]
