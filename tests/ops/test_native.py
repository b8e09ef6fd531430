"""The native CPU kernel of the fused KL's per-chunk step (`align_ti::kl_chunk`, csrc/).

The session fixture builds the extension (`align_ti.native.build()`, cached per torch
version, ~30 s the first time) so that these tests run wherever CMake, Ninja and a C++
compiler are present (CI installs cmake and ninja from PyPI with the `test` extra). Without
them the tests are skipped with the reason; with them a failing build is a test failure.
Set ALIGN_TI_NATIVE_TESTS=0 to skip the build and these tests.

Checks: the kernel against the PyTorch chunk code (the op's default, every option), also with
bf16 / fp16 / mixed input rows read directly and the gradient stored in their dtype (exactly
the fp32 gradient rounded once), and the public ops with the kernel against the fp32
reference (each divergence, temperatures, fp32, bf16 and fp16, odd V, V' slicing, ignored
labels, NaN propagation, no fp32 chunk copies on the bf16 logits path), the fallback on a
broken build, the CLI, and packaging (a wheel built from the sdist carries the sources, and
an installed package finds them).
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
from align_ti.ops.fused_kl import rows as fkl_rows
from align_ti.ops.fused_kl.chunk_op import kl_chunk_default, kl_chunk_into_default
from align_ti.ops.fused_kl.driver import logits_driver, uses_native_kernel
from align_ti.ops.fused_kl.options import FusedKLOptions, KLOptions
from align_ti.ops.fused_kl.rows import RowPlan
from align_ti.reference.fused_kl import (
    fused_kl_reference,
    fused_linear_distill_reference,
    fused_linear_kl_reference,
)
from tests.ops.test_fused_kl import (  # the same seeded heads, hidden states and masks
    MASK_CASES,
    check_masked_label_ce,
    check_masked_logits,
    check_ce_weight_folds_the_ce_gradient,
    check_weightless_rows_without_distribution,
    make,
    mask_columns,
    masked_heads,
    masked_logits,
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
    return uses_native_kernel(zs, zs)


def torch_chunk(zs, zt, *args):
    """The chunk step in PyTorch (align_ti::kl_chunk's default implementation, whatever kernel
    is registered) on fp32 copies: (d, nll, gradient, gce)."""
    zs32, zt32 = zs.to(torch.float32, copy=True), zt.to(torch.float32, copy=True)
    d, nll, gce = kl_chunk_default(zs32, zt32, *args)
    return d, nll, zs32, gce


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
    d1, nll1, g1, gce1 = torch_chunk(zs0, zt0, *args)
    zs2, zt2 = zs0.clone(), zt0.clone()
    assert _kernel_ran(zs2)
    d2, nll2, gce2 = torch.ops.align_ti.kl_chunk(zs2, zt2, *args)
    assert_close(d2, d1, atol=2e-5, rtol=1e-5, name="d")
    if with_labels:
        assert_close(nll2, nll1, atol=2e-5, rtol=1e-5, name="nll")
    if need_grad:  # the kernel keeps each lse as shift + log_sum: other roundings (~1e-7)
        assert_close(zs2, g1, atol=5e-7, rtol=1e-4, name="grad")
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


@pytest.mark.parametrize("case", list(MASK_CASES))
@pytest.mark.parametrize("div,with_labels,split", [(0, True, False), (1, True, True), (2, False, False),
                                                   (0, False, False), (1, False, False), (2, True, True)])
def test_kernel_matches_torch_chunk_with_minus_inf_masks(native_lib, case, div, with_labels, split):
    """-inf masks in the kernel as in the PyTorch chunk code: values (+inf where
    the case makes D infinite), CE and gradients; a V wider than one L1 block (2048), whose
    first block is all masked, and a zero-coefficient row whose gradient must be exactly 0."""
    r, v, extra = 5, 4500, 29
    zs0, zt0 = masked_logits(case, r, v + extra, v, lead=2100)
    g = torch.Generator().manual_seed(div)
    labels = torch.randint(v, v + extra, (r,), generator=g)  # past V': never masked
    labels[2] = -100
    labels[3] = 2200  # an unmasked column below V'
    a, c = torch.rand(r, generator=g) + 0.1, torch.rand(r, generator=g)
    a[1] = 0.0
    args = (v, div, 0.3, 0.5, labels if with_labels else None, a, c if with_labels else None, True,
            split)
    d1, nll1, g1, gce1 = torch_chunk(zs0, zt0, *args)
    zs2 = zs0.clone()
    d2, nll2, gce2 = torch.ops.align_ti.kl_chunk(zs2, zt0.clone(), *args)
    infinite = ("forward", "reverse", "jsd")[div] in MASK_CASES[case]
    assert bool(torch.isinf(d2).all()) == infinite and not torch.isnan(d2).any()
    assert_close(d2, d1, atol=2e-5, rtol=1e-5, name="d")
    if with_labels:
        assert_close(nll2, nll1, atol=2e-5, rtol=1e-5, name="nll")
    assert torch.isfinite(zs2).all()
    if split or not with_labels:  # the divergence's gradient alone
        assert (zs2[1, :v] == 0).all()
    if not infinite:
        assert_close(zs2, g1, atol=5e-7, rtol=1e-4, name="grad")
        if case != "teacher":
            assert (zs2[:, mask_columns(v, 2100)] == 0).all()
    if with_labels and split:
        assert_close(gce2, gce1, atol=1e-7, rtol=1e-4, name="grad ce")


# --------------------------------------------------------------------------------------------
# the public ops with the kernel, against the fp32 reference
# --------------------------------------------------------------------------------------------

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
    _compare(align_ti.fused_linear_kl, fused_linear_kl_reference, make(), rows=rows,
             weights=torch.rand(40), divergence=divergence, beta=0.3, temperature=temperature)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("divergence", ["forward", "reverse", "jsd"])
def test_distill_native_ignored_labels_and_vocab_slice(use_native, divergence, reduction):
    """CE with -100 labels, V' < Vs (the student's CE columns beyond V'), T = 2, odd V."""
    t = make(vs=1300, vt=1271)
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
    t = make(vs=1300, vt=1271)
    labels = torch.randint(0, 1300, (N,))
    _compare(align_ti.fused_linear_distill, fused_linear_distill_reference, t, labels=labels,
             temperature=1.0, vocab_size=1271)


