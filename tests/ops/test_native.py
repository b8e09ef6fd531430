"""The native CPU kernel of the fused KL's per-chunk step (`align_ti::kl_chunk`, csrc/).

The session fixture builds the extension (`align_ti.native.build()`, cached per torch
version, ~30 s the first time) so that these tests run wherever CMake, Ninja and a C++
compiler are present (CI installs cmake and ninja from PyPI with the `test` extra). Without
them the tests are skipped with the reason; with them a failing build is a test failure.
Set ALIGN_TI_NATIVE_TESTS=0 to skip the build and these tests.

Checks: the kernel against the PyTorch chunk code (`_chunk_torch`, every option), and the
public ops with the kernel against the fp32 reference (each divergence, temperatures, fp32
and bf16, odd V, V' slicing, ignored labels, NaN propagation), the fallback on a broken
build, and the CLI.
"""
from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys

import pytest
import torch

import align_ti
from align_ti import native
from align_ti.ops import fused_kl as F
from align_ti.reference.fused_kl import (
    fused_kl_reference,
    fused_linear_distill_reference,
    fused_linear_kl_reference,
)
from tests.utils import assert_close, assert_three_way

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
N, HS, HT, VS, VT = 63, 24, 40, 1271, 1300


@pytest.fixture(scope="session")
def native_lib():
    if os.environ.get("ALIGN_TI_NATIVE_TESTS", "1") == "0":
        pytest.skip("ALIGN_TI_NATIVE_TESTS=0")
    missing = [t for t in ("cmake", "ninja") if native._tool(t) is None]
    if missing:
        pytest.skip(f"native extension not built: {' and '.join(missing)} not found "
                    "(pip install cmake ninja)")
    if not any(shutil.which(c) for c in ("c++", "g++", "clang++")) and not os.environ.get("CXX"):
        pytest.skip("native extension not built: no C++ compiler found")
    path = native.build()  # a build failure with the tools present is a real failure
    assert native.native_available(), native.info()
    return path


@pytest.fixture
def use_native(native_lib):
    native.set_enabled(True)
    yield
    native.set_enabled(None)


@pytest.fixture
def use_torch():
    native.set_enabled(False)
    yield
    native.set_enabled(None)


def _kernel_ran(zs) -> bool:
    return F._use_native(zs, zs)


# --------------------------------------------------------------------------------------------
# the kernel against the PyTorch chunk code
# --------------------------------------------------------------------------------------------

_CHUNK_CASES = [
    (div, t, extra, lab, grad, split)
    for div, t, extra, lab, grad, split in itertools.product(
        (0, 1, 2), (1.0, 2.0), (0, 29), (False, True), (False, True), (False, True))
    if (lab or not extra) and (lab or not split)
]


@pytest.mark.parametrize("div,temperature,extra,with_labels,need_grad,split", _CHUNK_CASES)
def test_kernel_matches_torch_chunk(native_lib, div, temperature, extra, with_labels, need_grad,
                                    split):
    g = torch.Generator().manual_seed(div * 7 + extra)
    r, v = 9, 1271
    ns = v + extra
    zs0 = torch.randn(r, ns, generator=g) * 3
    zt0 = torch.randn(r, v, generator=g) * 3
    labels = torch.randint(0, ns, (r,), generator=g)
    labels[2] = -100
    labels[5] = ns - 1
    a, c = torch.rand(r, generator=g), torch.rand(r, generator=g)
    args = (v, div, 0.3, 1.0 / temperature, labels if with_labels else None,
            a if need_grad else None, c if (need_grad and with_labels) else None, need_grad, split)
    zs1, zt1 = zs0.clone(), zt0.clone()
    d1, nll1, g1, gce1 = F._chunk_torch(zs1, zt1, *args)
    zs2, zt2 = zs0.clone(), zt0.clone()
    assert _kernel_ran(zs2)
    d2, nll2, gce2 = torch.ops.align_ti.kl_chunk(zs2, zt2, *args)
    assert_close(d2, d1, atol=2e-5, rtol=1e-5, name="d")
    if with_labels:
        assert_close(nll2, nll1, atol=2e-5, rtol=1e-5, name="nll")
    if need_grad:
        assert_close(zs2, g1, atol=1e-7, rtol=1e-4, name="grad")
        if with_labels and split:
            assert_close(gce2, gce1, atol=1e-7, rtol=1e-4, name="grad ce")


