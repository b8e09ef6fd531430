"""The fp32 reference of the vocabulary divergences against a brute-force, row-by-row,
element-by-element float64 form of DESIGN.md's definitions."""
import math
import os
import subprocess
import sys

import pytest
import torch

from align_ti.reference.fused_kl import (
    fused_kl_reference,
    fused_linear_distill_reference,
    fused_linear_kl_reference,
)
from tests.utils import ROOT, assert_close


def _softmax(z):
    m = max(z)
    e = [math.exp(x - m) for x in z]
    s = sum(e)
    return [x / s for x in e]


def _kl(p, q):
    """0 log 0 = 0 (a -inf logit, a mask, gives p = 0); p > 0 = q gives +inf."""
    return sum(pi * (math.log(pi) - math.log(qi)) if qi > 0 else math.inf
               for pi, qi in zip(p, q) if pi > 0)


def brute_force(zs, zt, divergence, beta, temperature, v, rows, weights, reduction):
    """Loops over rows and vocabulary entries in Python floats."""
    n = len(zs)
    idx = list(range(n)) if rows is None else rows
    w = [1.0] * len(idx) if weights is None else weights
    per_row = []
    for i in idx:
        ps = _softmax([x / temperature for x in zs[i][:v]])
        pt = _softmax([x / temperature for x in zt[i][:v]])
        if divergence == "forward":
            d = _kl(pt, ps)
        elif divergence == "reverse":
            d = _kl(ps, pt)
        else:
            m = [beta * a + (1 - beta) * b for a, b in zip(pt, ps)]
            d = beta * _kl(pt, m) + (1 - beta) * _kl(ps, m)
        per_row.append(d)
    wd = [0.0 if wi == 0 else wi * d for wi, d in zip(w, per_row)]  # weight 0 adds 0, +inf too
    if reduction == "none":
        return wd
    if reduction == "sum":
        return sum(wd)
    return sum(wd) / sum(w) if sum(w) > 0 else 0.0