def test_distill_all_labels_ignored_native(use_native):
    t = make()
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
    t = make(torch.bfloat16, torch.bfloat16)
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
    t = make()
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


def _run_with_empty_native_cache(code: str, cache_dir) -> subprocess.CompletedProcess:
    """`python -c code` in a fresh interpreter whose native-kernel cache is `cache_dir` (empty:
    no build there), the repo importable."""
    env = dict(os.environ, ALIGN_TI_NATIVE_DIR=str(cache_dir), PYTHONPATH=ROOT)
    env.pop("ALIGN_TI_NATIVE", None)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300, cwd=ROOT)


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
    proc = _run_with_empty_native_cache(code, tmp_path)
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
    proc = _run_with_empty_native_cache(code, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "build-native" in proc.stdout


def test_cli_build_native(native_lib, capsys):
    from align_ti.cli import main

    assert main(["build-native"]) == 0  # cached: loads, reports
    out = capsys.readouterr().out
    assert native_lib in out and "loaded" in out


def _configure(tmp_path, torch_dir):
    """CMake configure (no build) of CMakeLists.txt against the torch package folder `torch_dir`."""
    cmake, ninja = native._tool("cmake"), native._tool("ninja")
    if cmake is None or ninja is None:
        pytest.skip("cmake and ninja are needed (pip install cmake ninja)")
    return subprocess.run([cmake, "-S", ROOT, "-B", str(tmp_path / "build"), "-G", "Ninja",
                           f"-DCMAKE_MAKE_PROGRAM={ninja}", f"-DALIGN_TI_TORCH_DIR={torch_dir}"],
                          capture_output=True, text=True, timeout=300)


def test_native_build_uses_the_standard_torch_needs(tmp_path):
    """The compile line has the C++ standard the installed torch's CMake config states (20 for
    torch >= 2.14, whose headers fail under C++17), not a fixed one. (The native_lib fixture
    builds with it.)"""
    import re

    torch_dir = os.path.dirname(os.path.abspath(torch.__file__))
    with open(os.path.join(torch_dir, "share", "cmake", "Torch", "TorchConfig.cmake")) as f:
        wanted = re.search(r"CXX_STANDARD (\d+)", f.read()).group(1)
    proc = _configure(tmp_path, torch_dir)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    flags = set(re.findall(r"-std=\S+", (tmp_path / "build" / "build.ninja").read_text()))
    assert flags == {f"-std=c++{wanted}"}, flags


def test_native_build_names_a_standard_the_compiler_lacks(tmp_path):
    """A compiler without the standard torch needs: CMake stops with one message naming the
    standard, and native.cmake_error turns CMake's output into that one line."""
    fake = tmp_path / "torch"  # a stand-in torch folder: configure only looks the libraries up
    (fake / "share" / "cmake" / "Torch").mkdir(parents=True)
    (fake / "share" / "cmake" / "Torch" / "TorchConfig.cmake").write_text(
        "set_target_properties(torch PROPERTIES CXX_STANDARD 41)\n")
    (fake / "lib").mkdir()
    for lib in ("libc10.so", "libtorch_cpu.so"):
        (fake / "lib" / lib).write_bytes(b"")
    proc = _configure(tmp_path, fake)
    assert proc.returncode != 0
    reason = native.cmake_error(proc.stdout + proc.stderr)
    assert reason and "needs C++41" in reason and "does not support" in reason, proc.stdout + proc.stderr
    assert "\n" not in reason


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
        "from align_ti.ops.fused_kl.chunk_op import kl_chunk_default\n"
        "from tests.ops.test_native import _opcheck_args\n"
        "assert not native.native_available()\n"
        "args = _opcheck_args()\n"
        "torch.library.opcheck(torch.ops.align_ti.kl_chunk.default, args,\n"
        "                      test_utils=('test_schema', 'test_faketensor'))\n"
        "a1 = [x.clone() if isinstance(x, torch.Tensor) else x for x in args]\n"
        "a2 = [x.clone() if isinstance(x, torch.Tensor) else x for x in args]\n"
        "d1, nll1, gce1 = torch.ops.align_ti.kl_chunk(*a1)\n"
        "d2, nll2, gce2 = kl_chunk_default(*a2)\n"
        "assert torch.equal(d1, d2) and torch.equal(nll1, nll2) and torch.equal(gce1, gce2)\n"
        "assert torch.equal(a1[0], a2[0])\n"
        "print('OK')\n"
    )
    proc = _run_with_empty_native_cache(code, tmp_path)
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("case", list(MASK_CASES))
@pytest.mark.parametrize("divergence", ["forward", "reverse", "jsd"])
def test_minus_inf_masks_logits_native(use_native, divergence, case, reduction, dtype):
    """fused_kl on -inf-masked logits with the kernel: all rows read in place (fp32: the direct
    path) or gathered rows, fp32 and bf16 logits, against the reference (see
    tests/ops/test_fused_kl.py::check_masked_logits)."""
    rows = torch.tensor([4, 0, 6, 6, 2]) if reduction == "mean" else None
    low = dtype != torch.float32
    check_masked_logits("torch", case, divergence, reduction, dtype=dtype, n=7, vs=4529, vt=4500,
                        lead=2100, rows=rows, grad_atol=1e-4 if low else 1e-6)


