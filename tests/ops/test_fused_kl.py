"""fused_linear_kl / fused_linear_distill / fused_kl against the fp32 reference.

Tiers: CPU (impl="torch", always), interpreter (`-m interpret`, impl="triton" on CPU tensors
under TRITON_INTERPRET=1; fp32/fp16 only), GPU (`-m gpu`, CUDA; bf16 three-way, larger shapes).
"""
from __future__ import annotations

import functools
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch

import align_ti
from align_ti.ops.fused_kl import rows as fkl_rows
from align_ti.reference.fused_kl import (
    fused_kl_reference,
    fused_linear_distill_reference,
    fused_linear_kl_reference,
)
from tests.utils import assert_close, assert_three_way, forbid_host_syncs

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
N, HS, HT, VS, VT = 63, 24, 40, 1271, 1300
SMALL_CHUNK = 4 * 4 * (VS + VT) * 3  # a few rows per chunk: exercises the chunk loop


def make(dtype_s=torch.float32, dtype_t=torch.float32, bias=True, n=N, hs=HS, ht=HT, vs=VS, vt=VT,
         device="cpu"):
    g = torch.Generator().manual_seed(1234)
    t = {
        "student_hidden": torch.randn(n, hs, generator=g),
        "student_weight": torch.randn(vs, hs, generator=g) * 0.4,
        "teacher_hidden": torch.randn(n, ht, generator=g),
        "teacher_weight": torch.randn(vt, ht, generator=g) * 0.4,
    }
    if bias:
        t["student_bias"] = torch.randn(vs, generator=g) * 0.2
        t["teacher_bias"] = torch.randn(vt, generator=g) * 0.2
    out = {}
    for k, x in t.items():
        x = x.to(device=device, dtype=dtype_s if k.startswith("student") else dtype_t)
        out[k] = x.requires_grad_(k.startswith("student"))
    return out


STUDENT = ("student_hidden", "student_weight", "student_bias")


def run(fn, tensors, upstream=None, **kw):
    """Call fn, back-propagate (with `upstream` for each output), return (outputs, grads)."""
    for k in STUDENT:
        if k in tensors:
            tensors[k].grad = None
    out = fn(**tensors, **kw)
    outs = out if isinstance(out, tuple) else (out,)
    if upstream is None:
        upstream = [torch.ones_like(o) for o in outs]
    total = sum((o * u).sum() for o, u in zip(outs, upstream))
    total.backward()
    grads = {k: tensors[k].grad.clone() for k in STUDENT if k in tensors}
    for k in STUDENT:
        if k in tensors:
            tensors[k].grad = None
    return [o.detach() for o in outs], grads


def compare(fast, ref, tensors, upstream=None, atol=2e-5, rtol=1e-4, **kw):
    outs, grads = run(fast, tensors, upstream, **kw)
    kw.pop("impl", None)
    kw.pop("chunk_bytes", None)
    routs, rgrads = run(ref, tensors, upstream, **kw)
    for i, (a, b) in enumerate(zip(outs, routs)):
        assert a.dtype == torch.float32
        assert_close(a, b, atol=atol, rtol=rtol, name=f"output {i}")
    for k in grads:
        assert grads[k].dtype == tensors[k].dtype
        assert_close(grads[k], rgrads[k], atol=atol, rtol=rtol, name=f"grad {k}")
    return outs, grads


def rows_of(kind, n=N, m=20, device="cpu"):
    g = torch.Generator().manual_seed(7)
    if kind is None:
        return None, n
    if kind == "index":
        idx = torch.randint(0, n, (m,), generator=g)  # repeats allowed
        return idx.to(device), m
    mask = torch.rand(n, generator=g) < 0.4
    return mask.to(device), int(mask.sum())


def rand_weights(m, device="cpu"):
    return (torch.rand(m, generator=torch.Generator().manual_seed(3)) + 0.1).to(device)


@pytest.fixture
def mask_inside_op(monkeypatch):
    """A bool rows mask applied inside the op (every row processed, unselected rows add 0), as
    on CUDA, instead of turned into indices (`rows.MASK_AS_INDICES_DEVICES`)."""
    monkeypatch.setattr(fkl_rows, "MASK_AS_INDICES_DEVICES", ())


# ============================================================================================
# CPU tier: impl="torch"
# ============================================================================================

def check_ce_weight_folds_the_ce_gradient(impl, device="cpu", n=N, vs=VS, vt=VT, hs=HS, ht=HT, chunk_bytes=None):
    """ce_weight=c: the first output is kl + c * ce and its gradients are those of that sum
    computed with the CE's gradients apart (the default); ce comes back detached; c = 0 adds
    nothing, also with a masked label (ce = +inf)."""
    labels = torch.randint(0, vs, (n,), generator=torch.Generator().manual_seed(2)).to(device)
    labels[::3] = -100
    rows = (torch.rand(n, generator=torch.Generator().manual_seed(4)) > 0.3).to(device)
    for reduction, c in (("sum", 0.7), ("mean", torch.tensor(2.5, device=device))):
        kw = dict(labels=labels, rows=rows, weights=rand_weights(n, device), divergence="jsd", temperature=1.5,
                  reduction=reduction, impl=impl, chunk_bytes=chunk_bytes)
        t = make(n=n, vs=vs, vt=vt, hs=hs, ht=ht, device=device)
        loss, ce = align_ti.fused_linear_distill(**t, ce_weight=c, **kw)
        assert not ce.requires_grad and loss.requires_grad
        loss.backward()
        folded = [t[k].grad.clone() for k in STUDENT]
        t = make(n=n, vs=vs, vt=vt, hs=hs, ht=ht, device=device)
        kl2, ce2 = align_ti.fused_linear_distill(**t, **kw)
        (kl2 + c * ce2).backward()
        assert_close(loss, kl2 + c * ce2, atol=1e-5, rtol=1e-5)
        assert_close(ce, ce2, atol=0, rtol=0)
        for got, k in zip(folded, STUDENT):
            assert_close(got, t[k].grad, atol=2e-6, rtol=1e-4, name=f"grad {k}")
    t = make(n=n, vs=vs, vt=vt, hs=hs, ht=ht, device=device)
    with torch.no_grad():
        t["student_bias"][labels[1]] = float("-inf")  # row 1's label is masked: its CE is +inf
    kw["reduction"] = "sum"
    loss, ce = align_ti.fused_linear_distill(**t, ce_weight=0.0, **kw)
    assert ce.item() == math.inf and torch.isfinite(loss)
    kl = align_ti.fused_linear_kl(**t, **{k: v for k, v in kw.items() if k != "labels"})
    assert_close(loss, kl, atol=1e-6, rtol=1e-6)


def test_ce_weight_folds_the_ce_gradient(torch_chunk_path):
    check_ce_weight_folds_the_ce_gradient("torch")


def test_ce_weight_bad_values():
    t = make()
    labels = torch.zeros(N, dtype=torch.long)
    for bad, exc in ((-1.0, ValueError), (math.inf, ValueError), ("1", ValueError), (True, ValueError),
                     (torch.ones(2), TypeError), (torch.tensor(1.0, requires_grad=True), ValueError),
                     (torch.tensor(-1.0), ValueError)):
        with pytest.raises(exc, match="ce_weight"):
            align_ti.fused_linear_distill(**t, labels=labels, ce_weight=bad)
    with pytest.raises(ValueError, match="ce_weight needs reduction"):
        align_ti.fused_linear_distill(**t, labels=labels, ce_weight=1.0, reduction="none")


@pytest.mark.parametrize("in_op", [False, True])
@pytest.mark.parametrize("rows_kind", [None, "index", "mask"])
def test_row_divergence_reports_each_rows_divergence(rows_kind, in_op, monkeypatch):
    """row_divergence=True adds D_i of every row (unweighted, no gradient) in the caller's
    layout, and leaves the loss, the CE and the gradients as they were: what lets one call serve
    the rows of several losses and still report each."""
    if in_op:
        monkeypatch.setattr(fkl_rows, "MASK_AS_INDICES_DEVICES", ())
    t = make()
    labels = torch.randint(0, VS, (N,), generator=torch.Generator().manual_seed(2))
    labels[::4] = -100
    rows = {None: None, "index": torch.tensor([5, 0, 5, 62, 17]),
            "mask": torch.rand(N, generator=torch.Generator().manual_seed(4)) > 0.5}[rows_kind]
    n_rows = N if rows is None or rows.dtype == torch.bool else rows.shape[0]
    w = rand_weights(n_rows)
    lab = labels if rows is None or rows.dtype == torch.bool else labels[rows]
    kw = dict(rows=rows, weights=w, divergence="jsd", temperature=1.5, reduction="sum", labels=lab)
    kl, ce, d = align_ti.fused_linear_distill(**t, row_divergence=True, **kw)
    assert not d.requires_grad and d.dtype == torch.float32
    (kl + 0.5 * ce).backward()
    grads = [t[k].grad.clone() for k in STUDENT]
    for k in STUDENT:
        t[k].grad = None
    kl2, ce2 = align_ti.fused_linear_distill(**t, **kw)
    (kl2 + 0.5 * ce2).backward()
    assert torch.equal(kl, kl2) and torch.equal(ce, ce2)
    for a, k in zip(grads, STUDENT):
        assert torch.equal(a, t[k].grad), k
    per_row = fused_linear_kl_reference(**{k: x.detach() for k, x in t.items()}, rows=rows, divergence="jsd",
                                        temperature=1.5, reduction="none")
    if rows is not None and rows.dtype == torch.bool:  # [N], 0 at the rows not selected
        assert d.shape == (N,) and (d[~rows] == 0).all()
        assert_close(d[rows], per_row, atol=1e-6, rtol=1e-5)
    else:
        assert d.shape == (n_rows,)
        assert_close(d, per_row, atol=1e-6, rtol=1e-5)
    weighted = (w * d)[rows] if rows is not None and rows.dtype == torch.bool else w * d
    assert_close(weighted.sum(), kl, atol=1e-5, rtol=1e-5)
    loss, d_kl = align_ti.fused_linear_kl(**t, rows=rows, divergence="jsd", temperature=1.5, row_divergence=True)
    assert_close(d_kl, d, atol=0, rtol=0)
    with pytest.raises(TypeError, match="row_divergence"):
        align_ti.fused_linear_kl(**t, row_divergence="yes")