@pytest.mark.parametrize("divergence", ["forward", "reverse", "jsd"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_logits_reference_matches_brute_force(divergence, temperature, reduction):
    n, vs, vt = 7, 13, 17
    zs = torch.randn(n, vs) * 3
    zt = torch.randn(n, vt) * 3
    rows = [5, 0, 3, 3]
    weights = [0.5, 2.0, 0.0, 1.0]
    got = fused_kl_reference(
        zs, zt, rows=torch.tensor(rows), weights=torch.tensor(weights), divergence=divergence,
        beta=0.3, temperature=temperature, reduction=reduction,
    )
    want = brute_force(zs.tolist(), zt.tolist(), divergence, 0.3, temperature, vs, rows, weights, reduction)
    assert_close(got, torch.tensor(want), atol=1e-5, rtol=1e-5)


def test_bool_mask_equals_indices_and_weights_of_length_n():
    zs, zt = torch.randn(6, 11), torch.randn(6, 11)
    mask = torch.tensor([True, False, True, True, False, False])
    w_n = torch.rand(6)
    a = fused_kl_reference(zs, zt, rows=mask, weights=w_n, reduction="none")
    b = fused_kl_reference(zs, zt, rows=mask.nonzero().squeeze(1), weights=w_n[mask], reduction="none")
    c = fused_kl_reference(zs, zt, rows=mask, weights=w_n[mask], reduction="none")
    assert_close(a, b)
    assert_close(a, c)


def test_vocab_slicing_and_linear_form():
    n, hs, ht, vs, vt = 9, 8, 12, 1271, 1300
    h_s, w_s, b_s = torch.randn(n, hs), torch.randn(vs, hs) * 0.3, torch.randn(vs)
    h_t, w_t, b_t = torch.randn(n, ht), torch.randn(vt, ht) * 0.3, torch.randn(vt)
    got = fused_linear_kl_reference(h_s, w_s, h_t, w_t, student_bias=b_s, teacher_bias=b_t, vocab_size=1000)
    zs, zt = h_s @ w_s.t() + b_s, h_t @ w_t.t() + b_t
    want = brute_force(zs.tolist(), zt.tolist(), "forward", 0.5, 1.0, 1000, None, None, "mean")
    assert_close(got, torch.tensor(want), atol=1e-5, rtol=1e-5)


def test_weight_rows_past_vocab_get_no_gradient_and_teacher_none():
    h_s = torch.randn(5, 4, requires_grad=True)
    w_s = torch.randn(20, 4, requires_grad=True)
    h_t = torch.randn(5, 6, requires_grad=True)
    w_t = torch.randn(23, 6, requires_grad=True)
    fused_linear_kl_reference(h_s, w_s, h_t, w_t, vocab_size=15, divergence="jsd").backward()
    assert w_s.grad[15:].abs().max() == 0
    assert w_s.grad[:15].abs().max() > 0
    assert h_t.grad is None and w_t.grad is None


def test_cross_entropy_ignores_labels_and_uses_full_student_vocab():
    n, h, vs, vt = 6, 5, 10, 8
    h_s, w_s = torch.randn(n, h), torch.randn(vs, h)
    h_t, w_t = torch.randn(n, h), torch.randn(vt, h)
    labels = torch.tensor([9, -100, 3, -100, 0, 8])
    _, ce = fused_linear_distill_reference(h_s, w_s, h_t, w_t, labels=labels, temperature=3.0)
    z = h_s @ w_s.t()
    keep = labels != -100
    want = torch.nn.functional.cross_entropy(z[keep], labels[keep])
    assert_close(ce, want)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_zero_rules_no_rows_and_zero_weights(reduction):
    h_s = torch.randn(4, 3, requires_grad=True)
    w_s = torch.randn(7, 3, requires_grad=True)
    h_t, w_t = torch.randn(4, 3), torch.randn(7, 3)
    for rows, weights in [(torch.zeros(0, dtype=torch.long), None),
                          (torch.zeros(4, dtype=torch.bool), None),
                          (None, torch.zeros(4))]:
        h_s.grad = w_s.grad = None
        kl, ce = fused_linear_distill_reference(
            h_s, w_s, h_t, w_t, labels=torch.full((4,), -100) if rows is None or rows.dtype == torch.bool else torch.zeros(0, dtype=torch.long),
            rows=rows, weights=weights, reduction=reduction,
        )
        (kl + ce).backward()
        assert kl.item() == 0 and ce.item() == 0
        assert torch.isfinite(h_s.grad).all() and h_s.grad.abs().max() == 0
        assert w_s.grad.abs().max() == 0


def test_large_logits_are_finite():
    zs = torch.tensor([[1000.0, -1000.0, 0.0]])
    zt = torch.tensor([[-1000.0, 1000.0, 0.0]])
    for div in ["forward", "reverse", "jsd"]:
        assert torch.isfinite(fused_kl_reference(zs, zt, divergence=div))


# --- -inf logits as vocabulary masks: 0 log 0 = 0 --------------------------------

NEG = float("-inf")


def _masked(z, cols):
    z = z.clone()
    z[:, cols] = NEG
    return z


# columns masked by: the teacher only, the student only, both; and which divergences are +inf
_MASKS = {
    "teacher": ([1, 4, 5, 12], [], ("reverse",)),
    "student": ([], [0, 6, 7], ("forward",)),
    "both": ([2, 3, 9], [2, 3, 9], ()),
    "mixed": ([2, 3, 9, 11], [2, 3, 9], ("reverse",)),  # both on 2, 3, 9; the teacher on 11
}


@pytest.mark.parametrize("case", list(_MASKS))
@pytest.mark.parametrize("divergence", ["forward", "reverse", "jsd"])
def test_minus_inf_masks_match_brute_force(divergence, case):
    t_cols, s_cols, infinite = _MASKS[case]
    n, vs, vt = 5, 13, 15
    zs = _masked(torch.randn(n, vs) * 3, s_cols).requires_grad_()
    zt = _masked(torch.randn(n, vt) * 3, t_cols + [13, 14])  # past V' = 13: no effect
    weights = [0.5, 2.0, 0.0, 1.0, 1.5]
    got = fused_kl_reference(zs, zt, weights=torch.tensor(weights), divergence=divergence,
                             beta=0.3, temperature=2.0, reduction="none")
    want = brute_force(zs.tolist(), zt.tolist(), divergence, 0.3, 2.0, vs, None, weights, "none")
    assert_close(got, torch.tensor(want), atol=1e-5, rtol=1e-5)
    assert got[2] == 0  # weight 0: exactly 0, also where D = +inf
    assert torch.isinf(got[[0, 1, 3, 4]]).all() == (divergence in infinite)
    if divergence in infinite:
        return
    got.sum().backward()
    assert torch.isfinite(zs.grad).all()
    assert (zs.grad[:, s_cols] == 0).all()  # a masked student column gets no gradient
    assert (zs.grad[2] == 0).all()


@pytest.mark.parametrize("divergence", ["forward", "reverse", "jsd"])
def test_both_masked_equals_the_unmasked_columns(divergence):
    """Columns masked in both models add nothing: value and gradient are those of the same
    divergence over the other columns alone (and the masked columns get no gradient)."""
    cols = [0, 3, 4, 10]
    keep = [j for j in range(12) if j not in cols]
    zs, zt = torch.randn(6, 12) * 2, torch.randn(6, 12) * 2
    a = _masked(zs, cols).requires_grad_()
    b = zs[:, keep].clone().requires_grad_()
    got = fused_kl_reference(a, _masked(zt, cols), divergence=divergence, temperature=1.5)
    want = fused_kl_reference(b, zt[:, keep], divergence=divergence, temperature=1.5)
    assert_close(got, want, atol=1e-6, rtol=1e-5)
    got.backward()
    want.backward()
    assert_close(a.grad[:, keep], b.grad, atol=1e-7, rtol=1e-5)
    assert (a.grad[:, cols] == 0).all()


def test_teacher_masked_forward_gradient_is_p_s_minus_p_t():
    """d KL(p_T || p_S) / d z_S = (p_S - p_T) / T with p_T = 0 on the teacher's masked columns."""
    zs = (torch.randn(4, 9) * 2).requires_grad_()
    zt = _masked(torch.randn(4, 9) * 2, [0, 5, 6])
    loss = fused_kl_reference(zs, zt, temperature=2.0, reduction="sum")
    want = brute_force(zs.tolist(), zt.tolist(), "forward", 0.5, 2.0, 9, None, None, "sum")
    assert_close(loss, torch.tensor(want), atol=1e-5, rtol=1e-5)
    loss.backward()
    want = (torch.softmax(zs.detach() / 2, -1) - torch.softmax(zt / 2, -1)) / 2
    assert_close(zs.grad, want, atol=1e-7, rtol=1e-5)


def test_minus_inf_bias_linear_form_and_vocab_slice():
    """-inf entries of the biases are masks too, also with Vs != Vt; entries past V' do not
    change the divergence, a student entry there only the CE; a masked label gives CE +inf."""
    n, h, vs, vt, v = 6, 5, 14, 12, 10
    h_s, w_s = torch.randn(n, h, requires_grad=True), torch.randn(vs, h, requires_grad=True)
    h_t, w_t = torch.randn(n, h), torch.randn(vt, h)
    b_s, b_t = torch.zeros(vs), torch.zeros(vt)
    b_s[[1, 7, 12]] = NEG  # 12 >= V': CE only
    b_t[[1, 7, 3, 11]] = NEG  # 3: the teacher only; 11 >= V': nothing
    labels = torch.tensor([0, 2, -100, 13, 4, 5])
    kl, ce = fused_linear_distill_reference(h_s, w_s, h_t, w_t, labels=labels, vocab_size=v,
                                            student_bias=b_s, teacher_bias=b_t)
    zs, zt = h_s @ w_s.t() + b_s, h_t @ w_t.t() + b_t
    want = brute_force(zs.tolist(), zt.tolist(), "forward", 0.5, 1.0, v, None, None, "mean")
    assert_close(kl, torch.tensor(want), atol=1e-5, rtol=1e-5)
    keep = labels != -100
    assert_close(ce, torch.nn.functional.cross_entropy(zs[keep], labels[keep]), atol=1e-6, rtol=1e-5)
    (kl + ce).backward()
    assert torch.isfinite(h_s.grad).all() and torch.isfinite(w_s.grad).all()
    assert (w_s.grad[[1, 7, 12]] == 0).all()
    _, ce_masked = fused_linear_distill_reference(h_s, w_s, h_t, w_t, labels=torch.tensor([7] * n),
                                                  vocab_size=v, student_bias=b_s, teacher_bias=b_t)
    assert ce_masked.item() == math.inf


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "all_masked"])
def test_rows_without_a_distribution_are_nan(bad):
    zs, zt = torch.randn(3, 8), torch.randn(3, 8)
    if bad == "all_masked":
        zs[1] = NEG
    else:
        zs[1, 4] = bad
    for div in ["forward", "reverse", "jsd"]:
        d = fused_kl_reference(zs, zt, divergence=div, reduction="none")
        assert torch.isnan(d[1]) and torch.isfinite(d[[0, 2]]).all(), (div, d)


def test_the_reference_is_a_leaf_that_imports_only_torch():
    """The oracle shares no code with the ops it checks (their input checks and options live
    on the ops side): importing it loads no other part of align_ti."""
    code = ("import sys, align_ti\n"
            "before = set(sys.modules)\n"
            "import align_ti.reference.fused_kl, align_ti.reference.topk_align\n"
            "new = sorted(m for m in set(sys.modules) - before if m.startswith('align_ti'))\n"
            "assert 'align_ti.reference.fused_kl' in new, new\n"
            "assert all(m.startswith('align_ti.reference') for m in new), new\n"
            "print(new)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=ROOT))
    assert out.returncode == 0, out.stdout + out.stderr