@pytest.mark.parametrize("divergence", ["forward", "reverse", "jsd"])
def test_minus_inf_bias_linear_native(use_native, divergence):
    """-inf entries in both biases, V' = 1000 < Vs < Vt, CE labels (see test_fused_kl.py's
    test_minus_inf_bias_linear, which runs the PyTorch chunk code)."""
    t, cols = masked_heads()
    labels = torch.randint(0, VS, (N,))
    labels = torch.where(torch.isin(labels, torch.tensor(cols["both"] + cols["ce_only"])), 5, labels)
    kw = dict(labels=labels, divergence=divergence, temperature=2.0, vocab_size=1000)
    if divergence == "reverse":
        kl, ce = align_ti.fused_linear_distill(**t, impl="torch", **kw)
        assert kl.item() == float("inf")
        assert_close(ce, fused_linear_distill_reference(**t, **kw)[1])
        return
    _compare(align_ti.fused_linear_distill, fused_linear_distill_reference, t, **kw)


def test_masked_label_gives_infinite_ce_native(use_native):
    check_masked_label_ce("torch")


# --------------------------------------------------------------------------------------------
# bf16 / fp16 logits read directly (no fp32 chunk copies), gradient stored in their dtype
# --------------------------------------------------------------------------------------------

_DT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_LOW_PAIRS = [(s, t) for s in _DT for t in _DT if (s, t) != ("fp32", "fp32")]