def test_kernel_propagates_nan_and_inf(native_lib):
    r, v = 4, 1271
    zs0 = torch.randn(r, v)
    zt0 = torch.randn(r, v)
    zs0[0, 7] = float("nan")
    zt0[1, 1000] = float("nan")
    zs0[2, 3] = float("inf")
    for div in (0, 1, 2):
        a = torch.ones(r)
        zs = zs0.clone()
        d, _, _ = torch.ops.align_ti.kl_chunk(zs, zt0.clone(), v, div, 0.5, 1.0, None, a, None,
                                              True, False)
        assert torch.isnan(d[:3]).all(), (div, d)
        assert torch.isfinite(d[3]), (div, d)
        assert torch.isnan(zs[:2]).any(dim=1).all(), div


# --------------------------------------------------------------------------------------------
# the public ops with the kernel, against the fp32 reference
# --------------------------------------------------------------------------------------------

def _make(dtype=torch.float32, vs=VS, vt=VT, bias=True):
    g = torch.Generator().manual_seed(1234)
    t = {
        "student_hidden": torch.randn(N, HS, generator=g),
        "student_weight": torch.randn(vs, HS, generator=g) * 0.4,
        "teacher_hidden": torch.randn(N, HT, generator=g),
        "teacher_weight": torch.randn(vt, HT, generator=g) * 0.4,
    }
    if bias:
        t["student_bias"] = torch.randn(vs, generator=g) * 0.2
        t["teacher_bias"] = torch.randn(vt, generator=g) * 0.2
    return {k: x.to(dtype).requires_grad_(k.startswith("student")) for k, x in t.items()}


def _run(fn, tensors, upstream=None, **kw):
    for x in tensors.values():
        x.grad = None
    out = fn(**tensors, **kw)
    outs = out if isinstance(out, tuple) else (out,)
    ups = upstream or [torch.ones_like(o) for o in outs]
    sum((o * u).sum() for o, u in zip(outs, ups)).backward()
    grads = {k: x.grad.clone() for k, x in tensors.items() if x.grad is not None}
    for x in tensors.values():
        x.grad = None
    return [o.detach() for o in outs], grads


def _compare(fast, ref, tensors, upstream=None, atol=2e-5, rtol=1e-4, **kw):
    outs, grads = _run(fast, tensors, upstream, impl="torch", chunk_bytes=4 * 4 * (VS + VT) * 5, **kw)
    routs, rgrads = _run(ref, tensors, upstream, **kw)
    for i, (a, b) in enumerate(zip(outs, routs)):
        assert_close(a, b, atol=atol, rtol=rtol, name=f"output {i}")
    assert grads.keys() == rgrads.keys()
    for k in grads:
        assert_close(grads[k], rgrads[k], atol=atol, rtol=rtol, name=f"grad {k}")


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("divergence", ["forward", "reverse", "jsd"])
def test_linear_kl_native_vs_reference(use_native, divergence, temperature):
    rows = torch.randperm(N)[:40]
    _compare(align_ti.fused_linear_kl, fused_linear_kl_reference, _make(), rows=rows,
             weights=torch.rand(40), divergence=divergence, beta=0.3, temperature=temperature)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("divergence", ["forward", "reverse", "jsd"])
def test_distill_native_ignored_labels_and_vocab_slice(use_native, divergence, reduction):
    """CE with -100 labels, V' < Vs (the student's CE columns beyond V'), T = 2, odd V."""
    t = _make(vs=1300, vt=1271)
    rows = torch.arange(0, N, 2)
    m = rows.numel()
    labels = torch.randint(0, 1300, (m,))
    labels[::3] = -100
    labels[1] = 1299  # a label beyond V'
    up = [torch.randn(m), torch.tensor(0.7)] if reduction == "none" else [torch.tensor(1.3), torch.tensor(0.7)]
    _compare(align_ti.fused_linear_distill, fused_linear_distill_reference, t, upstream=up,
             labels=labels, rows=rows, divergence=divergence, temperature=2.0, vocab_size=1200,
             reduction=reduction)


def test_distill_vocab_slice_torch_path(use_torch):
    """Regression: V' < Vs with labels on the PyTorch chunk path (a strided log-softmax out)."""
    t = _make(vs=1300, vt=1271)
    labels = torch.randint(0, 1300, (N,))
    _compare(align_ti.fused_linear_distill, fused_linear_distill_reference, t, labels=labels,
             temperature=1.0, vocab_size=1271)


