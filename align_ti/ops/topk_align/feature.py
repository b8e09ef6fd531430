"""Feature-level IVA (optional; off by default in the trainer): cosine distance or MSE between
student and teacher hidden states at `topk_align`'s selected vision tokens."""
from __future__ import annotations

import torch

from align_ti.ops.topk_align.api import check_sequence_inputs
from align_ti.ops.topk_align.selection import NORMALIZE, check_selection_args, selected_rows
from align_ti.validation import check_choice, check_same_device

FEATURE_LOSSES = ("cosine", "mse")
_F32 = torch.float32


class FeatureProjection(torch.nn.Module):
    """A learnable linear map from student width Hs to teacher width Ht for
    `topk_feature_align` (identity-free: use no projection when the widths agree).
    Initialised so that a square map is the identity and a rectangular one is a scaled
    orthogonal map; trains with the student."""

    def __init__(self, student_width: int, teacher_width: int, bias: bool = False,
                 dtype=None, device=None):
        super().__init__()
        self.proj = torch.nn.Linear(student_width, teacher_width, bias=bias, dtype=dtype, device=device)
        with torch.no_grad():
            torch.nn.init.orthogonal_(self.proj.weight)
            if bias:
                self.proj.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def topk_feature_align(
    student_hidden,
    teacher_hidden,
    mass,
    vision_mask,
    k=None,
    ratio=None,
    normalize="sample",
    loss="cosine",
    projection=None,
):
    """Feature-level IVA variant: cosine distance or MSE between student and teacher hidden
    states at the selected vision tokens, with the selection and weights of `topk_align`.

    ``loss="cosine"``: ``D_j = 1 - cos(P(h_S,j), h_T,j)``; ``loss="mse"``:
    ``D_j = mean_c (P(h_S,j)_c - h_T,j,c)^2``, computed in fp32. P is ``projection`` (e.g. a
    `FeatureProjection` when Hs != Ht, trained with the student) or the identity. The
    reduction over tokens and samples is `topk_align`'s (``normalize``); 0 when no sample
    contributes. The teacher side never gets a gradient.

    Args:
        student_hidden: ``[B, L, Hs]`` (any student layer); gets a gradient.
        teacher_hidden: ``[B, L, Ht]``; detached.
        mass, vision_mask, k, ratio, normalize: as `topk_align`.
        loss: ``"cosine"`` | ``"mse"``.
        projection: a callable ``[M, Hs] -> [M, Ht]`` (nn.Module) or None (then Hs == Ht).

    Returns:
        fp32 scalar. Gathers the M selected rows (``[M, H]``, small next to the vocabulary
        work) in plain PyTorch; one host sync for M on CUDA.

    Raises:
        ValueError / TypeError naming the argument, as `topk_align`, plus an unknown ``loss``
        or a width mismatch without ``projection``.
    """
    check_sequence_inputs(student_hidden, teacher_hidden, mass, vision_mask)
    check_choice("normalize", normalize, NORMALIZE)
    check_choice("loss", loss, FEATURE_LOSSES)
    check_same_device({"student_hidden": student_hidden, "teacher_hidden": teacher_hidden,
                       "mass": mass, "vision_mask": vision_mask})
    check_selection_args(mass, vision_mask, k, ratio)
    if projection is None and student_hidden.shape[2] != teacher_hidden.shape[2]:
        raise ValueError(
            f"student_hidden width {student_hidden.shape[2]} != teacher_hidden width "
            f"{teacher_hidden.shape[2]}: pass projection=FeatureProjection(Hs, Ht)"
        )
    rows, weights = selected_rows(mass, vision_mask, k, ratio, normalize)
    hs = student_hidden.reshape(-1, student_hidden.shape[2]).index_select(0, rows)
    ht = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[2]).index_select(0, rows).float()
    if projection is not None:
        hs = projection(hs)
        if hs.shape[-1] != ht.shape[-1]:
            raise ValueError(f"projection maps to width {hs.shape[-1]}, teacher_hidden has {ht.shape[-1]}")
    hs = hs.float()
    if loss == "cosine":
        d = 1.0 - torch.nn.functional.cosine_similarity(hs, ht, dim=-1, eps=1e-8)
    else:
        d = (hs - ht).pow(2).mean(-1)
    total = weights.sum()
    ok = total > 0
    return torch.where(ok, (weights * d).sum() / torch.where(ok, total, torch.ones_like(total)),
                       torch.zeros((), dtype=_F32, device=d.device))