def _low_chunk_args(ts, tt, div, mode):
    """Odd V (1271, a tail of 7 lanes), student wider than V' when labels are given, teacher
    rows strided (a [:, :v] view of 1300 columns), labels in the tail and beyond V'."""
    g = torch.Generator().manual_seed(11 * div + len(mode))
    r, v = 9, 1271
    extra = 0 if mode in ("plain", "ce_shared") else 29
    ns = v + extra
    zs = (torch.randn(r, ns, generator=g) * 3).to(_DT[ts])
    zt = (torch.randn(r, 1300, generator=g) * 3).to(_DT[tt])
    labels = torch.randint(0, ns, (r,), generator=g)
    labels[2] = -100
    labels[5] = ns - 1
    labels[6] = v - 1
    a, c = torch.rand(r, generator=g), torch.rand(r, generator=g)
    with_labels = mode != "plain"
    inv_t = 1.0 if mode == "ce_shared" else 0.5
    args = (v, div, 0.3, inv_t, labels if with_labels else None, a, c if with_labels else None,
            True, mode == "ce_split")
    return zs, zt, args


@pytest.mark.parametrize("mode", ["plain", "ce", "ce_split", "ce_shared"])
@pytest.mark.parametrize("div", [0, 1, 2])
@pytest.mark.parametrize("ts,tt", _LOW_PAIRS)
def test_kernel_low_precision_inputs(native_lib, ts, tt, div, mode):
    """bf16/fp16 (and mixed) rows read directly: the fp32 math matches the PyTorch chunk code on
    exact fp32 copies; a gradient stored in zs's dtype (g_out, or in place) is exactly the fp32
    gradient rounded once; the inputs are only read when g_out is given."""
    zs, zt, args = _low_chunk_args(ts, tt, div, mode)
    v = args[0]
    zs0, zt0 = zs.clone(), zt.clone()
    d1, nll1, g1, gce1 = torch_chunk(zs, zt[:, :v], *args)

    g32 = torch.empty(zs.shape, dtype=torch.float32)
    d2, nll2, gce2 = torch.ops.align_ti.kl_chunk(zs, zt[:, :v], *args, g32)
    assert torch.equal(zs, zs0) and torch.equal(zt, zt0), "inputs were written"
    assert_close(d2, d1, atol=2e-5, rtol=1e-5, name="d")
    if mode != "plain":
        assert_close(nll2, nll1, atol=2e-5, rtol=1e-5, name="nll")
    assert_close(g32, g1, atol=1e-7, rtol=1e-4, name="grad fp32")
    if mode == "ce_split":
        assert_close(gce2, gce1, atol=1e-7, rtol=1e-4, name="grad ce")

    if zs.dtype != torch.float32:
        glo = torch.empty(zs.shape, dtype=zs.dtype)
        d3, _, _ = torch.ops.align_ti.kl_chunk(zs, zt[:, :v], *args, glo)
        assert_close(d3, d2, atol=1e-7, rtol=1e-6, name="d (low-precision g_out)")
        _assert_rounded(glo, g32, "low-precision g_out")
        zs_ip, zt_ip = zs.clone(), zt[:, :v].clone()  # in place: zs gets the gradient
        d4, _, _ = torch.ops.align_ti.kl_chunk(zs_ip, zt_ip, *args)
        assert_close(d4, d2, atol=1e-7, rtol=1e-6, name="d (in place)")
        _assert_rounded(zs_ip, g32, "in-place low-precision gradient")