def test_distill_all_labels_ignored_native(use_native):
    t = _make()
    labels = torch.full((N,), -100)
    (kl, ce), grads = _run(align_ti.fused_linear_distill, t, labels=labels, impl="torch")
    assert ce.item() == 0.0 and torch.isfinite(kl)
    (rkl,), _ = _run(align_ti.fused_linear_kl, t, impl="torch")
    assert_close(kl, rkl, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("divergence", ["forward", "reverse", "jsd"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_fused_kl_logits_native_vs_reference(use_native, divergence, temperature):
    g = torch.Generator().manual_seed(5)
    zs = (torch.randn(N, VS, generator=g) * 3).requires_grad_()
    zt = torch.randn(N, VT, generator=g) * 3
    _compare(align_ti.fused_kl, fused_kl_reference, {"student_logits": zs, "teacher_logits": zt},
             divergence=divergence, temperature=temperature, rows=torch.rand(N) > 0.3)


@pytest.mark.parametrize("divergence", ["forward", "reverse", "jsd"])
def test_fused_kl_bf16_three_way_native(use_native, divergence):
    """bf16 logits: native no further from the fp32 truth than plain torch in bf16."""
    g = torch.Generator().manual_seed(6)
    lo_s = (torch.randn(N, VS, generator=g) * 3).to(torch.bfloat16).requires_grad_()
    lo_t = (torch.randn(N, VT, generator=g) * 3).to(torch.bfloat16)
    hi_s = lo_s.detach().float().requires_grad_()
    (cand,), cg = _run(align_ti.fused_kl, {"student_logits": lo_s, "teacher_logits": lo_t},
                       impl="torch", divergence=divergence)
    (truth,), tg = _run(fused_kl_reference, {"student_logits": hi_s, "teacher_logits": lo_t.float()},
                        divergence=divergence)

    def plain_bf16(student_logits, teacher_logits):  # what a bf16 trainer computes
        v = min(VS, VT)
        ls = torch.log_softmax(student_logits[:, :v], -1)
        lt = torch.log_softmax(teacher_logits[:, :v], -1)
        if divergence == "forward":
            d = (lt.exp() * (lt - ls)).sum(-1)
        elif divergence == "reverse":
            d = (ls.exp() * (ls - lt)).sum(-1)
        else:
            lm = torch.logaddexp(lt + torch.tensor(0.5).log(), ls + torch.tensor(0.5).log())
            d = 0.5 * (lt.exp() * (lt - lm)).sum(-1) + 0.5 * (ls.exp() * (ls - lm)).sum(-1)
        return d.float().mean()

    (base,), bg = _run(plain_bf16, {"student_logits": lo_s, "teacher_logits": lo_t})
    assert cg["student_logits"].dtype == torch.bfloat16
    assert_three_way(cand, base, truth, atol=1e-5, rtol=1e-3, name="loss")
    assert_three_way(cg["student_logits"], bg["student_logits"], tg["student_logits"], atol=1e-6,
                     rtol=1e-2, name="grad")


def test_bf16_linear_distill_native_matches_torch_path(native_lib):
    t = _make(torch.bfloat16)
    labels = torch.randint(0, VS, (N,))
    labels[::4] = -100
    res = {}
    for flag in (False, True):
        native.set_enabled(flag)
        try:
            res[flag] = _run(align_ti.fused_linear_distill, t, labels=labels, impl="torch",
                             divergence="jsd", temperature=2.0)
        finally:
            native.set_enabled(None)
    (o0, g0), (o1, g1) = res[False], res[True]
    for a, b in zip(o1, o0):
        assert_close(a, b, atol=1e-5, rtol=1e-4)
    for k in g0:
        assert g1[k].dtype == torch.bfloat16
        assert_close(g1[k], g0[k], atol=1e-3, rtol=2e-2, name=k)


def test_nonfinite_propagates_native(use_native):
    t = _make()
    with torch.no_grad():
        t["teacher_hidden"][3, 0] = float("nan")
    (kl,), _ = _run(align_ti.fused_linear_kl, t, impl="torch")
    assert torch.isnan(kl)


# --------------------------------------------------------------------------------------------
# switches, fallback, CLI
# --------------------------------------------------------------------------------------------

def test_switches(native_lib, monkeypatch):
    zs = torch.zeros(2, 3)
    assert native.native_available() and _kernel_ran(zs)
    monkeypatch.setenv("ALIGN_TI_NATIVE", "0")
    assert not _kernel_ran(zs)
    native.set_enabled(True)
    try:
        assert _kernel_ran(zs)
    finally:
        native.set_enabled(None)
    assert not _kernel_ran(zs.to(torch.float64))
    assert align_ti.native_available() is True


def test_broken_build_falls_back_with_one_warning(tmp_path):
    """A library that does not load: one RuntimeWarning, then the PyTorch path."""
    code = (
        "import warnings, torch, align_ti\n"
        "from align_ti import native\n"
        "p = native.library_path()\n"
        "import os; os.makedirs(os.path.dirname(p), exist_ok=True)\n"
        "open(p, 'wb').write(b'not a shared library')\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    zs = torch.randn(3, 50, requires_grad=True)\n"
        "    loss = align_ti.fused_kl(zs, torch.randn(3, 50), impl='torch')\n"
        "    loss.backward()\n"
        "    loss = align_ti.fused_kl(zs, torch.randn(3, 50), impl='torch')\n"
        "msgs = [str(x.message) for x in w if issubclass(x.category, RuntimeWarning)]\n"
        "assert len(msgs) == 1 and 'PyTorch path' in msgs[0] and '\\n' not in msgs[0], msgs\n"
        "assert not native.native_available() and torch.isfinite(loss)\n"
        "print('OK')\n"
    )
    env = dict(os.environ, ALIGN_TI_NATIVE_DIR=str(tmp_path), PYTHONPATH=ROOT)
    env.pop("ALIGN_TI_NATIVE", None)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-2000:]


def test_not_built_is_quiet(tmp_path, monkeypatch):
    """No build in the cache: no warning, native_available() is False."""
    code = (
        "import torch, warnings\n"
        "from align_ti import native\n"
        "warnings.simplefilter('error')\n"
        "assert native.native_available() is False\n"
        "print(native.info()['error'])\n"
    )
    env = dict(os.environ, ALIGN_TI_NATIVE_DIR=str(tmp_path), PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "build-native" in proc.stdout


def test_cli_build_native(native_lib, capsys):
    from align_ti.cli import main

    assert main(["build-native"]) == 0  # cached: loads, reports
    out = capsys.readouterr().out
    assert native_lib in out and "loaded" in out


def _opcheck_args(with_labels=True, need_grad=True, split=True):
    g = torch.Generator().manual_seed(3)
    r, v, ns = 5, 97, 103
    labels = torch.tensor([1, -100, 102, 7, 0])
    return (torch.randn(r, ns, generator=g), torch.randn(r, v, generator=g), v, 2, 0.4, 0.5,
            labels if with_labels else None, torch.rand(r, generator=g) if need_grad else None,
            torch.rand(r, generator=g) if (need_grad and with_labels) else None, need_grad, split)


@pytest.mark.parametrize("with_labels,need_grad,split", [(True, True, True), (True, True, False),
                                                          (False, True, False), (False, False, False)])
def test_opcheck_native_kernel(native_lib, with_labels, need_grad, split):
    """Schema, mutation and fake-tensor checks of align_ti::kl_chunk with the C++ kernel."""
    args = _opcheck_args(with_labels, need_grad, split)
    torch.library.opcheck(torch.ops.align_ti.kl_chunk.default, args,
                          test_utils=("test_schema", "test_faketensor"))


def test_op_default_implementation_without_extension(tmp_path):
    """Without the extension the op's CPU dispatch is the PyTorch code (and passes opcheck)."""
    code = (
        "import torch\n"
        "from align_ti import native\n"
        "from align_ti.ops import fused_kl as F\n"
        "from tests.ops.test_native import _opcheck_args\n"
        "assert not native.native_available()\n"
        "args = _opcheck_args()\n"
        "torch.library.opcheck(torch.ops.align_ti.kl_chunk.default, args,\n"
        "                      test_utils=('test_schema', 'test_faketensor'))\n"
        "a1 = [x.clone() if isinstance(x, torch.Tensor) else x for x in args]\n"
        "a2 = [x.clone() if isinstance(x, torch.Tensor) else x for x in args]\n"
        "d1, nll1, gce1 = torch.ops.align_ti.kl_chunk(*a1)\n"
        "d2, nll2, g2, gce2 = F._chunk_torch(*a2)\n"
        "assert torch.equal(d1, d2) and torch.equal(nll1, nll2) and torch.equal(gce1, gce2)\n"
        "assert torch.equal(a1[0], g2)\n"
        "print('OK')\n"
    )
    env = dict(os.environ, ALIGN_TI_NATIVE_DIR=str(tmp_path), PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("divergence", ["forward", "reverse", "jsd"])
def test_fused_kl_direct_rows_native(use_native, divergence, reduction):
    """fp32 logits, all rows: the kernel reads the logits in place and writes the gradient
    rows (g_out); Vs != Vt, so the rows are strided and gradient columns >= V' stay 0."""
    g = torch.Generator().manual_seed(8)
    zs = (torch.randn(N, VT, generator=g) * 3).requires_grad_()
    zt = torch.randn(N, VS, generator=g) * 3
    zs0, zt0 = zs.detach().clone(), zt.clone()
    up = [torch.randn(N)] if reduction == "none" else None
    _compare(align_ti.fused_kl, fused_kl_reference, {"student_logits": zs, "teacher_logits": zt},
             upstream=up, divergence=divergence, temperature=2.0, reduction=reduction,
             weights=torch.rand(N))
    assert torch.equal(zs.detach(), zs0) and torch.equal(zt, zt0)  # inputs untouched