@pytest.mark.parametrize("rows_kind", [None, "index", "mask"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("divergence", ["forward", "reverse", "jsd"])
def test_linear_kl_matches_reference(divergence, temperature, rows_kind):
    t = make()
    rows, m = rows_of(rows_kind)
    compare(align_ti.fused_linear_kl, fused_linear_kl_reference, t, rows=rows,
            weights=rand_weights(m), divergence=divergence, beta=0.3, temperature=temperature,
            impl="torch", chunk_bytes=SMALL_CHUNK)


@pytest.mark.parametrize("divergence", ["forward", "jsd"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions_with_upstream(reduction, divergence):
    t = make()
    rows, m = rows_of("index")
    up = [torch.randn(m) if reduction == "none" else torch.tensor(2.0)]  # random / loss * 2
    compare(align_ti.fused_linear_kl, fused_linear_kl_reference, t, upstream=up, rows=rows,
            weights=rand_weights(m), divergence=divergence, reduction=reduction,
            temperature=2.0, impl="torch", chunk_bytes=SMALL_CHUNK)


def test_loss_times_two_without_weights():
    t = make(bias=False)
    compare(align_ti.fused_linear_kl, fused_linear_kl_reference, t, upstream=[torch.tensor(2.0)],
            impl="torch")


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("rows_kind", ["index", "mask"])
def test_distill_ce_with_ignored_labels(rows_kind, reduction):
    t = make()
    rows, m = rows_of(rows_kind)
    labels = torch.randint(0, VS, (m,))
    labels[::3] = -100
    up = [torch.randn(m) if reduction == "none" else torch.tensor(0.7), torch.tensor(1.3)]
    compare(align_ti.fused_linear_distill, fused_linear_distill_reference, t, upstream=up,
            labels=labels, rows=rows, weights=rand_weights(m), divergence="reverse",
            temperature=2.0, reduction=reduction, impl="torch", chunk_bytes=SMALL_CHUNK)


def test_distill_labels_given_as_n_with_mask():
    t = make()
    mask, m = rows_of("mask")
    labels = torch.randint(0, VS, (N,))
    labels[::4] = -100
    compare(align_ti.fused_linear_distill, fused_linear_distill_reference, t, labels=labels,
            rows=mask, weights=rand_weights(N), impl="torch")


def test_distill_all_labels_ignored():
    t = make()
    labels = torch.full((N,), -100)
    (kl, ce), grads = run(align_ti.fused_linear_distill, t, [torch.tensor(0.0), torch.tensor(1.0)],
                          labels=labels, impl="torch")
    assert ce.item() == 0.0
    for k, g in grads.items():
        assert torch.all(g == 0), k
    compare(align_ti.fused_linear_distill, fused_linear_distill_reference, t, labels=labels,
            impl="torch")


def test_distill_kl_equals_fused_linear_kl():
    t = make()
    labels = torch.randint(0, VS, (N,))
    (kl, _), _ = run(align_ti.fused_linear_distill, t, labels=labels, impl="torch")
    (kl2,), _ = run(align_ti.fused_linear_kl, t, impl="torch")
    assert_close(kl, kl2, atol=1e-6, rtol=1e-6)


def test_explicit_vocab_size_slices_heads():
    t = make()
    v = 1000
    _, grads = compare(align_ti.fused_linear_kl, fused_linear_kl_reference, t, vocab_size=v,
                       temperature=2.0, impl="torch")
    assert torch.all(grads["student_weight"][v:] == 0)
    assert torch.all(grads["student_bias"][v:] == 0)


@pytest.mark.parametrize("sub_blocks", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("divergence", ["forward", "reverse", "jsd"])
def test_fused_kl_logits(divergence, reduction, sub_blocks, monkeypatch):
    if sub_blocks:  # the PyTorch chunk path's elementwise work in 2-row sub-blocks
        from align_ti import native
        from align_ti.ops import heuristics

        monkeypatch.setattr(native, "_enabled_override", False)
        monkeypatch.setitem(heuristics.ELEMENTWISE_BYTES, "cpu", 2 * 4 * 2 * VT)
    g = torch.Generator().manual_seed(5)
    zs = (torch.randn(N, VS, generator=g) * 3).requires_grad_()
    zt = torch.randn(N, VT, generator=g) * 3
    rows, m = rows_of("index")
    up = [torch.randn(m) if reduction == "none" else torch.tensor(2.0)]
    t = {"student_logits": zs, "teacher_logits": zt}
    outs, _ = run(align_ti.fused_kl, t, up, rows=rows, weights=rand_weights(m),
                  divergence=divergence, temperature=2.0, reduction=reduction, impl="torch",
                  chunk_bytes=4 * 4 * VS * 5)
    gf = zs.grad.clone() if zs.grad is not None else None
    zs.grad = None
    routs, _ = run(fused_kl_reference, t, up, rows=rows, weights=rand_weights(m),
                   divergence=divergence, temperature=2.0, reduction=reduction)
    assert_close(outs[0], routs[0], atol=2e-5, rtol=1e-4)
    assert_close(gf, zs.grad, atol=1e-6, rtol=1e-4, name="grad student_logits")


def test_fused_kl_mask_and_bf16_logits():
    g = torch.Generator().manual_seed(5)
    zs = (torch.randn(N, VS, generator=g) * 3).to(torch.bfloat16).requires_grad_()
    zt = (torch.randn(N, VT, generator=g) * 3).to(torch.bfloat16)
    mask, m = rows_of("mask")
    t = {"student_logits": zs, "teacher_logits": zt}
    outs, _ = run(align_ti.fused_kl, t, rows=mask, impl="torch")
    gf = zs.grad.clone()
    zs.grad = None
    routs, _ = run(fused_kl_reference, t, rows=mask)
    assert gf.dtype == torch.bfloat16
    assert_close(outs[0], routs[0], atol=1e-5, rtol=1e-4)
    assert_close(gf, zs.grad, atol=1e-4, rtol=1e-2)


def test_chunk_size_invariance():
    t = make()
    rows, m = rows_of("index")
    labels = torch.randint(0, VS, (m,))
    labels[1] = -100
    results = []
    for chunk in (1, 4 * (VS + VT) * 7, 4 * (VS + VT) * 40, None):
        (kl, ce), grads = run(align_ti.fused_linear_distill, t, labels=labels, rows=rows,
                              weights=rand_weights(m), divergence="jsd", impl="torch",
                              chunk_bytes=chunk)
        results.append((kl, ce, grads))
    for kl, ce, grads in results[1:]:
        assert_close(kl, results[0][0], atol=1e-6, rtol=1e-5)
        assert_close(ce, results[0][1], atol=1e-6, rtol=1e-5)
        for k in grads:
            assert_close(grads[k], results[0][2][k], atol=1e-6, rtol=1e-5, name=k)


@pytest.mark.parametrize("reduction", ["mean", "none"])  # "none": split KL / CE gradients
@pytest.mark.parametrize("divergence", ["forward", "reverse", "jsd"])
def test_elementwise_sub_blocks_match_reference(monkeypatch, divergence, reduction):
    """The torch path's elementwise work in sub-blocks of a row chunk (2 rows here, chunks
    of ~12) gives the reference, split CE gradient included."""
    from align_ti import native
    from align_ti.ops import heuristics

    monkeypatch.setattr(native, "_enabled_override", False)  # the PyTorch chunk path itself
    monkeypatch.setitem(heuristics.ELEMENTWISE_BYTES, "cpu", 2 * 4 * (2 * VT + VS))
    t = make()
    rows, m = rows_of("index")
    labels = torch.randint(0, VS, (m,))
    labels[::3] = -100
    up = [torch.randn(m) if reduction == "none" else torch.tensor(0.7), torch.tensor(1.3)]
    compare(align_ti.fused_linear_distill, fused_linear_distill_reference, t, upstream=up,
            labels=labels, rows=rows, weights=rand_weights(m), divergence=divergence,
            temperature=2.0, reduction=reduction, impl="torch",
            chunk_bytes=4 * 3 * (VS + VT) * 12)


def test_chunk_bytes_env_override(monkeypatch):
    from align_ti.ops import heuristics

    monkeypatch.setenv("ALIGN_TI_CHUNK_BYTES", "64K")
    assert heuristics.chunk_bytes(torch.device("cpu")) == 64 * 1024
    assert heuristics.rows_per_chunk(4 * (VS + VT), torch.device("cpu")) == 64 * 1024 // (4 * (VS + VT))
    t = make()
    compare(align_ti.fused_linear_kl, fused_linear_kl_reference, t, impl="torch")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_zero_weights_give_zero(reduction):
    t = make()
    w = torch.zeros(N)
    up = [torch.randn(N) if reduction == "none" else torch.tensor(1.0)]
    (kl,), grads = run(align_ti.fused_linear_kl, t, up, weights=w, reduction=reduction, impl="torch")
    assert torch.all(kl == 0) and not torch.isnan(kl).any()
    for k, g in grads.items():
        assert torch.all(g == 0), k


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("rows", ["index", "mask"])
def test_empty_rows_give_zero(rows, reduction):
    t = make()
    r = torch.zeros(0, dtype=torch.int64) if rows == "index" else torch.zeros(N, dtype=torch.bool)
    labels = torch.zeros(0 if rows == "index" else N, dtype=torch.int64)
    (kl, ce), grads = run(align_ti.fused_linear_distill, t, labels=labels, rows=r,
                          reduction=reduction, impl="torch")
    assert kl.shape == ((0,) if reduction == "none" else ())
    assert torch.all(kl == 0) and ce.item() == 0.0
    for k, g in grads.items():
        assert torch.all(g == 0), k


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)])
def test_mixed_teacher_student_dtypes(dtypes):
    t = make(*dtypes)
    rows, m = rows_of("index")
    labels = torch.randint(0, VS, (m,))
    # the reference upcasts the same (rounded) inputs to fp32: only accumulation order differs
    compare(align_ti.fused_linear_distill, fused_linear_distill_reference, t, labels=labels,
            rows=rows, temperature=2.0, impl="torch", atol=1e-4, rtol=1e-2)


def _three_way_linear(fn, ref, impl, device="cpu", n=N, hs=HS, ht=HT, vs=VS, vt=VT, bias=True, **kw):
    """Candidate (bf16 inputs) vs plain torch in bf16 vs the fp32 truth on the same inputs.
    bias=False: LM heads without bias (Qwen, LLaMA), where the Triton path writes the
    gradient of the logits in bf16 (a bias gradient keeps it fp32)."""
    lo = make(torch.bfloat16, torch.bfloat16, bias=bias, n=n, hs=hs, ht=ht, vs=vs, vt=vt, device=device)
    hi = {k: x.detach().float().requires_grad_(x.requires_grad) for k, x in lo.items()}
    cand, cgrads = run(fn, lo, impl=impl, **kw)
    truth, tgrads = run(ref, hi, **kw)

    def plain(student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias=None,
              teacher_bias=None, **kw2):
        # what a trainer does in bf16: bf16 logits, then the loss
        zs = torch.nn.functional.linear(student_hidden, student_weight, student_bias)
        zt = torch.nn.functional.linear(teacher_hidden, teacher_weight, teacher_bias)
        labels = kw2.pop("labels", None)
        kl = fused_kl_reference(zs, zt, **kw2)
        if labels is None:
            return kl
        rows = kw2.get("rows")
        zsel = zs if rows is None else zs[rows]
        ce = torch.nn.functional.cross_entropy(zsel.float(), labels, ignore_index=-100)
        return kl, ce

    base, bgrads = run(plain, lo, **kw)
    for i, (c, b, tr) in enumerate(zip(cand, base, truth)):
        assert_three_way(c, b, tr, atol=1e-5, rtol=1e-3, name=f"output {i}")
    for k in cgrads:
        assert cgrads[k].dtype == torch.bfloat16
        assert_three_way(cgrads[k], bgrads[k], tgrads[k], atol=1e-6, rtol=1e-2, name=k)


@pytest.mark.parametrize("divergence", ["forward", "jsd"])
def test_bf16_three_way_torch_path(divergence):
    rows, m = rows_of("index")
    labels = torch.randint(0, VS, (m,))
    _three_way_linear(align_ti.fused_linear_distill, fused_linear_distill_reference, "torch",
                      labels=labels, rows=rows, divergence=divergence, temperature=2.0)


@pytest.mark.parametrize("reduction", ["mean", "none"])  # "none": the backward op recomputes
def test_compile_aot_eager_fullgraph(reduction):
    """fused_linear_kl inside torch.compile(fullgraph=True): no graph break, the reference's
    loss and gradients (aot_eager on CPU; inductor runs in the GPU tier)."""
    t = make()
    rows, m = rows_of("index")
    w = rand_weights(m)
    scale = torch.arange(float(m)) if reduction == "none" else torch.tensor(2.0)

    def loss_fn(student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias,
                teacher_bias):
        kl = align_ti.fused_linear_kl(student_hidden, student_weight, teacher_hidden,
                                      teacher_weight, rows=rows, weights=w, temperature=2.0,
                                      student_bias=student_bias, teacher_bias=teacher_bias,
                                      reduction=reduction, impl="torch")
        return (kl * scale).sum()

    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
    (out,), grads = run(compiled, t)
    (ref,), rgrads = run(lambda **k: (fused_linear_kl_reference(
        **k, rows=rows, weights=w, temperature=2.0, reduction=reduction) * scale).sum(), t)
    assert_close(out, ref, atol=1e-5, rtol=1e-4)
    for k in grads:
        assert_close(grads[k], rgrads[k], atol=1e-5, rtol=1e-4, name=k)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compile_aot_eager_fullgraph_logits(reduction):
    """fused_kl (logits in) inside torch.compile(fullgraph=True), with a bool rows mask."""
    g = torch.Generator().manual_seed(5)
    zs = (torch.randn(N, VS, generator=g) * 3).requires_grad_()
    zt = torch.randn(N, VT, generator=g) * 3
    mask, m = rows_of("mask")
    up = torch.randn(m, generator=g) if reduction == "none" else torch.tensor(2.0)

    def loss_fn(student_logits, teacher_logits):
        return (align_ti.fused_kl(student_logits, teacher_logits, rows=mask, divergence="jsd",
                                  reduction=reduction, impl="torch") * up).sum()

    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
    t = {"student_logits": zs, "teacher_logits": zt}
    out, got = compiled(**t), None
    (got,) = torch.autograd.grad(out, zs)
    ref = (fused_kl_reference(zs, zt, rows=mask, divergence="jsd", reduction=reduction) * up).sum()
    (want,) = torch.autograd.grad(ref, zs)
    assert_close(out, ref, atol=1e-5, rtol=1e-4)
    assert_close(got, want, atol=1e-6, rtol=1e-4, name="grad student_logits")


def _linear_op_arguments(reduction="mean", labels=True, mask=False):
    """align_ti::fused_linear_kl's arguments as its schema names them: the tensors, and the
    options (keywords) that the public function would pass; small shapes."""
    t = make(n=9, hs=8, ht=12, vs=97, vt=101)
    sel = torch.tensor([True, False, True, True, False, True, True, False, True])
    idx = None if mask else torch.tensor([0, 3, 3, 8, 5])
    m = 9 if mask else 5
    y = torch.tensor([1, -100, 96, 7, 0, 3, 2, 1, 5])[:m] if labels else None
    tensors = (t["student_hidden"], t["student_weight"], t["student_bias"],
               t["teacher_hidden"].detach(), t["teacher_weight"].detach(),
               t["teacher_bias"].detach(), idx, sel if mask else None, rand_weights(m), y)
    options = dict(need_dh=True, need_dw=True, need_db=True, fp32_weight_grad=True,
                   divergence="jsd", beta=0.3, temperature=2.0, reduction=reduction, vocab_size=90,
                   impl="torch", chunk_bytes=0)
    return tensors, options


def opcheck_forward(op, tensors, options):
    """opcheck of a forward op. For "mean"/"sum" its backward scales the gradients that the
    forward returned in place (no copy of a [Vs, Hs] gradient), which opcheck's aot_dispatch
    test, differentiating a graph that returns those outputs, cannot express: that path is
    covered by the compile tests through the public functions instead."""
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    recomputes = options["reduction"] == "none" or tensors[0].dtype == torch.float16
    torch.library.opcheck(op, tensors, options, test_utils=utils + (
        ("test_aot_dispatch_dynamic",) if recomputes else ()))


def _detached(tensors):
    return tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in tensors)


@pytest.mark.parametrize("reduction,labels,mask", [("mean", True, False), ("none", True, False),
                                                    ("sum", False, True)])
def test_opcheck_linear(torch_chunk_path, reduction, labels, mask):
    """Schema, fake-tensor, autograd-registration and aot_dispatch checks of
    align_ti::fused_linear_kl and of its backward op (what torch.compile relies on)."""
    tensors, options = _linear_op_arguments(reduction, labels, mask)
    opcheck_forward(torch.ops.align_ti.fused_linear_kl.default, tensors, options)
    kl = torch.ops.align_ti.fused_linear_kl(*tensors, **options)[0]
    upstream = (torch.randn(kl.shape), torch.tensor(0.5) if labels else None)
    torch.library.opcheck(torch.ops.align_ti.fused_linear_kl_backward.default,
                          upstream + _detached(tensors), options)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_opcheck_logits(torch_chunk_path, reduction):
    """The same checks of align_ti::fused_kl and its backward op."""
    g = torch.Generator().manual_seed(4)
    zs = torch.randn(7, 50, generator=g, requires_grad=True)
    zt = torch.randn(7, 53, generator=g)
    tensors = (zs, zt, torch.tensor([6, 0, 0, 2]), None, rand_weights(4))
    options = dict(divergence="reverse", beta=0.5, temperature=1.5, reduction=reduction,
                   vocab_size=50, impl="torch", chunk_bytes=0)
    opcheck_forward(torch.ops.align_ti.fused_kl.default, tensors, dict(need_grad=True, **options))
    grad = torch.randn(4) if reduction == "none" else torch.tensor(1.5)
    torch.library.opcheck(torch.ops.align_ti.fused_kl_backward.default,
                          (grad, *_detached(tensors)), options)


def test_bool_mask_inside_op_path(mask_inside_op):
    """The CUDA mask strategy (all rows processed, unselected rows exactly 0), on CPU."""
    t = make()
    mask, m = rows_of("mask")
    t["student_hidden"].data[~mask] = float("nan")  # unselected rows must not leak
    labels = torch.randint(0, VS, (m,))
    labels[0] = -100
    outs, grads = run(align_ti.fused_linear_distill, t, labels=labels, rows=mask,
                      weights=rand_weights(m), divergence="jsd", impl="torch",
                      chunk_bytes=SMALL_CHUNK)
    assert all(torch.isfinite(o).all() for o in outs)
    assert torch.all(grads["student_hidden"][~mask] == 0)
    assert torch.isfinite(grads["student_weight"]).all()
    t["student_hidden"].data[~mask] = 0.0
    compare(align_ti.fused_linear_distill, fused_linear_distill_reference, t, labels=labels,
            rows=mask, weights=rand_weights(m), divergence="jsd", impl="torch",
            chunk_bytes=SMALL_CHUNK)


def test_teacher_never_gets_gradients_and_no_grad_mode():
    t = make()
    t["teacher_hidden"].requires_grad_(True)
    t["teacher_weight"].requires_grad_(True)
    kl = align_ti.fused_linear_kl(**t, impl="torch")
    kl.backward()
    assert t["teacher_hidden"].grad is None and t["teacher_weight"].grad is None
    with torch.no_grad():
        kl2 = align_ti.fused_linear_kl(**t, impl="torch")
    assert not kl2.requires_grad
    assert_close(kl2, kl, atol=1e-6, rtol=1e-6)


def test_only_weight_requires_grad():
    t = make()
    t["student_hidden"].requires_grad_(False)
    t["student_bias"].requires_grad_(False)
    kl = align_ti.fused_linear_kl(**t, impl="torch")
    kl.backward()
    ref = fused_linear_kl_reference(**{k: (v.detach().requires_grad_() if k == "student_weight"
                                           else v) for k, v in t.items()})
    assert_close(kl, ref)


# --- NaN / inf behaviour (documented: propagates to a NaN loss, never a finite wrong one) ---

@pytest.mark.parametrize("where", ["student_hidden", "teacher_hidden", "teacher_weight", "student_bias"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_inputs_propagate(where, value):
    t = make()
    with torch.no_grad():
        if where.endswith("hidden"):
            t[where][5, 3] = value
        else:
            t[where][7] = value
    kl = align_ti.fused_linear_kl(**t, impl="torch")
    ref = fused_linear_kl_reference(**t)
    assert torch.isnan(kl), (where, value, kl)
    assert torch.isnan(ref)


def test_nonfinite_in_unselected_row_is_ignored():
    t = make()
    with torch.no_grad():
        t["student_hidden"][0] = float("nan")
        t["teacher_hidden"][1] = float("inf")
    rows = torch.arange(2, N)
    compare(align_ti.fused_linear_kl, fused_linear_kl_reference, t, rows=rows, impl="torch")


# --- -inf logits as vocabulary masks: 0 log 0 = 0, on every path -----------------

NEG = float("-inf")
# who masks which columns, and the divergences that are then +inf (rows of positive weight)
MASK_CASES = {
    "teacher": ("reverse",),   # the teacher masks: forward KL adds nothing there
    "student": ("forward",),   # the student masks: reverse KL adds nothing there
    "both": (),                # the same columns: nothing anywhere
    "mixed": ("reverse",),     # both on some columns, the teacher alone on more
}


def mask_columns(v, lead):
    """A leading run of `lead` masked columns (whole vocabulary blocks of the kernels: each
    online log-sum-exp then starts on -inf) and every 7th column after it."""
    return torch.tensor(list(range(lead)) + list(range(lead + 3, v, 7)))


def masked_logits(case, n, vs, vt, lead, dtype=torch.float32):
    """(student_logits [n, vs], teacher_logits [n, vt]) with the case's -inf columns; the
    teacher also masks columns past V' = min(vs, vt), which must not matter."""
    g = torch.Generator().manual_seed(11)
    zs = torch.randn(n, vs, generator=g) * 3
    zt = torch.randn(n, vt, generator=g) * 3
    v = min(vs, vt)
    cols = mask_columns(v, lead)
    if case in ("student", "both", "mixed"):
        zs[:, cols] = NEG
    if case in ("teacher", "both", "mixed"):
        zt[:, cols] = NEG
    if case == "mixed":
        zt[:, cols[::2] + 1] = NEG
    zt[:, v + 1::2] = NEG
    return zs.to(dtype), zt.to(dtype)


def check_masked_logits(impl, case, divergence, reduction, dtype=torch.float32, n=N, vs=VS, vt=VT,
                        lead=300, rows=None, atol=2e-5, rtol=1e-4, grad_atol=1e-6):
    """fused_kl on masked logits against the reference, with a zero-weight row: equal values
    (+inf included, 0 for the zero-weight row), finite gradients, 0 in the zero-weight row;
    where the divergence is finite, the reference's gradients (0 in the student's masked
    columns)."""
    zs, zt = masked_logits(case, n, vs, vt, lead, dtype)
    m = n if rows is None else rows.shape[0]
    w = rand_weights(m)
    w[1] = 0.0
    up = [torch.randn(m) if reduction == "none" else torch.tensor(2.0)]
    t = {"student_logits": zs.requires_grad_(), "teacher_logits": zt}
    kw = dict(rows=rows, weights=w, divergence=divergence, beta=0.3, temperature=2.0,
              reduction=reduction)
    (got,), _ = run(align_ti.fused_kl, t, up, impl=impl, **kw)
    g_fast = zs.grad.clone()
    zs.grad = None
    (want,), _ = run(fused_kl_reference, t, up, **kw)
    assert_close(got, want, atol=atol, rtol=rtol)
    infinite = divergence in MASK_CASES[case]
    assert bool(torch.isinf(got).any()) == infinite
    assert torch.isfinite(g_fast).all()  # also where D = +inf (a gradient without meaning there)
    sel = torch.arange(n) if rows is None else rows
    assert (g_fast[sel[1]] == 0).all()  # the zero-weight row (its D may be +inf)
    if infinite:
        return
    if case in ("student", "both", "mixed"):
        assert (g_fast[:, mask_columns(min(vs, vt), lead)] == 0).all()
    assert_close(g_fast, zs.grad, atol=grad_atol, rtol=1e-4, name="grad student_logits")


@pytest.fixture
def torch_chunk_path(monkeypatch):
    """The PyTorch chunk code even where the native kernel is built (tests/ops/test_native.py
    runs the same checks on the kernel)."""
    from align_ti import native

    monkeypatch.setattr(native, "_enabled_override", False)


@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("case", list(MASK_CASES))
@pytest.mark.parametrize("divergence", ["forward", "reverse", "jsd"])
def test_minus_inf_masks_logits(torch_chunk_path, divergence, case, reduction):
    rows = torch.tensor([4, 0, 9, 9, 30, 62, 17]) if reduction == "mean" else None
    check_masked_logits("torch", case, divergence, reduction, rows=rows)


def test_minus_inf_masks_logits_sub_blocks_and_mask_rows(torch_chunk_path, monkeypatch):
    """The same through 2-row elementwise sub-blocks and a bool rows mask applied inside the op."""
    from align_ti.ops import heuristics

    monkeypatch.setitem(heuristics.ELEMENTWISE_BYTES, "cpu", 2 * 4 * 2 * VT)
    monkeypatch.setattr(fkl_rows, "MASK_AS_INDICES_DEVICES", ())
    mask = torch.zeros(N, dtype=torch.bool)
    mask[[0, 1, 5, 8, 40]] = True
    for case, divergence in [("mixed", "forward"), ("student", "reverse"), ("both", "jsd")]:
        check_masked_logits("torch", case, divergence, "mean", rows=mask.nonzero().squeeze(1))
        zs, zt = masked_logits(case, N, VS, VT, 300)
        got = align_ti.fused_kl(zs, zt, rows=mask, divergence=divergence, impl="torch")
        assert_close(got, fused_kl_reference(zs, zt, rows=mask, divergence=divergence))


def masked_heads(n=N, hs=HS, ht=HT, vs=VS, vt=VT, dtype=torch.float32):
    """`make` with -inf entries in both biases: both mask `both`, the teacher alone `teacher`
    (so forward KL and JSD are finite, reverse KL +inf), the student's one past the divergence's
    V' = 1000 `ce_only` (it only changes the CE) and the teacher's past its own V' nothing."""
    t = make(dtype, dtype, n=n, hs=hs, ht=ht, vs=vs, vt=vt)
    cols = {"both": [0, 3, 4, 999], "teacher": [7, 500], "ce_only": [1000, 1200]}
    with torch.no_grad():
        t["student_bias"][cols["both"] + cols["ce_only"]] = NEG
        t["teacher_bias"][cols["both"] + cols["teacher"] + [vt - 1]] = NEG
    return t, cols


@pytest.mark.parametrize("divergence", ["forward", "reverse", "jsd"])
def test_minus_inf_bias_linear(torch_chunk_path, divergence):
    t, cols = masked_heads()
    rows, m = rows_of("index")
    labels = torch.randint(0, VS, (m,))
    labels = torch.where(torch.isin(labels, torch.tensor(cols["both"] + cols["ce_only"])), 5, labels)
    labels[2] = -100
    w = rand_weights(m)
    w[3] = 0.0
    kw = dict(labels=labels, rows=rows, weights=w, divergence=divergence, temperature=2.0,
              vocab_size=1000)
    if divergence == "reverse":  # +inf, and a finite gradient; the CE as the reference's
        (kl, ce), grads = run(align_ti.fused_linear_distill, t, impl="torch", **kw)
        (rkl, rce), _ = run(fused_linear_distill_reference, t, **kw)
        assert kl.item() == rkl.item() == math.inf
        assert_close(ce, rce)
        assert all(torch.isfinite(g).all() for g in grads.values())
        return
    _, grads = compare(align_ti.fused_linear_distill, fused_linear_distill_reference, t,
                       impl="torch", chunk_bytes=SMALL_CHUNK, **kw)
    assert (grads["student_weight"][cols["both"] + cols["ce_only"]] == 0).all()
    assert (grads["student_bias"][cols["both"] + cols["ce_only"]] == 0).all()


def check_masked_label_ce(impl, **shape):
    """A label whose column the student masks: CE +inf, the divergence unaffected, and the
    gradients finite (the CE's is p - onehot)."""
    t, cols = masked_heads(**shape)
    n = t["student_hidden"].shape[0]
    labels = torch.full((n,), -100)
    labels[5] = cols["ce_only"][0]
    labels[6] = 2
    for split in (True, False):  # "mean": the CE gradient apart; "none": one recomputed sum
        (kl, ce), grads = run(align_ti.fused_linear_distill, t, labels=labels, vocab_size=1000,
                              reduction="mean" if split else "none", impl=impl)
        assert ce.item() == math.inf and torch.isfinite(kl).all()
        assert all(torch.isfinite(g).all() for g in grads.values())


def test_masked_label_gives_infinite_ce(torch_chunk_path):
    check_masked_label_ce("torch")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("divergence", ["forward", "reverse"])
def test_zero_weight_rows_with_infinite_divergence_add_zero(torch_chunk_path, divergence, reduction):
    """Every row's D is +inf (the student masks what the teacher allows, or the mirror); the rows
    of weight 0 add exactly 0 and get zero gradients, so with all weights 0 everything is 0."""
    t = make()
    with torch.no_grad():
        (t["student_bias"] if divergence == "forward" else t["teacher_bias"])[[3, 8]] = NEG
    w = rand_weights(N)
    w[::2] = 0.0
    up = [torch.randn(N) if reduction == "none" else torch.tensor(1.0)]
    (kl,), grads = run(align_ti.fused_linear_kl, t, up, weights=w, divergence=divergence,
                       reduction=reduction, impl="torch")
    if reduction == "none":
        assert (kl[::2] == 0).all() and torch.isinf(kl[1::2]).all()
    else:
        assert kl.item() == math.inf
    assert all(torch.isfinite(g).all() for g in grads.values())
    (kl,), grads = run(align_ti.fused_linear_kl, t, up, weights=torch.zeros(N),
                       divergence=divergence, reduction=reduction, impl="torch")
    assert (kl == 0).all()
    for k, g in grads.items():
        assert (g == 0).all(), k


def check_weightless_rows_without_distribution(impl, device="cpu"):
    """A row of weight 0 whose teacher has no distribution (all -inf, or NaN) adds 0 to the loss
    and gets exactly 0 gradient, on every path (0 * NaN is NaN: the gradient must not be
    formed as weight * term there); the other rows keep the reference's gradients."""
    for fill in (float("-inf"), float("nan")):
        for reduction in ("mean", "sum", "none"):
            g = torch.Generator().manual_seed(5)
            zs = torch.randn(4, 300, generator=g).to(device).requires_grad_()
            zt = torch.randn(4, 300, generator=g).to(device)
            zt[1] = fill
            w = torch.tensor([1.0, 0.0, 0.5, 2.0], device=device)
            kw = dict(weights=w, divergence="jsd", temperature=1.5, reduction=reduction)
            loss = align_ti.fused_kl(zs, zt, impl=impl, **kw)
            loss.sum().backward()
            assert torch.isfinite(loss).all(), (fill, reduction)
            assert (zs.grad[1] == 0).all() and torch.isfinite(zs.grad).all(), (fill, reduction)
            keep = torch.tensor([0, 2, 3])
            ref = torch.zeros_like(zs, requires_grad=True)
            with torch.no_grad():
                ref[keep] = zs[keep]
            want = fused_kl_reference(ref, zt, rows=keep.to(device), **{**kw, "weights": w[keep]})
            want.sum().backward()
            assert_close(loss.sum(), want.sum(), atol=1e-5, rtol=1e-5)
            assert_close(zs.grad[keep], ref.grad[keep], atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("fn", ["kl", "distill", "logits"])
def test_autocast_changes_nothing(fn):
    """Inside torch.autocast (bf16 on CPU: a user's mixed-precision trainer) the ops compute in
    their own precision: the loss and gradients of fp32 inputs are those outside it (the inner
    matmuls ran in bf16 and the weight-gradient accumulator mixed dtypes before)."""
    rows = torch.tensor([1, 3, 5, 7, 60])
    labels = torch.randint(0, VS, (5,), generator=torch.Generator().manual_seed(1))
    results = []
    for autocast in (False, True):
        t = make()
        zs = (t["student_hidden"] @ t["student_weight"].t()).detach().requires_grad_()
        zt = (t["teacher_hidden"] @ t["teacher_weight"][:VS].t()).detach()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if fn == "logits":
                loss, grads = align_ti.fused_kl(zs, zt, rows=rows, impl="torch"), [zs]
            elif fn == "kl":
                loss, grads = align_ti.fused_linear_kl(**t, rows=rows, impl="torch"), list(t.values())
            else:
                kl, ce = align_ti.fused_linear_distill(**t, labels=labels, rows=rows, impl="torch")
                loss, grads = kl + ce, list(t.values())
        loss.backward()
        results.append((loss.detach(), [g.grad.clone() for g in grads if g.grad is not None]))
    (want, gw), (got, gg) = results
    assert got.dtype == torch.float32
    assert_close(got, want, atol=1e-6, rtol=1e-6)
    for a, b in zip(gg, gw):
        assert a.dtype == b.dtype
        assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_weightless_rows_without_distribution_get_zero_gradient(torch_chunk_path):
    check_weightless_rows_without_distribution("torch")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("fn", ["kl", "distill", "logits"])
def test_no_rows_at_all_give_zero_gradients_of_the_input_shape(fn, reduction):
    """N = 0: zero gradients of the inputs' shapes, never None (for "mean"/"sum" the empty
    [0, Hs] hidden-state gradient was taken for 'not computed')."""
    t = make(n=0)
    if fn == "logits":
        zs = torch.randn(0, VS, requires_grad=True)
        loss = align_ti.fused_kl(zs, torch.randn(0, VT), reduction=reduction, impl="torch")
        loss.sum().backward()
        assert zs.grad is not None and zs.grad.shape == zs.shape
        return
    if fn == "kl":
        loss = align_ti.fused_linear_kl(**t, reduction=reduction, impl="torch").sum()
    else:
        kl, ce = align_ti.fused_linear_distill(**t, labels=torch.zeros(0, dtype=torch.long),
                                               reduction=reduction, impl="torch")
        loss = kl.sum() + ce
    loss.backward()
    assert loss.item() == 0
    for k in STUDENT:
        assert t[k].grad is not None and t[k].grad.shape == t[k].shape, k
        assert (t[k].grad == 0).all(), k


# --- bad input: ValueError / TypeError naming the argument ---------------------------------

def _bad_cases():
    r = torch.arange(5)
    return [
        ({"temperature": 0.0}, ValueError, "temperature"),
        ({"temperature": -1.0}, ValueError, "temperature"),
        ({"divergence": "jsd", "beta": 0.0}, ValueError, "beta"),
        ({"divergence": "jsd", "beta": 1.0}, ValueError, "beta"),
        ({"divergence": "kl"}, ValueError, "divergence"),
        ({"reduction": "avg"}, ValueError, "reduction"),
        ({"impl": "cuda"}, ValueError, "impl"),
        ({"vocab_size": VS + 1}, ValueError, "vocab_size"),
        ({"vocab_size": 0}, ValueError, "vocab_size"),
        ({"rows": torch.tensor([0, N])}, ValueError, "rows"),
        ({"rows": torch.tensor([-1, 2])}, ValueError, "rows"),
        ({"rows": torch.tensor([0.0, 1.0])}, TypeError, "rows"),
        ({"rows": torch.zeros(N + 1, dtype=torch.bool)}, ValueError, "rows"),
        ({"rows": torch.zeros(2, 2, dtype=torch.int64)}, ValueError, "rows"),
        ({"rows": r, "weights": torch.ones(4)}, ValueError, "weights"),
        ({"weights": torch.ones(N - 1)}, ValueError, "weights"),
        ({"rows": r, "weights": -torch.ones(5)}, ValueError, "weights"),
        ({"rows": r, "weights": torch.tensor([1.0, float("nan"), 1, 1, 1])}, ValueError, "weights"),
        ({"rows": r, "weights": torch.ones(5, dtype=torch.int64)}, TypeError, "weights"),
        ({"student_hidden": torch.randn(N, HS + 1)}, ValueError, "student_weight"),
        ({"teacher_hidden": torch.randn(N, HT - 1)}, ValueError, "teacher_weight"),
        ({"student_hidden": torch.randn(N, HS, dtype=torch.float64)}, TypeError, "student_hidden"),
        ({"student_hidden": torch.randn(N, HS).bfloat16()}, TypeError, "student_hidden"),
        ({"teacher_weight": torch.randn(VT, HT).half()}, TypeError, "teacher"),
        ({"teacher_hidden": torch.randn(N, HT).half()}, TypeError,
         "teacher_hidden and teacher_weight must share one dtype"),
        ({"teacher_hidden": torch.randn(N + 1, HT)}, ValueError, "teacher_hidden"),
        ({"student_bias": torch.randn(VS - 1)}, ValueError, "student_bias"),
        ({"student_hidden": torch.randn(N)}, ValueError, "student_hidden"),
        ({"student_weight": "w"}, TypeError, "student_weight"),
        ({"temperature": float("inf")}, ValueError, "temperature"),
        ({"chunk_bytes": -5}, ValueError, "chunk_bytes"),
        ({"chunk_bytes": "1X"}, ValueError, "chunk_bytes"),
    ]


@pytest.mark.parametrize("change,exc,name", _bad_cases())
def test_bad_input_linear(change, exc, name):
    t = {k: v.detach() for k, v in make().items()}
    kw = dict(t)
    kw.update(change)
    with pytest.raises(exc, match=name):
        align_ti.fused_linear_kl(**kw, impl="torch") if "impl" not in change else \
            align_ti.fused_linear_kl(**kw)


@pytest.mark.parametrize("labels,exc", [
    (torch.tensor([0, 1, VS, 2, 3]), ValueError),
    (torch.tensor([0, 1, -5, 2, 3]), ValueError),
    (torch.tensor([0, 1, 2]), ValueError),
    (torch.tensor([0.0, 1, 2, 3, 4]), TypeError),
    (None, TypeError),
])
def test_bad_labels(labels, exc):
    t = {k: v.detach() for k, v in make().items()}
    with pytest.raises(exc, match="labels"):
        align_ti.fused_linear_distill(**t, labels=labels, rows=torch.arange(5), impl="torch")


@pytest.mark.parametrize("change,exc,name", [
    ({"student_logits": torch.randn(N, VS, dtype=torch.float64)}, TypeError, "student_logits"),
    ({"teacher_logits": torch.randn(N + 1, VT)}, ValueError, "teacher_logits"),
    ({"teacher_logits": torch.randn(N, VT, device="meta")}, ValueError, "teacher_logits is on meta"),
    ({"vocab_size": VT + 1}, ValueError, "vocab_size"),
    ({"temperature": 0}, ValueError, "temperature"),
    ({"temperature": -1.0}, ValueError, "temperature"),
    ({"divergence": "jsd", "beta": 1.0}, ValueError, "beta"),
    ({"divergence": "jsd", "beta": 0.0}, ValueError, "beta"),
    ({"divergence": "kl"}, ValueError, "divergence"),
    ({"reduction": "avg"}, ValueError, "reduction"),
    ({"rows": torch.tensor([N])}, ValueError, "rows"),
    ({"rows": torch.tensor([0.0, 1.0])}, TypeError, "rows"),
    ({"rows": torch.tensor([True, False])}, ValueError, "rows"),
    ({"weights": torch.ones(3)}, ValueError, "weights"),
    ({"weights": -torch.ones(N)}, ValueError, "weights"),
    ({"weights": torch.full((N,), float("nan"))}, ValueError, "weights"),
])
def test_bad_input_logits(change, exc, name):
    kw = {"student_logits": torch.randn(N, VS), "teacher_logits": torch.randn(N, VT)}
    kw.update(change)
    with pytest.raises(exc, match=name):
        align_ti.fused_kl(**kw, impl="torch")


@pytest.mark.skipif(INTERPRET or torch.cuda.is_available(), reason="triton can run here")
def test_triton_impl_on_cpu_without_interpreter_is_an_error():
    t = {k: v.detach() for k, v in make().items()}
    with pytest.raises(ValueError, match="impl"):
        align_ti.fused_linear_kl(**t, impl="triton")


def test_import_stays_light_and_never_loads_the_reference():
    """Importing the ops loads neither triton nor transformers, nor the reference (the test
    oracle: the fast path shares no code with it); align_ti's lazy names are the package's."""
    code = ("import sys, align_ti; import align_ti.ops.fused_kl, align_ti.ops.topk_align\n"
            "from align_ti.ops.fused_kl import fused_kl, fused_linear_distill, fused_linear_kl\n"
            "assert 'triton' not in sys.modules, 'triton imported'\n"
            "assert 'transformers' not in sys.modules, 'transformers imported'\n"
            "ref = sorted(m for m in sys.modules if m.startswith('align_ti.reference'))\n"
            "assert not ref, ref\n"
            "assert (align_ti.fused_linear_kl, align_ti.fused_linear_distill, align_ti.fused_kl) == "
            "(fused_linear_kl, fused_linear_distill, fused_kl)\n"
            "print('ok')")
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


# ============================================================================================
# Interpreter tier: impl="triton" on CPU tensors under TRITON_INTERPRET=1 (fp32 / fp16)
# ============================================================================================

IN, IHS, IHT, IVS, IVT = 11, 16, 24, 1271, 1300
ICHUNK = 4 * 4 * (IVS + IVT) * 2


@pytest.fixture
def quiet_interpreter():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # numpy: -inf - -inf in masked lanes
        yield


def imake(dtype=torch.float32, **kw):
    return make(dtype, dtype, n=IN, hs=IHS, ht=IHT, **kw)


@pytest.mark.interpret
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("divergence", ["forward", "reverse", "jsd"])
def test_triton_linear_kl(divergence, temperature, quiet_interpreter):
    t = imake()
    rows = torch.tensor([3, 5, 5, 0, 10, 7])
    compare(align_ti.fused_linear_kl, fused_linear_kl_reference, t, rows=rows,
            weights=rand_weights(6), divergence=divergence, beta=0.3, temperature=temperature,
            impl="triton", chunk_bytes=ICHUNK)


@pytest.mark.interpret
@pytest.mark.parametrize("divergence", ["reverse", "jsd"])
def test_triton_none_reduction_upstream(divergence, quiet_interpreter):
    t = imake()
    compare(align_ti.fused_linear_kl, fused_linear_kl_reference, t, upstream=[torch.randn(IN)],
            weights=rand_weights(IN), divergence=divergence, reduction="none", impl="triton",
            chunk_bytes=ICHUNK)


@pytest.mark.interpret
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_triton_distill_ce(reduction, quiet_interpreter):
    t = imake()
    rows = torch.tensor([1, 2, 4, 4, 9])
    labels = torch.tensor([0, -100, IVS - 1, 17, 600])
    up = [torch.randn(5) if reduction == "none" else torch.tensor(2.0), torch.tensor(0.5)]
    compare(align_ti.fused_linear_distill, fused_linear_distill_reference, t, upstream=up,
            labels=labels, rows=rows, temperature=2.0, vocab_size=1000, reduction=reduction,
            impl="triton", chunk_bytes=ICHUNK)


@pytest.mark.interpret
def test_triton_distill_t1_shared_lse(quiet_interpreter):
    t = imake(vt=IVS)  # V' == Vs and T == 1: CE reuses the student log-sum-exp
    labels = torch.randint(0, IVS, (IN,))
    labels[2] = -100
    compare(align_ti.fused_linear_distill, fused_linear_distill_reference, t, labels=labels,
            impl="triton")


@pytest.mark.interpret
def test_triton_mask_inside_op(mask_inside_op, quiet_interpreter):
    t = imake()
    mask = torch.tensor([True, False, True, True, False, False, True, False, True, True, False])
    labels = torch.randint(0, IVS, (IN,))
    compare(align_ti.fused_linear_distill, fused_linear_distill_reference, t, labels=labels,
            rows=mask, weights=rand_weights(IN), divergence="jsd", impl="triton",
            chunk_bytes=ICHUNK)


@pytest.mark.interpret
def test_triton_ce_weight_folds_the_ce_gradient(quiet_interpreter):
    check_ce_weight_folds_the_ce_gradient("triton", "cuda" if torch.cuda.is_available() else "cpu",
                                          n=IN, hs=IHS, ht=IHT, chunk_bytes=ICHUNK)


@pytest.mark.interpret
def test_triton_weightless_rows_without_distribution(quiet_interpreter):
    check_weightless_rows_without_distribution("triton", "cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.interpret
def test_triton_zero_weights(quiet_interpreter):
    t = imake()
    (kl,), grads = run(align_ti.fused_linear_kl, t, weights=torch.zeros(IN), impl="triton")
    assert kl.item() == 0.0
    for k, g in grads.items():
        assert torch.all(g == 0), k


@pytest.mark.interpret
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_triton_fused_kl_logits(reduction, quiet_interpreter):
    g = torch.Generator().manual_seed(5)
    zs = (torch.randn(IN, IVS, generator=g) * 3).requires_grad_()
    zt = torch.randn(IN, IVT, generator=g) * 3
    rows = torch.tensor([0, 3, 3, 8])
    up = [torch.randn(4) if reduction == "none" else torch.tensor(2.0)]
    t = {"student_logits": zs, "teacher_logits": zt}
    outs, _ = run(align_ti.fused_kl, t, up, rows=rows, divergence="reverse", temperature=2.0,
                  reduction=reduction, impl="triton")
    gf = zs.grad.clone()
    zs.grad = None
    routs, _ = run(fused_kl_reference, t, up, rows=rows, divergence="reverse", temperature=2.0,
                   reduction=reduction)
    assert_close(outs[0], routs[0], atol=2e-5, rtol=1e-4)
    assert_close(gf, zs.grad, atol=1e-6, rtol=1e-4)


@pytest.mark.interpret
@pytest.mark.parametrize("divergence", ["forward", "jsd"])
def test_triton_fp16(divergence, quiet_interpreter):
    """fp16 inputs: fp32 accumulation, so close to the fp32 truth on the same (rounded) inputs."""
    t = imake(torch.float16)
    labels = torch.randint(0, IVS, (IN,))
    compare(align_ti.fused_linear_distill, fused_linear_distill_reference, t, labels=labels,
            divergence=divergence, temperature=2.0, impl="triton", atol=1e-3, rtol=2e-2)


@pytest.mark.interpret
@pytest.mark.parametrize("divergence", ["forward", "jsd"])
def test_triton_bf16_three_way_no_bias(divergence, quiet_interpreter, monkeypatch):
    """No bias: the kernel writes the bf16 gradient of the logits straight into its own
    buffer, and the gradient matmuls take it as it is (several row chunks)."""
    monkeypatch.setenv("ALIGN_TI_CHUNK_BYTES", str(ICHUNK))
    _three_way_linear(align_ti.fused_linear_kl, fused_linear_kl_reference, "triton", n=IN, hs=IHS,
                      ht=IHT, vs=IVS, vt=IVT, bias=False, rows=torch.tensor([3, 5, 5, 0, 10, 7]),
                      weights=rand_weights(6), divergence=divergence, temperature=2.0)


@pytest.mark.interpret
def test_triton_matches_torch_path_mixed_fp16_teacher(quiet_interpreter):
    t = make(torch.float32, torch.float16, n=IN, hs=IHS, ht=IHT)
    outs, grads = run(align_ti.fused_linear_kl, t, impl="triton")
    outs2, grads2 = run(align_ti.fused_linear_kl, t, impl="torch")
    assert_close(outs[0], outs2[0], atol=1e-5, rtol=1e-4)
    for k in grads:
        assert_close(grads[k], grads2[k], atol=1e-6, rtol=1e-4, name=k)


@pytest.mark.interpret
@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", list(MASK_CASES))
@pytest.mark.parametrize("divergence", ["forward", "reverse", "jsd"])
def test_triton_minus_inf_masks_logits(divergence, case, dtype, reduction, quiet_interpreter):
    """-inf masks in the row kernel, with a first vocabulary block (1024 wide here)
    all masked: the online log-sum-exps start on -inf."""
    rows = torch.tensor([4, 1, 9, 9, 0]) if reduction == "mean" else None
    low = dtype != torch.float32
    check_masked_logits("triton", case, divergence, reduction, dtype=dtype, n=IN, vs=IVS, vt=IVT,
                        lead=1100, rows=rows, grad_atol=1e-4 if low else 1e-6)


@pytest.mark.interpret
@pytest.mark.parametrize("divergence", ["forward", "reverse", "jsd"])
def test_triton_minus_inf_bias_linear(divergence, mask_inside_op, quiet_interpreter):
    """-inf entries in both biases (V' = 1000 < Vs < Vt), CE labels, a bool rows mask applied
    inside the op and a zero weight."""
    t, cols = masked_heads(n=IN, hs=IHS, ht=IHT, vs=IVS, vt=IVT)
    mask = torch.tensor([True, False, True, True, False, False, True, False, True, True, False])
    labels = torch.tensor([5, 9, 1000 + 1, -100, 2, 17, 600, 8, IVS - 1, 12, 3])
    w = rand_weights(IN)
    w[2] = 0.0
    kw = dict(labels=labels, rows=mask, weights=w, divergence=divergence, temperature=2.0,
              vocab_size=1000)
    if divergence == "reverse":
        (kl, ce), grads = run(align_ti.fused_linear_distill, t, impl="triton", **kw)
        assert kl.item() == math.inf
        assert_close(ce, fused_linear_distill_reference(**t, **kw)[1])
        assert all(torch.isfinite(g).all() for g in grads.values())
        return
    _, grads = compare(align_ti.fused_linear_distill, fused_linear_distill_reference, t,
                       impl="triton", chunk_bytes=ICHUNK, **kw)
    assert (grads["student_weight"][cols["both"] + cols["ce_only"]] == 0).all()


@pytest.mark.interpret
def test_triton_masked_label_gives_infinite_ce(quiet_interpreter):
    check_masked_label_ce("triton", n=IN, hs=IHS, ht=IHT, vs=IVS, vt=IVT)


@pytest.mark.interpret
def test_triton_zero_weight_rows_with_infinite_divergence(quiet_interpreter):
    t = imake()
    with torch.no_grad():
        t["teacher_bias"][[3, 8]] = NEG  # reverse KL: +inf in every row
    (kl,), grads = run(align_ti.fused_linear_kl, t, weights=torch.zeros(IN), divergence="reverse",
                       impl="triton")
    assert kl.item() == 0.0
    for k, g in grads.items():
        assert (g == 0).all(), k


# ============================================================================================
# GPU tier: impl="triton" on CUDA (bf16 three-way, larger shapes)
# ============================================================================================

@pytest.mark.gpu
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("divergence", ["forward", "reverse", "jsd"])
def test_gpu_bf16_three_way(divergence, bias):
    n, hs, ht, vs, vt = 512, 256, 384, 32768, 32800
    g = torch.Generator().manual_seed(9)
    rows = torch.randint(0, n, (300,), generator=g).cuda()
    labels = torch.randint(0, vs, (300,), generator=g).cuda()
    labels[::5] = -100
    _three_way_linear(align_ti.fused_linear_distill, fused_linear_distill_reference, "triton",
                      device="cuda", n=n, hs=hs, ht=ht, vs=vs, vt=vt, bias=bias, labels=labels,
                      rows=rows, divergence=divergence, temperature=2.0)


@pytest.mark.gpu
@pytest.mark.parametrize("fp32_weight_grad", [True, False])
def test_gpu_bf16_three_way_kl_many_chunks(monkeypatch, fp32_weight_grad):
    """fused_linear_kl without bias over several balanced row chunks: the bf16 gradient buffer
    and cuBLAS accumulating d weight across chunks, into fp32 (addmm with out_dtype, beta = 1)
    or, with fp32_weight_grad=False, into the bf16 weight gradient itself."""
    n, hs, ht, vs, vt = 1000, 256, 384, 32768, 32800
    monkeypatch.setenv("ALIGN_TI_CHUNK_BYTES", str((4 * 2 + 2) * vt * 256))
    fn = functools.partial(align_ti.fused_linear_kl, fp32_weight_grad=fp32_weight_grad)
    _three_way_linear(fn, fused_linear_kl_reference, "triton", device="cuda",
                      n=n, hs=hs, ht=ht, vs=vs, vt=vt, bias=False, temperature=1.0)


@pytest.mark.gpu
def test_gpu_compile_inductor_fullgraph_none_reduction():
    """Inductor around the ops (recompute in the backward, reduction="none"), on CUDA: the
    CPU tier compiles with aot_eager only (an inductor compile costs it 15-20 s)."""
    t = make(bias=False, vs=257, vt=300, n=9, device="cuda")
    scale = torch.arange(9.0, device="cuda")

    def loss_fn(student_hidden, student_weight, teacher_hidden, teacher_weight):
        per_row = align_ti.fused_linear_kl(student_hidden, student_weight, teacher_hidden,
                                           teacher_weight, reduction="none")
        return (per_row * scale).sum()

    torch.backends.cuda.matmul.allow_tf32 = False
    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, backend="inductor", fullgraph=True)
    (out,), grads = run(compiled, t)
    (ref,), rgrads = run(lambda **k: (fused_linear_kl_reference(**k, reduction="none") * scale).sum(), t)
    assert_close(out, ref, atol=1e-5, rtol=1e-4)
    for k in grads:
        assert_close(grads[k], rgrads[k], atol=1e-5, rtol=1e-4, name=k)


@pytest.mark.gpu
def test_gpu_autotune_matches_fixed_blocks(monkeypatch):
    """ALIGN_TI_AUTOTUNE=1: the row kernel runs under triton.autotune (its trials restore the
    chunk buffers it writes in place) and gives the fixed-configuration result."""
    t = make(torch.bfloat16, torch.bfloat16, n=300, hs=128, ht=192, vs=20000, vt=20100, device="cuda")
    labels = torch.randint(0, 20000, (300,), device="cuda")
    fixed = run(align_ti.fused_linear_distill, t, labels=labels, divergence="jsd")
    monkeypatch.setenv("ALIGN_TI_AUTOTUNE", "1")
    tuned = run(align_ti.fused_linear_distill, t, labels=labels, divergence="jsd")
    for a, b in zip(tuned[0], fixed[0]):
        assert_close(a, b, atol=1e-5, rtol=1e-4)
    for k in fixed[1]:
        assert_close(tuned[1][k], fixed[1][k], atol=1e-4, rtol=1e-2, name=k)


@pytest.mark.gpu
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gpu_fp32_matches_reference(reduction):
    t = make(n=300, hs=128, ht=192, vs=20000, vt=20100, device="cuda")
    mask = (torch.rand(300, generator=torch.Generator().manual_seed(2)) < 0.5).cuda()
    up = None
    if reduction == "none":
        up = [torch.randn(int(mask.sum()), device="cuda")]
    torch.backends.cuda.matmul.allow_tf32 = False
    compare(align_ti.fused_linear_kl, fused_linear_kl_reference, t, upstream=up, rows=mask,
            weights=torch.rand(300, device="cuda"), divergence="jsd", reduction=reduction,
            impl="triton", chunk_bytes=4 * 2 * 20100 * 64)


@pytest.mark.gpu
@pytest.mark.parametrize("rows", ["all", "mask"])
def test_gpu_forward_and_backward_never_sync_with_the_host(rows):
    """No host sync in fused_linear_kl / fused_linear_distill with value checks off (they read
    tensor contents): CUDA's sync debug mode raises on any synchronising call, a host number
    copied into a CUDA tensor (which once made the mean's denominator) included."""
    t = make(torch.bfloat16, torch.bfloat16, n=256, hs=128, ht=256, vs=16384, vt=16384,
             device="cuda")
    mask = (torch.arange(256, device="cuda") % 3) > 0 if rows == "mask" else None
    labels = torch.randint(0, 16384, (256,), device="cuda")

    def step():
        for k in STUDENT:
            t[k].grad = None
        kl = align_ti.fused_linear_kl(**t, rows=mask)
        kl2, ce = align_ti.fused_linear_distill(**t, labels=labels, rows=mask)
        (kl + kl2 + ce).backward()

    step()  # compiles the kernels outside the check
    with forbid_host_syncs():
        step()


@pytest.mark.gpu
def test_gpu_auto_is_triton_and_matches_torch_path():
    t = make(torch.bfloat16, torch.bfloat16, n=256, hs=128, ht=256, vs=16384, vt=16384,
             device="cuda")
    (a,), ga = run(align_ti.fused_linear_kl, t, impl="auto")
    (b,), gb = run(align_ti.fused_linear_kl, t, impl="torch")
    assert_close(a, b, atol=1e-4, rtol=1e-3)
    for k in ga:
        assert_close(ga[k], gb[k], atol=1e-3, rtol=2e-2, name=k)


@pytest.mark.parametrize("n, max_rows, device, want", [
    (8192, 3000, "cpu", 2731),   # 3 chunks of ~2731, not 3000 + 3000 + 2192
    (8192, 3000, "cuda", 2752),  # ... rounded up to whole 64-row tiles
    (8192, 704, "cuda", 704),    # 683 rounds up to the budget: 11 x 704 + 448
    (1024, 165, "cpu", 147),     # the CPU target shape: 7 chunks of 147
    (100, 165, "cpu", 100),      # one chunk
    (0, 165, "cpu", 1),          # nothing to process: one (empty) chunk
    (10, 1, "cpu", 1),
])
def test_balanced_rows(n, max_rows, device, want):
    from align_ti.ops.heuristics import balanced_rows

    rows = balanced_rows(n, max_rows, device)
    assert rows == want and rows <= max(1, max_rows)
    assert -(-max(n, 1) // rows) == -(-max(n, 1) // max_rows)  # never more chunks than the budget's


@pytest.mark.parametrize("use", ["kl", "ce"])
def test_distill_backward_through_one_output(use):
    """Only one of (kl, ce) reaches the loss: the other gets no upstream gradient (None, not
    materialised zeros) and must contribute nothing."""
    labels = torch.randint(0, VS, (N,))
    labels[::4] = -100
    got, want = make(), make()
    kl, ce = align_ti.fused_linear_distill(**got, labels=labels, temperature=2.0, impl="torch")
    (kl if use == "kl" else ce).mul(1.5).backward()
    rkl, rce = fused_linear_distill_reference(**want, labels=labels, temperature=2.0)
    (rkl if use == "kl" else rce).mul(1.5).backward()
    for k in STUDENT:
        assert_close(got[k].grad, want[k].grad, atol=1e-6, rtol=1e-4, name=k)


def test_logits_backward_without_upstream_for_the_gradient_output():
    """fused_kl's autograd does not materialise a zero [N, Vs] upstream gradient."""
    zs = torch.randn(N, VS, requires_grad=True)
    zt = torch.randn(N, VT)
    loss = align_ti.fused_kl(zs, zt, impl="torch")
    loss.backward()
    ref = zs.detach().clone().requires_grad_()
    fused_kl_reference(ref, zt).backward()
    assert_close(zs.grad, ref.grad, atol=1e-7, rtol=1e-4, name="student_logits")


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=pytest.mark.interpret)])
@pytest.mark.parametrize("fn", ["kl", "distill"])
def test_weight_grad_in_weight_dtype(fn, impl, monkeypatch):
    """fp32_weight_grad=False: the weight gradient accumulates in bf16 over the row chunks
    (several here): it stays close to the fp32 truth (a few roundings), every other output
    is the same as with the fp32 accumulator, and fp32 weights are not affected at all."""
    if impl == "triton" and not INTERPRET:
        pytest.skip("interpreter tier")
    n, hs, ht, vs, vt = (IN, IHS, IHT, IVS, IVT) if impl == "triton" else (N, HS, HT, VS, VT)
    monkeypatch.setenv("ALIGN_TI_CHUNK_BYTES", str(4 * 3 * (vs + vt) * 2))  # 3-row chunks
    labels = torch.randint(0, vs, (n,))
    f = (align_ti.fused_linear_kl if fn == "kl" else
         lambda **kw: align_ti.fused_linear_distill(**kw, labels=labels))
    lo = make(torch.bfloat16, torch.bfloat16, bias=False, n=n, hs=hs, ht=ht, vs=vs, vt=vt)
    hi = {k: x.detach().float().requires_grad_(x.requires_grad) for k, x in lo.items()}
    ref = (fused_linear_kl_reference if fn == "kl" else
           lambda **kw: fused_linear_distill_reference(**kw, labels=labels))
    up = None if fn == "kl" else [torch.tensor(1.5), torch.tensor(0.5)]
    outs16, g16 = run(f, lo, up, temperature=2.0, impl=impl, fp32_weight_grad=False)
    outs32, g32 = run(f, lo, up, temperature=2.0, impl=impl)
    truth, gt = run(ref, hi, up, temperature=2.0)
    for a, b in zip(outs16, outs32):
        assert torch.equal(a, b)
    assert torch.equal(g16["student_hidden"], g32["student_hidden"])
    w16, w32, wt = g16["student_weight"], g32["student_weight"], gt["student_weight"]
    assert w16.dtype == torch.bfloat16
    assert_close(w16.float(), wt, atol=1e-5, rtol=3e-2, name="bf16-accumulated weight grad")
    # a few roundings more than the fp32 accumulator's one, not orders of magnitude more
    err16, err32 = (w16.float() - wt).abs().mean(), (w32.float() - wt).abs().mean()
    assert err16 <= 8 * err32 + 1e-7

    t32 = make(bias=False, n=n, hs=hs, ht=ht, vs=vs, vt=vt)
    a, ga = run(f, t32, up, impl=impl, fp32_weight_grad=False)
    b, gb = run(f, t32, up, impl=impl)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert all(torch.equal(ga[k], gb[k]) for k in ga)


def test_fp32_weight_grad_must_be_a_bool():
    t = make()
    with pytest.raises(TypeError, match="fp32_weight_grad"):
        align_ti.fused_linear_kl(**t, fp32_weight_grad="no")


# ============================================================================================
# autograd edge cases: loss scaling, double / repeated backward, inference tensors
# ============================================================================================

@pytest.mark.parametrize("fn", ["linear", "logits"])
@pytest.mark.parametrize("scale", [1024.0, 65536.0])
def test_fp16_gradients_take_the_loss_scale_before_rounding(fn, scale):
    """fp16 (a GradScaler's loss scale; 65536 is not even an fp16 number): the gradient is no
    further from the truth than plain fp16 torch's, which rounds the scaled gradient once.
    (Precomputed for a unit upstream, small gradients underflowed and 65536 became inf.)"""
    g = torch.Generator().manual_seed(3)
    h32, w32 = torch.randn(64, 8, generator=g), torch.randn(50, 8, generator=g)
    ht32 = h32 + 0.01 * torch.randn(64, 8, generator=g)

    def grads(dtype, fused):
        h = h32.to(dtype).requires_grad_()
        w = w32.to(dtype).requires_grad_()
        ht, wt = ht32.to(dtype), w32.to(dtype)
        if fn == "linear":
            loss = (align_ti.fused_linear_kl(h, w, ht, wt, impl="torch") if fused
                    else fused_linear_kl_reference(h, w, ht, wt))
            (loss * scale).backward()
            return h.grad, w.grad
        z = (h @ w.t()).detach().requires_grad_()
        zt = ht @ wt.t()
        loss = align_ti.fused_kl(z, zt, impl="torch") if fused else fused_kl_reference(z, zt)
        (loss * scale).backward()
        return (z.grad,)

    for ours, plain, truth in zip(grads(torch.float16, True), grads(torch.float16, False),
                                  grads(torch.float32, False)):
        assert ours.dtype == torch.float16
        assert_three_way(ours, plain, truth, atol=0, rtol=1e-3)


def test_double_backward_is_refused():
    for reduction in ("mean", "none"):
        t = make()
        loss = align_ti.fused_linear_kl(**t, reduction=reduction, impl="torch").sum()
        with pytest.raises(RuntimeError, match="double backward"):
            torch.autograd.grad(loss, t["student_hidden"], create_graph=True)
    zs = torch.randn(N, VS, requires_grad=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(align_ti.fused_kl(zs, torch.randn(N, VT), impl="torch"), zs, create_graph=True)


def test_second_backward_through_one_graph():
    """mean/sum consume their forward-computed gradients in the first backward: a second one
    is refused with an explanation; reduction='none' recomputes, so kl and ce may be
    backpropagated one after the other and add up to the combined gradient."""
    labels = torch.randint(0, VS, (N,))
    t = make()
    kl, ce = align_ti.fused_linear_distill(**t, labels=labels, impl="torch")
    kl.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        ce.backward()
    seq, both = make(), make()
    kl, ce = align_ti.fused_linear_distill(**seq, labels=labels, reduction="none", impl="torch")
    kl.sum().backward(retain_graph=True)
    ce.backward()
    kl, ce = align_ti.fused_linear_distill(**both, labels=labels, reduction="none", impl="torch")
    (kl.sum() + ce).backward()
    for k in STUDENT:
        assert_close(seq[k].grad, both[k].grad, atol=1e-6, rtol=1e-5, name=k)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_teacher_from_inference_mode(reduction):
    """Teacher states computed under torch.inference_mode() (a frozen teacher's forward)."""
    t = make()
    with torch.inference_mode():
        ht, wt = t["teacher_hidden"] * 1, t["teacher_weight"] * 1
    plain = {**t, "teacher_hidden": ht.clone(), "teacher_weight": wt.clone()}
    a = run(align_ti.fused_linear_kl, {**t, "teacher_hidden": ht, "teacher_weight": wt},
            reduction=reduction, impl="torch")
    b = run(align_ti.fused_linear_kl, plain, reduction=reduction, impl="torch")
    assert torch.equal(a[0][0], b[0][0]) and all(torch.equal(a[1][k], b[1][k]) for k in a[1])
    zs = torch.randn(N, VS, requires_grad=True)
    with torch.inference_mode():
        zt = torch.randn(N, VT)
    align_ti.fused_kl(zs, zt, reduction=reduction, impl="torch").sum().backward()
    want = zs.detach().clone().requires_grad_()
    fused_kl_reference(want, zt.clone(), reduction=reduction).sum().backward()
    assert_close(zs.grad, want.grad, atol=1e-7, rtol=1e-4, name="grad student_logits")


def test_empty_vocabulary_and_out_of_range_numbers_are_refused():
    t = {k: v.detach() for k, v in make(bias=False).items()}
    with pytest.raises(ValueError, match="at least one vocabulary row"):
        align_ti.fused_linear_kl(**{**t, "student_weight": t["student_weight"][:0]}, impl="torch")
    with pytest.raises(ValueError, match="at least one vocabulary row"):
        align_ti.fused_kl(torch.randn(4, 0), torch.randn(4, 0), impl="torch")
    for temperature in (1e-40, 1e300):
        with pytest.raises(ValueError, match="temperature"):
            align_ti.fused_linear_kl(**t, temperature=temperature, impl="torch")
    with pytest.raises(ValueError, match="weights"):
        align_ti.fused_linear_kl(**t, weights=torch.full((N,), 1e300, dtype=torch.float64), impl="torch")


@pytest.mark.interpret
def test_triton_reads_strided_row_vectors(quiet_interpreter):
    """The kernel reads the per-row upstream gradient, labels and weights at ptr + row: a
    stride-0 upstream (reduction='none' then .sum()), strided labels and strided weights."""
    t = imake()
    labels = torch.randint(0, IVS, (IN, 2))[:, 0]
    weights = rand_weights(2 * IN)[::2]

    def loss(**kw):
        kl, ce = align_ti.fused_linear_distill(**kw)
        return kl.sum() + ce  # .sum(): a stride-0 upstream gradient for kl

    tri = run(loss, t, labels=labels, weights=weights, reduction="none", impl="triton")
    ref = run(lambda **kw: sum(o.sum() for o in fused_linear_distill_reference(**kw)), t,
              labels=labels, weights=weights, reduction="none")
    assert_close(tri[0][0], ref[0][0], atol=1e-5, rtol=1e-4)
    for k in tri[1]:
        assert_close(tri[1][k], ref[1][k], atol=1e-5, rtol=1e-4, name=k)
    zs = torch.randn(IN, IVS, requires_grad=True)
    zt = torch.randn(IN, IVT)
    align_ti.fused_kl(zs, zt, weights=weights, reduction="none", impl="triton").sum().backward()
    want = zs.detach().clone().requires_grad_()
    fused_kl_reference(want, zt, weights=weights, reduction="none").sum().backward()
    assert_close(zs.grad, want.grad, atol=1e-6, rtol=1e-4, name="student_logits")


@pytest.mark.interpret
@pytest.mark.parametrize("divergence", ["forward", "reverse"])
def test_triton_kl_keeps_its_precision_at_large_logits(divergence, quiet_interpreter):
    """Logits of std 100 and a small divergence: the kernel's divergence is no further from
    the fp64 truth than plain fp32 torch's (a one-pass sum over raw logits lost 20%)."""
    g = torch.Generator().manual_seed(5)
    zs = torch.randn(8, 3000, generator=g) * 100
    zt = zs + torch.randn(8, 3000, generator=g)
    ls, lt = torch.log_softmax(zs.double(), -1), torch.log_softmax(zt.double(), -1)
    fwd = divergence == "forward"
    truth = ((lt.exp() * (lt - ls)) if fwd else (ls.exp() * (ls - lt))).sum(-1)
    ls32, lt32 = torch.log_softmax(zs, -1), torch.log_softmax(zt, -1)
    plain = ((lt32.exp() * (lt32 - ls32)) if fwd else (ls32.exp() * (ls32 - lt32))).sum(-1)
    ours = align_ti.fused_kl(zs, zt, divergence=divergence, reduction="none", impl="triton")
    assert_three_way(ours, plain, truth.float(), atol=1e-7)