def _ulp(dtype):
    """(relative ulp, smallest subnormal) of a low-precision dtype."""
    return (2.0 ** -7, 2.0 ** -133) if dtype == torch.bfloat16 else (2.0 ** -10, 2.0 ** -24)


def _assert_rounded(lo, g32, name):
    """lo is the fp32 gradient rounded once to lo's dtype: exactly that almost everywhere (the
    fp32 values of two kernel instantiations may differ in the last bit), within one ulp."""
    exact = lo == g32.to(lo.dtype)
    assert exact.float().mean().item() > 0.999, f"{name}: {int((~exact).sum())} entries not the rounded fp32 value"
    rel, tiny = _ulp(lo.dtype)
    assert_close(lo, g32, atol=tiny, rtol=rel, name=name)


@pytest.mark.parametrize("ts,tt", [("bf16", "bf16"), ("fp16", "fp32")])
def test_op_default_implementation_low_precision(ts, tt):
    """The op's PyTorch implementation (no extension) accepts bf16/fp16 rows the same way."""
    zs, zt, args = _low_chunk_args(ts, tt, 2, "ce")
    v = args[0]
    d1, nll1, g1, _ = torch_chunk(zs, zt[:, :v], *args)
    g_out = torch.empty(zs.shape, dtype=zs.dtype)
    d2, nll2, _ = kl_chunk_default(zs, zt[:, :v], *args, g_out)
    assert torch.equal(d2, d1) and torch.equal(nll2, nll1)
    assert torch.equal(g_out, g1.to(zs.dtype))
    zs_ip = zs.clone()
    d3, _, _ = kl_chunk_default(zs_ip, zt[:, :v].clone(), *args)
    assert torch.equal(d3, d1) and torch.equal(zs_ip, g1.to(zs.dtype))


@pytest.mark.parametrize("ts,tt", [("fp32", "fp32"), ("bf16", "fp16")])
def test_read_only_op_default_implementation(ts, tt):
    """align_ti::kl_chunk_into without the extension: the chunk code's results, the gradient
    in g_out, zs and zt untouched (fp32 rows too, which kl_chunk uses as scratch); no g_out
    with need_grad is refused; the op writes only what it declares (opcheck's schema test)."""
    zs, zt, args = _low_chunk_args(ts, tt, 1, "ce")
    v = args[0]
    zs0, zt0 = zs.clone(), zt[:, :v].clone()
    d1, nll1, g1, _ = torch_chunk(zs, zt0, *args)
    g_out = torch.empty(zs.shape, dtype=zs.dtype)
    d2, nll2, _ = kl_chunk_into_default(zs, zt[:, :v], *args, g_out)
    assert torch.equal(zs, zs0) and torch.equal(zt[:, :v], zt0), "inputs were written"
    assert torch.equal(d2, d1) and torch.equal(nll2, nll1) and torch.equal(g_out, g1.to(zs.dtype))
    with pytest.raises(ValueError, match="g_out"):
        kl_chunk_into_default(zs, zt[:, :v], *args)
    torch.library.opcheck(torch.ops.align_ti.kl_chunk_into.default, (zs, zt[:, :v], *args, g_out),
                          test_utils=("test_schema", "test_faketensor"))  # whichever kernel is registered


