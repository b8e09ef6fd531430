"""IVA: top-k visual-token selection (`select_topk`), the weighted vocabulary alignment at the
selected tokens fused with both LM heads (`topk_align`), and the optional feature-level
variant (`topk_feature_align`, `FeatureProjection`).

Modules: `selection` (the selection and its checks), `gather` (the Triton driver with the row
gather fused into its matmuls, impl="triton"), `autograd` (the custom ops
`align_ti::topk_align` and its backward), `api` (`topk_align`), `feature` (the feature-level
variant). impl="auto"/"torch" run the fused KL's driver (`align_ti.ops.fused_kl`) on the
selected rows.
"""
from align_ti.ops.topk_align.api import topk_align
from align_ti.ops.topk_align.feature import FeatureProjection, topk_feature_align
from align_ti.ops.topk_align.selection import select_topk, topk_weights

__all__ = ["select_topk", "topk_weights", "topk_align", "topk_feature_align", "FeatureProjection"]
