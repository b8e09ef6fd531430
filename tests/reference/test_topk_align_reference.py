"""IVA's top-k selection reference against a brute-force reading of its definition."""
import itertools

import pytest
import torch

from align_ti.reference.topk_align import select_topk_reference, topk_align_reference
from tests.utils import assert_close


def test_by_hand_ties_padding_and_imageless_sample():
    mass = torch.tensor([
        [0.0, 0.3, 0.1, 0.3, 0.2, 0.5],   # vision 1..4: 0.3, 0.1, 0.3, 0.2 ; 5 is text
        [0.9, 0.1, 0.2, 0.0, 0.0, 0.0],   # no vision tokens
        [0.0, 0.0, 0.0, 0.4, 0.6, 0.0],   # vision 3, 4
    ])
    vision = torch.tensor([
        [False, True, True, True, True, False],
        [False] * 6,
        [False, False, False, True, True, False],
    ])
    rows, w = select_topk_reference(mass, vision, k=3)
    # sample 0: top-3 of {1: .3, 2: .1, 3: .3, 4: .2} -> 1, 3, 4 ; sample 2: k clamped to 2
    assert rows.tolist() == [1, 3, 4, 2 * 6 + 3, 2 * 6 + 4]
    assert_close(w, torch.tensor([0.375, 0.375, 0.25, 0.4, 0.6]))
    rows, w = select_topk_reference(mass, vision, k=1)
    assert rows.tolist() == [1, 16]  # tie 0.3 at 1 and 3: the lower position wins


def test_all_zero_mass_gives_zero_weights_not_nan():
    mass = torch.zeros(1, 4)
    vision = torch.tensor([[True, True, True, False]])
    rows, w = select_topk_reference(mass, vision, k=2)
    assert rows.tolist() == [0, 1] and w.tolist() == [0.0, 0.0]


@pytest.mark.parametrize("ratio, expected", [(0.1, 1), (0.5, 3), (1.0, 5), (0.41, 3)])
def test_ratio_counts(ratio, expected):
    mass = torch.rand(1, 7)
    vision = torch.tensor([[False, True, True, True, True, True, False]])
    rows, _ = select_topk_reference(mass, vision, ratio=ratio)
    assert rows.numel() == expected


def test_default_keeps_all_vision_tokens_weighted():
    mass = torch.rand(2, 9)
    vision = torch.rand(2, 9) > 0.4
    rows, w = select_topk_reference(mass, vision)
    assert rows.tolist() == vision.flatten().nonzero().flatten().tolist()
    for b in range(2):
        sel = (rows // 9) == b
        assert_close(w[sel], mass[b][vision[b]] / mass[b][vision[b]].sum())


def test_brute_force_subsets():
    mass = torch.rand(3, 8)
    vision = torch.rand(3, 8) > 0.3
    rows, w = select_topk_reference(mass, vision, k=3)
    for b in range(3):
        pos = vision[b].nonzero().flatten().tolist()
        best = max(itertools.combinations(pos, min(3, len(pos))), key=lambda s: sum(mass[b, j] for j in s))
        assert sorted(r - 8 * b for r in rows.tolist() if r // 8 == b) == sorted(best)


def test_zero_mass_rows_with_infinite_divergence_add_nothing():
    """-inf in the teacher's bias where the student's allows: reverse KL is +inf at
    every row, but kept rows of mass 0 weigh 0: the loss is 0 and the gradients are 0, not NaN."""
    g = torch.Generator().manual_seed(0)
    hs = torch.randn(2, 5, 4, generator=g, requires_grad=True)
    ws = torch.randn(11, 4, generator=g, requires_grad=True)
    ht, wt = torch.randn(2, 5, 6, generator=g), torch.randn(11, 6, generator=g)
    bt = torch.zeros(11)
    bt[[2, 7]] = float("-inf")
    vision = torch.tensor([[False, True, True, True, False], [True, True, False, False, False]])
    loss = topk_align_reference(hs, ws, ht, wt, torch.zeros(2, 5), vision, k=2, divergence="reverse",
                                teacher_bias=bt)
    loss.backward()
    assert loss.item() == 0.0
    assert (hs.grad == 0).all() and (ws.grad == 0).all()
    mass = torch.rand(2, 5, generator=g)  # positive weights: the +inf shows
    assert topk_align_reference(hs, ws, ht, wt, mass, vision, divergence="reverse",
                                teacher_bias=bt).item() == float("inf")