def test_opcheck_native_read_only_kernel(native_lib):
    zs, zt, args = _low_chunk_args("bf16", "fp16", 0, "ce")
    v = args[0]
    for g_out in (torch.zeros(zs.shape, dtype=torch.bfloat16), torch.zeros(zs.shape)):
        torch.library.opcheck(torch.ops.align_ti.kl_chunk_into.default, (zs, zt[:, :v], *args, g_out),
                              test_utils=("test_schema", "test_faketensor"))


def test_opcheck_native_kernel_bf16(native_lib):
    zs, zt, args = _low_chunk_args("bf16", "fp16", 0, "ce")
    v = args[0]
    for g_out in (None, torch.zeros(zs.shape, dtype=torch.bfloat16), torch.zeros(zs.shape)):
        torch.library.opcheck(torch.ops.align_ti.kl_chunk.default,
                              (zs.clone(), zt[:, :v].clone(), *args, g_out),
                              test_utils=("test_schema", "test_faketensor"))


def test_kernel_rejects_bad_dtypes(native_lib):
    zs, zt, args = _low_chunk_args("bf16", "bf16", 0, "plain")
    v = args[0]
    with pytest.raises(RuntimeError, match="g_out must be float32 or zs's dtype"):
        torch.ops.align_ti.kl_chunk(zs, zt[:, :v], *args, torch.zeros(zs.shape, dtype=torch.float16))
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        torch.ops.align_ti.kl_chunk(zs.double(), zt[:, :v], *args)


@pytest.mark.parametrize("rows", ["all", "index", "mask_inside"])
@pytest.mark.parametrize("divergence", ["forward", "reverse", "jsd"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_kl_low_precision_native_vs_torch_path_and_reference(native_lib, monkeypatch, dtype,
                                                                   divergence, rows):
    """bf16/fp16 logits, Vs = 1300 > Vt = 1271 (student rows strided, gradient columns >= V'
    zero): the native path (rows read in place, or gathered in their dtype) gives the loss of
    the fp32 reference and a gradient within one rounding of the PyTorch path's."""
    if rows == "mask_inside":
        monkeypatch.setattr(fkl_rows, "MASK_AS_INDICES_DEVICES", ())
    g = torch.Generator().manual_seed(21)
    zs = (torch.randn(N, VT, generator=g) * 3).to(dtype).requires_grad_()
    zt = (torch.randn(N, VS, generator=g) * 3).to(dtype)
    sel = {"all": None, "index": torch.randperm(N, generator=g)[:40],
           "mask_inside": torch.rand(N, generator=g) > 0.3}[rows]
    m = N if sel is None else (40 if rows == "index" else int(sel.sum()))
    kw = dict(rows=sel, weights=torch.rand(m, generator=g) if rows != "mask_inside" else None,
              divergence=divergence, temperature=2.0, beta=0.3)
    res = {}
    for flag in (True, False):
        native.set_enabled(flag)
        try:
            res[flag] = _run(align_ti.fused_kl, {"student_logits": zs, "teacher_logits": zt},
                             impl="torch", **kw)
        finally:
            native.set_enabled(None)
    (loss_n,), gn = res[True]
    (loss_t,), gt = res[False]
    hi = zs.detach().float().requires_grad_()
    (loss_r,), gr = _run(fused_kl_reference, {"student_logits": hi, "teacher_logits": zt.float()}, **kw)
    assert gn["student_logits"].dtype == dtype
    assert_close(loss_n, loss_r, atol=2e-6, rtol=1e-5, name="loss vs fp32 reference")
    assert_close(loss_n, loss_t, atol=2e-6, rtol=1e-5, name="loss vs torch path")
    # both paths round an fp32 gradient once: one ulp apart at most, plus the fp32 difference
    # of p_S - p_T where the two nearly cancel (absolute, ~1e-13 here)
    rel, tiny = _ulp(dtype)
    tiny = max(tiny, 1e-9)
    assert_close(gn["student_logits"], gt["student_logits"], atol=tiny, rtol=rel, name="grad vs torch path")
    assert_close(gn["student_logits"], gr["student_logits"], atol=tiny, rtol=rel, name="grad vs reference")
    assert (gn["student_logits"][:, VS:] == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_logits_driver_native_makes_no_fp32_chunk_copies(native_lib, dtype):
    """All rows, native: no [rows, V] fp32 tensor is created (no chunk copies, no fp32
    gradient); with the kernel off, the PyTorch path does make them (the check can fail)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class Largest(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t is not args[0]:
                    self.largest = max(self.largest, t.numel())
            return out

    g = torch.Generator().manual_seed(2)
    v = 1300
    zs = (torch.randn(N, v, generator=g) * 3).to(torch.bfloat16)
    zt = (torch.randn(N, v, generator=g) * 3).to(torch.bfloat16)
    if dtype == torch.float32:  # fp32 student, bf16 teacher
        zs = zs.float()
    opts = FusedKLOptions(KLOptions("jsd"), vocab_size=v, impl="torch")
    seen = {}
    for flag in (True, False):
        native.set_enabled(flag)
        try:
            with Largest() as rec:
                loss, grad = logits_driver(zs, zt, RowPlan(), opts, need_grad=True)
        finally:
            native.set_enabled(None)
        seen[flag] = (rec.largest, loss, grad)
    big_fp32 = seen[True][0]
    if dtype == torch.bfloat16:
        assert big_fp32 < v, f"native path made an fp32 tensor of {big_fp32} elements"
    else:  # the fp32 student gradient [N, V] is the output itself; nothing else that size
        assert big_fp32 <= N * v
    assert seen[False][0] >= v, "the PyTorch path made no fp32 chunk copies: the check is void"
    assert seen[True][2].dtype == zs.dtype
    assert_close(seen[True][1], seen[False][1], atol=2e-6, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# packaging: an installed align-ti (wheel, built from the sdist) carries the native sources
# --------------------------------------------------------------------------------------------

def _copy_project(dst):
    def ignore(folder, names):
        return [n for n in names if n in ("__pycache__", "results", ".pytest_cache")
                or n.endswith((".pyc", ".egg-info"))]

    for name in ("setup.py", "pyproject.toml", "README.md", "MANIFEST.in", "CMakeLists.txt"):
        if os.path.exists(os.path.join(ROOT, name)):
            shutil.copy2(os.path.join(ROOT, name), os.path.join(dst, name))
    for name in ("align_ti", "kernels", "benchmarks", "csrc"):
        shutil.copytree(os.path.join(ROOT, name), os.path.join(dst, name), ignore=ignore)


def test_installed_package_can_build_native(native_lib, tmp_path):
    """sdist -> wheel -> installed into a folder: the wheel holds align_ti/_native_src/ (the
    same CMakeLists.txt and csrc/ as the checkout, so the same source hash), `source_dir()`
    of the installed package points there and `build()` finds its (cached) library."""
    pytest.importorskip("setuptools")
    import tarfile
    import zipfile

    src, out, site = tmp_path / "src", tmp_path / "out", tmp_path / "site"
    for d in (src, out, site):
        d.mkdir()
    _copy_project(str(src))
    run = dict(capture_output=True, text=True, timeout=600)
    proc = subprocess.run([sys.executable, "-c",
                           "from setuptools import build_meta as b; print(b.build_sdist(%r))" % str(out)],
                          cwd=src, **run)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sdist = out / proc.stdout.strip().splitlines()[-1]
    with tarfile.open(sdist) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    assert {"CMakeLists.txt", "csrc/fused_kl_cpu.cpp"} <= names, sorted(names)

    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                           "-q", "-w", str(out), str(sdist)], **run)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = out.glob("*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        for rel in native._SOURCES:
            packaged = "align_ti/_native_src/" + rel.replace(os.sep, "/")
            assert packaged in names, sorted(n for n in names if "native" in n)
            with open(os.path.join(ROOT, rel), "rb") as f:
                assert zf.read(packaged) == f.read(), rel
        assert not any(n.endswith((".so", ".o")) for n in names)  # nothing compiled

    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                           str(site), str(wheel)], **run)
    assert proc.returncode == 0, proc.stderr[-3000:]
    code = (
        "import os, align_ti\n"
        "from align_ti import native\n"
        "assert align_ti.__file__.startswith(%r), align_ti.__file__\n"
        "src = native.source_dir()\n"
        "assert src == os.path.join(os.path.dirname(align_ti.__file__), '_native_src'), src\n"
        "print('HASH', native._source_hash(src))\n"
        "print('LIB', native.build())\n"
        "assert native.native_available(), native.info()  # the installed ops define its schema\n"
    ) % str(site)
    env = dict(os.environ, PYTHONPATH=str(site))
    env.pop("ALIGN_TI_NATIVE_SRC", None)
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, **run)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = dict(ln.split(" ", 1) for ln in proc.stdout.splitlines() if ln.startswith(("HASH", "LIB")))
    assert lines["HASH"] == native._source_hash(ROOT)
    assert lines["LIB"] == native_lib


def test_checkout_source_dir_is_repo_root():
    assert native.source_dir() in (ROOT, os.path.abspath(os.environ.get("ALIGN_TI_NATIVE_SRC", ROOT)))


def test_fused_kl_leaves_the_callers_logits_unversioned(use_native):
    """The logits path hands the caller's rows to the kernel through the read-only op: another
    backward that saved those logits still works (a declared write bumped their version)."""
    h = torch.randn(6, 8, requires_grad=True)
    w = torch.randn(50, 8)
    zt = torch.randn(6, 50)
    z = h @ w.t()
    assert _kernel_ran(z)
    other = torch.logsumexp(z, -1).pow(2).mean()  # saves z for its backward
    version = z._version
    (align_ti.fused_kl(z, zt, impl="torch") + 1e-4 * other).backward()
    assert z._version == version
    h_ref = h.detach().clone().requires_grad_()
    z_ref = h_ref @ w.t()
    (fused_kl_reference(z_ref, zt) + 1e-4 * torch.logsumexp(z_ref, -1).pow(2).mean()).backward()
    assert_close(h.grad, h_ref.grad, atol=1e-6, rtol=1e-4, name="grad h")


@pytest.mark.parametrize("div", [0, 1])
def test_kernel_divergence_keeps_its_precision_at_large_logits(native_lib, div):
    """Logits of std 100 and close distributions: no further from the fp64 truth than plain
    fp32 torch (an lse rounded at the logits' size, 3e-5, lost the whole divergence)."""
    g = torch.Generator().manual_seed(5)
    zs0 = torch.randn(8, 3000, generator=g) * 100
    zt0 = zs0 + torch.randn(8, 3000, generator=g)
    d, _, _ = torch.ops.align_ti.kl_chunk(zs0.clone(), zt0.clone(), 3000, div, 0.5, 1.0, None,
                                          None, None, False, False)
    ls, lt = torch.log_softmax(zs0.double(), -1), torch.log_softmax(zt0.double(), -1)
    ls32, lt32 = torch.log_softmax(zs0, -1), torch.log_softmax(zt0, -1)
    truth = (lt.exp() * (lt - ls) if div == 0 else ls.exp() * (ls - lt)).sum(-1)
    plain = (lt32.exp() * (lt32 - ls32) if div == 0 else ls32.exp() * (ls32 - lt32)).sum(-1)
    assert_three_way(d, plain, truth.float(), atol=1e-7)


def test_native_weightless_rows_without_distribution(use_native):
    """A weight-0 row whose teacher has no distribution gets exactly 0 gradient from the native
    kernel too (the Triton kernel and the PyTorch path do; 0 * NaN was NaN)."""
    check_weightless_rows_without_distribution("torch")


def test_native_ce_weight_folds_the_ce_gradient(use_native):
    check_ce_weight_folds_the_ce_gradient("torch")
