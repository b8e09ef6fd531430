"""select_topk / topk_align / topk_feature_align against the references.

Tiers: CPU (impl="torch", always), interpreter (`-m interpret`, impl="triton" on CPU tensors
under TRITON_INTERPRET=1; fp32/fp16 only), GPU (`-m gpu`, CUDA; bf16 three-way, larger shapes).
"""
from __future__ import annotations

import os

import pytest
import torch

from align_ti.ops.topk_align import (
    FeatureProjection,
    select_topk,
    topk_align,
    topk_feature_align,
)
from align_ti.reference.topk_align import select_topk_reference, topk_align_reference
from tests.utils import assert_close, assert_three_way

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
B, L, HS, HT, VS, VT = 3, 63, 24, 40, 1271, 1300
SEL_OPTS = [dict(), dict(k=1), dict(k=5), dict(k=1000), dict(ratio=0.1), dict(ratio=0.37), dict(ratio=1.0)]


def make_inputs(b=B, length=L, hs=HS, ht=HT, vs=VS, vt=VT, bias=False, dtype=torch.float32,
                imageless=(1,), device="cpu", seed=1234):
    g = torch.Generator().manual_seed(seed)
    t = {
        "student_hidden": torch.randn(b, length, hs, generator=g),
        "student_weight": torch.randn(vs, hs, generator=g) * 0.4,
        "teacher_hidden": torch.randn(b, length, ht, generator=g),
        "teacher_weight": torch.randn(vt, ht, generator=g) * 0.4,
    }
    if bias:
        t["student_bias"] = torch.randn(vs, generator=g) * 0.2
        t["teacher_bias"] = torch.randn(vt, generator=g) * 0.2
    t = {k: v.to(device=device, dtype=dtype) for k, v in t.items()}
    # vision tokens: a contiguous span per sample (different lengths), right padding after
    vision = torch.zeros(b, length, dtype=torch.bool)
    for i in range(b):
        start, n = 2 + i, max(1, length // 2 - 3 * i)
        vision[i, start:start + n] = True
    for i in imageless:
        if i < b:
            vision[i] = False
    mass = torch.rand(b, length, generator=g) ** 3
    mass[:, ::7] = 0.05  # ties
    t["mass"] = mass.to(device)
    t["vision_mask"] = vision.to(device)
    return t


def leaves(t, names=("student_hidden", "student_weight", "student_bias")):
    out = {}
    for k, v in t.items():
        out[k] = v.detach().clone().requires_grad_(k in names) if v.is_floating_point() else v
    return out


def grads_of(loss, t, names=("student_hidden", "student_weight", "student_bias")):
    keys = [n for n in names if n in t]
    return dict(zip(keys, torch.autograd.grad(loss, [t[n] for n in keys])))


# --------------------------------------------------------------------------------------------
# selection
# --------------------------------------------------------------------------------------------

def _random_selection_inputs(seed):
    g = torch.Generator().manual_seed(seed)
    b, length = 1 + seed % 4, 1 + (seed * 7) % 40
    if seed % 2:
        mass = torch.randint(0, 4, (b, length), generator=g).float() / 4  # many ties
    else:
        mass = torch.rand(b, length, generator=g)
    vision = torch.rand(b, length, generator=g) > torch.rand(1, generator=g).item()
    return mass, vision


@pytest.mark.parametrize("opts", SEL_OPTS, ids=str)
def test_select_matches_reference(opts):
    for seed in range(40):
        mass, vision = _random_selection_inputs(seed)
        rows, w = select_topk(mass, vision, **opts)
        rrows, rw = select_topk_reference(mass, vision, **opts)
        assert rows.dtype == torch.int64 and w.dtype == torch.float32
        assert torch.equal(rows, rrows), (seed, opts)
        assert_close(w, rw, atol=0, rtol=1e-6, name=f"weights seed={seed}")
        prows, pw, valid = select_topk(mass, vision, pad=True, **opts)
        assert torch.equal(prows[valid], rows) and torch.equal(pw[valid], w)
        assert bool((pw[~valid] == 0).all())
        assert prows.shape[0] % mass.shape[0] == 0
        cap = prows.shape[0] // mass.shape[0]
        assert bool(((prows // mass.shape[1]) == torch.arange(mass.shape[0]).repeat_interleave(cap)).all())


def test_select_by_hand_ties_clamp_imageless_zero_mass():
    mass = torch.tensor([
        [0.0, 0.3, 0.1, 0.3, 0.2, 0.5],
        [0.9, 0.1, 0.2, 0.0, 0.0, 0.0],   # no vision tokens
        [0.0, 0.0, 0.0, 0.4, 0.6, 0.0],
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],   # vision tokens, zero mass
    ])
    vision = torch.tensor([
        [False, True, True, True, True, False],
        [False] * 6,
        [False, False, False, True, True, False],
        [True, True, False, False, False, False],
    ])
    rows, w = select_topk(mass, vision, k=3)
    assert rows.tolist() == [1, 3, 4, 15, 16, 18, 19]
    assert_close(w, torch.tensor([0.375, 0.375, 0.25, 0.4, 0.6, 0.0, 0.0]))
    rows, _ = select_topk(mass, vision, k=1)
    assert rows.tolist() == [1, 16, 18]  # tie at 1 and 3: the lower position wins
    rows, _, valid = select_topk(mass, vision, k=2, pad=True)
    assert rows.shape == (8,) and valid.tolist() == [True, True, False, False, True, True, True, True]


def test_select_no_image_in_batch_and_empty():
    mass = torch.rand(2, 5)
    rows, w = select_topk(mass, torch.zeros(2, 5, dtype=torch.bool), ratio=0.5)
    assert rows.shape == (0,) and w.shape == (0,)
    rows, w, valid = select_topk(mass, torch.zeros(2, 5, dtype=torch.bool), k=2, pad=True)
    assert rows.shape == (4,) and not bool(valid.any()) and bool((w == 0).all())


def test_select_low_precision_mass_and_minus_inf():
    mass = torch.rand(2, 30).to(torch.bfloat16)  # ties after rounding
    vision = torch.rand(2, 30) > 0.3
    for opts in SEL_OPTS:
        assert torch.equal(select_topk(mass, vision, **opts)[0], select_topk_reference(mass, vision, **opts)[0])
    mass = torch.tensor([[float("-inf"), 0.5, 0.0, 0.2]])
    vision = torch.tensor([[False, False, True, True]])
    rows, weights = select_topk(mass, vision, k=2)  # text mass is never read, -inf included
    assert rows.tolist() == [2, 3] and weights.tolist() == [0.0, 1.0]
    with pytest.raises(ValueError, match="mass"):
        select_topk(mass.flip(1), vision, k=2)  # -inf at a vision token


# --------------------------------------------------------------------------------------------
# topk_align: CPU path against the reference
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "opts",
    [
        dict(),
        dict(k=4),
        dict(ratio=0.25, normalize="token"),
        dict(k=7, divergence="reverse", temperature=2.0),
        dict(ratio=0.5, divergence="jsd", beta=0.3, vocab_size=1000),
        dict(normalize="token", divergence="jsd"),
    ],
    ids=str,
)
@pytest.mark.parametrize("bias", [False, True])
def test_topk_align_torch_matches_reference(opts, bias):
    t = make_inputs(bias=bias)
    a, r = leaves(t), leaves(t)
    loss = topk_align(**a, impl="torch", chunk_bytes=4 * 4 * (VS + VT) * 5, **opts)
    want = topk_align_reference(**r, **opts)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert_close(loss, want, atol=1e-5, rtol=1e-5, name="loss")
    ga, gr = grads_of(loss * 2, a), grads_of(want * 2, r)
    for k in ga:
        assert_close(ga[k], gr[k], atol=1e-6, rtol=1e-4, name=f"grad {k}")


def test_unselected_positions_do_not_matter_and_teacher_gets_no_grad():
    t = make_inputs()
    base = topk_align(**t, k=5, impl="torch")
    t2 = dict(t)
    sh, th = t["student_hidden"].clone(), t["teacher_hidden"].clone()
    rows, _ = select_topk(t["mass"], t["vision_mask"], k=5)
    off = torch.ones(B * L, dtype=torch.bool)
    off[rows] = False
    sh.view(B * L, -1)[off] = float("nan")
    th.view(B * L, -1)[off] = float("inf")
    t2["student_hidden"], t2["teacher_hidden"] = sh, th
    assert torch.equal(topk_align(**t2, k=5, impl="torch"), base)
    t3 = leaves(t, names=("student_hidden", "teacher_hidden", "teacher_weight", "mass"))
    topk_align(**t3, k=5).backward()
    assert t3["teacher_hidden"].grad is None and t3["teacher_weight"].grad is None
    assert t3["mass"].grad is None
    g = t3["student_hidden"].grad.view(B * L, -1)
    assert bool((g[off] == 0).all()) and bool((g[rows].abs().sum(1) > 0).any())
    r = leaves(t, names=("student_hidden",))
    (want,) = torch.autograd.grad(topk_align_reference(**r, k=5), r["student_hidden"])
    assert_close(g, want.view(B * L, -1), atol=1e-6, rtol=1e-4, name="grad student_hidden")


def test_no_image_in_batch_gives_zero_loss_and_zero_grads():
    t = leaves(make_inputs(imageless=range(B)))
    loss = topk_align(**t)
    assert loss.item() == 0.0
    g = grads_of(loss, t)
    assert all(bool((x == 0).all()) for x in g.values())


def test_zero_mass_sample_contributes_nothing():
    t = make_inputs(imageless=())
    t["mass"][0] = 0.0
    t2 = make_inputs(imageless=(0,))
    assert_close(topk_align(**t, k=3), topk_align(**t2, k=3), atol=0, rtol=0)


def test_normalize_sample_vs_token():
    t = make_inputs(imageless=())
    per = []
    for b in range(B):
        tb = {k: (v[b:b + 1] if k in ("student_hidden", "teacher_hidden", "mass", "vision_mask") else v)
              for k, v in t.items()}
        per.append(topk_align(**tb))
    counts = t["vision_mask"].sum(1).float()
    assert_close(topk_align(**t), torch.stack(per).mean(), atol=1e-6, rtol=1e-5, name="sample")
    assert_close(topk_align(**t, normalize="token"), (torch.stack(per) * counts).sum() / counts.sum(),
                 atol=1e-6, rtol=1e-5, name="token")


def test_bf16_three_way_torch_path():
    t32 = make_inputs(bias=True)
    tbf = {k: (v.to(torch.bfloat16) if v.is_floating_point() and k != "mass" else v) for k, v in t32.items()}
    t_bf_leaves, t32_leaves, tr_leaves = leaves(tbf), leaves(t32), leaves(tbf)
    cand = topk_align(**t_bf_leaves, k=9, impl="torch")
    truth = topk_align_reference(**t32_leaves, k=9)
    # same-dtype plain torch: bf16 logits, softmax in bf16
    from align_ti.ops.topk_align import select_topk as sel

    rows, w = sel(tbf["mass"], tbf["vision_mask"], k=9)
    hs = tr_leaves["student_hidden"].reshape(B * L, -1)[rows]
    zs = (hs @ tr_leaves["student_weight"].t() + tr_leaves["student_bias"])[:, :VS]
    zt = (tbf["teacher_hidden"].reshape(B * L, -1)[rows] @ tbf["teacher_weight"].t() + tbf["teacher_bias"])[:, :VS]
    d = (torch.softmax(zt, -1) * (torch.log_softmax(zt, -1) - torch.log_softmax(zs, -1))).sum(-1)
    plain = (w.to(d.dtype) * d).sum() / w.sum()
    assert_three_way(cand, plain.float(), truth, atol=1e-3, name="bf16 loss")
    gc, gp, gt = grads_of(cand, t_bf_leaves), grads_of(plain, tr_leaves), grads_of(truth, t32_leaves)
    for k in gc:
        assert gc[k].dtype == torch.bfloat16
        assert_three_way(gc[k].float(), gp[k].float(), gt[k], atol=1e-4, name=f"bf16 grad {k}")


@pytest.mark.parametrize("impl, dtype", [
    ("torch", torch.bfloat16),
    pytest.param("triton", torch.float16, marks=pytest.mark.interpret),
])
def test_weight_grad_in_weight_dtype(impl, dtype):
    """fp32_weight_grad=False, on both paths (fused_linear_kl's, and the gather kernel's own
    accumulator): over several row chunks the loss and the hidden-state gradient are those of
    the fp32 accumulator, and the weight gradient, accumulated in the weight's dtype, stays
    within a few roundings of the truth."""
    if impl == "triton" and not INTERPRET:
        pytest.skip("interpreter tier")
    t32 = make_inputs(b=3, length=21, hs=24, ht=40, vs=301, vt=333)
    t = {k: (v.to(dtype) if v.is_floating_point() and k != "mass" else v) for k, v in t32.items()}
    hi = {k: (v.float() if v.is_floating_point() else v) for k, v in t.items()}
    opts = dict(k=5, impl=impl, chunk_bytes=4 * 2 * 301 * 3)  # 3-row chunks of 10 rows
    a, b = leaves(t), leaves(t)
    la = topk_align(**a, fp32_weight_grad=False, **opts)
    lb = topk_align(**b, **opts)
    ga, gb = grads_of(la, a), grads_of(lb, b)
    r = leaves(hi)
    gt = grads_of(topk_align_reference(**r, k=5), r)
    assert torch.equal(la, lb) and torch.equal(ga["student_hidden"], gb["student_hidden"])
    w_lo, w_hi, w_true = ga["student_weight"], gb["student_weight"], gt["student_weight"]
    assert w_lo.dtype == dtype
    assert_close(w_lo.float(), w_true, atol=1e-4, rtol=3e-2, name="weight grad in its dtype")
    assert (w_lo.float() - w_true).abs().mean() <= 8 * (w_hi.float() - w_true).abs().mean() + 1e-7


# --------------------------------------------------------------------------------------------
# -inf vocabulary masks and empty batches, on both drivers
# --------------------------------------------------------------------------------------------

NEG = float("-inf")
BOTH_MASKED, TEACHER_MASKED = [0, 5, 6], [9, 50]
IMPLS = ["torch", pytest.param("triton", marks=pytest.mark.interpret)]


def masked_bias_inputs(**kw):
    """make_inputs with -inf bias entries: both heads mask BOTH_MASKED, the teacher alone
    TEACHER_MASKED (forward KL and JSD stay finite, reverse KL is +inf)."""
    t = make_inputs(bias=True, **kw)
    t["student_bias"][BOTH_MASKED] = NEG
    t["teacher_bias"][BOTH_MASKED + TEACHER_MASKED] = NEG
    return t


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("divergence", ["forward", "reverse", "jsd"])
def test_minus_inf_bias_masks(impl, divergence):
    t = masked_bias_inputs(b=3, length=21, hs=24, ht=40, vs=301, vt=333)
    a, r = leaves(t), leaves(t)
    opts = dict(k=4, divergence=divergence, temperature=1.5)
    loss = topk_align(**a, impl=impl, chunk_bytes=4 * 2 * 301 * 5, **opts)
    want = topk_align_reference(**r, **opts)
    if divergence == "reverse":
        assert loss.item() == want.item() == float("inf")
        return
    assert_close(loss, want, atol=1e-5, rtol=1e-4, name="loss")
    ga, gr = grads_of(loss, a), grads_of(want, r)
    for k in ga:
        assert_close(ga[k], gr[k], atol=1e-5, rtol=1e-3, name=f"grad {k}")
    assert (ga["student_weight"][BOTH_MASKED] == 0).all() and (ga["student_bias"][BOTH_MASKED] == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_zero_mass_rows_with_infinite_divergence_add_nothing(impl):
    """Reverse KL is +inf at every row (the teacher masks columns the student allows); with all
    kept mass 0 no row carries weight: loss 0 and zero gradients, no 0 * inf = NaN."""
    t = masked_bias_inputs(b=2, length=9, hs=16, ht=16, vs=97, vt=97, imageless=())
    t["mass"][:] = 0.0
    a = leaves(t)
    loss = topk_align(**a, k=3, divergence="reverse", impl=impl)
    assert loss.item() == 0.0
    for k, g in grads_of(loss, a).items():
        assert (g == 0).all(), k


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_batch_gives_zero_gradients_of_the_input_shape(impl):
    """B = 0 (no rows at all): zero gradients of the inputs' shapes, never None."""
    a = leaves(make_inputs(b=0, length=9, hs=16, ht=16, vs=97, vt=97, bias=True))
    loss = topk_align(**a, impl=impl)
    assert loss.item() == 0.0
    loss.backward()
    for k in ("student_hidden", "student_weight", "student_bias"):
        assert a[k].grad is not None and a[k].grad.shape == a[k].shape, k
        assert (a[k].grad == 0).all(), k


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "change, match",
    [
        (dict(k=0), "k must be a positive int"),
        (dict(k=-3), "k must be a positive int"),
        (dict(k=2.0), "k must be a positive int"),
        (dict(ratio=0.0), "ratio must be a number in"),
        (dict(ratio=1.5), "ratio must be a number in"),
        (dict(k=2, ratio=0.5), "give k or ratio"),
        (dict(normalize="batch"), "normalize must be one of"),
        (dict(divergence="kl"), "divergence must be one of"),
        (dict(temperature=0.0), "temperature"),
        (dict(impl="cuda"), "impl must be one of"),
    ],
    ids=str,
)
def test_bad_options(change, match):
    with pytest.raises(ValueError, match=match):
        topk_align(**make_inputs(), **change)


def test_fp32_weight_grad_must_be_a_bool():
    with pytest.raises(TypeError, match="fp32_weight_grad must be a bool"):
        topk_align(**make_inputs(), fp32_weight_grad=1)


def test_bad_tensors():
    t = make_inputs()
    with pytest.raises(ValueError, match="vision_mask must have the shape of mass"):
        topk_align(**dict(t, vision_mask=t["vision_mask"][:, :-1]))
    with pytest.raises(ValueError, match=r"mass must be \[B, L\]"):
        topk_align(**dict(t, mass=t["mass"][:, :-1]))
    with pytest.raises(TypeError, match="vision_mask must have dtype"):
        topk_align(**dict(t, vision_mask=t["vision_mask"].long()))
    vm = t["vision_mask"]
    j = int(vm[0].nonzero()[0])
    for poison, match in ((float("nan"), "mass.* must be finite"), (float("inf"), "mass.* must be finite"),
                          (-1.0, "mass.* must be >= 0")):
        bad = t["mass"].clone()
        bad[0, j] = poison
        with pytest.raises(ValueError, match=match):
            topk_align(**dict(t, mass=bad))
        with pytest.raises(ValueError, match=match):
            select_topk(bad, vm)
        for pad in (False, True):  # outside the vision tokens mass is never read
            off = t["mass"].clone()
            off[~vm] = poison
            assert all(torch.equal(a, b) for a, b in zip(select_topk(off, vm, k=3, pad=pad),
                                                         select_topk(t["mass"], vm, k=3, pad=pad)))
    with pytest.raises(TypeError, match="pad"):
        select_topk(t["mass"], vm, pad="no")
    with pytest.raises(ValueError, match="chunk_bytes"):
        topk_align(**t, chunk_bytes=-5)
    with pytest.raises(ValueError, match="student_hidden must be 3-D"):
        topk_align(**dict(t, student_hidden=t["student_hidden"][0]))
    with pytest.raises(ValueError, match="teacher_hidden must have the"):
        topk_align(**dict(t, teacher_hidden=t["teacher_hidden"][:, 1:]))
    with pytest.raises(ValueError, match="student_weight has size"):
        topk_align(**dict(t, student_weight=t["student_weight"][:, 1:]))
    with pytest.raises(ValueError, match="vocab_size"):
        topk_align(**t, vocab_size=VT + 1)
    with pytest.raises(ValueError, match="k must be a positive int"):
        select_topk(t["mass"], t["vision_mask"], k=0)
    with pytest.raises(ValueError, match="ratio must be a number in"):
        select_topk(t["mass"], t["vision_mask"], ratio=-0.1)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(k=0), ValueError, "k must be a positive int"),
    (dict(k=-2), ValueError, "k must be a positive int"),
    (dict(ratio=0.0), ValueError, "ratio must be a number in"),
    (dict(ratio=1.5), ValueError, "ratio must be a number in"),
    (dict(k=2, ratio=0.5), ValueError, "give k or ratio"),
    (dict(vision_mask=torch.ones(2, 4, dtype=torch.bool)), ValueError, "vision_mask must have the shape of mass"),
    (dict(vision_mask=torch.ones(2, 5)), TypeError, "vision_mask must have dtype"),
    (dict(vision_mask=torch.ones(2, 5, dtype=torch.bool, device="meta")), ValueError, "vision_mask is on meta"),
    (dict(mass=torch.tensor([[float("nan"), 1.0, 1, 1, 1]] * 2)), ValueError, "mass.* must be finite"),
    (dict(mass=torch.rand(2, 5).long()), TypeError, "mass must be a floating-point tensor"),
], ids=lambda x: x if isinstance(x, str) else "")
def test_select_bad_input(kwargs, exc, match):
    args = {"mass": torch.rand(2, 5), "vision_mask": torch.ones(2, 5, dtype=torch.bool), **kwargs}
    with pytest.raises(exc, match=match):
        select_topk(**args)


# --------------------------------------------------------------------------------------------
# the torch.library op: schema, fake tensors, torch.compile
# --------------------------------------------------------------------------------------------

def _op_arguments(dtype=torch.float32):
    """align_ti::topk_align's arguments as its schema names them: the tensors, and the options
    (keywords) that the public function would pass."""
    t = leaves(make_inputs(b=2, length=9, hs=8, ht=12, vs=97, vt=101, bias=True, imageless=(),
                           dtype=dtype))
    tensors = tuple(t[k] for k in ("student_hidden", "student_weight", "student_bias",
                                   "teacher_hidden", "teacher_weight", "teacher_bias", "mass",
                                   "vision_mask"))
    options = dict(k=3, ratio=None, normalize="token", need_dh=True, need_dw=True, need_db=True,
                   fp32_weight_grad=True, gather=False, divergence="jsd", beta=0.3,
                   temperature=2.0, reduction="mean", vocab_size=90, impl="torch", chunk_bytes=0)
    return tensors, options


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])  # fp16: the recomputing backward
def test_opcheck(dtype):
    """Schema, fake-tensor and autograd-registration checks of align_ti::topk_align (plus the
    aot_dispatch check where the backward recomputes; the forward-computed gradients are
    scaled in place, as fused_linear_kl's), and of its backward op."""
    from tests.ops.test_fused_kl import opcheck_forward

    tensors, options = _op_arguments(dtype)
    opcheck_forward(torch.ops.align_ti.topk_align.default, tensors, options)
    detached = tuple(x.detach() for x in tensors)
    torch.library.opcheck(torch.ops.align_ti.topk_align_backward.default,
                          (torch.tensor(1.5), *detached), options)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_compile_aot_eager_fullgraph(dtype):
    """topk_align inside torch.compile(fullgraph=True): the selection's data-dependent row count
    stays inside the op, so there is no graph break; the eager loss and gradients (aot_eager on
    CPU; inductor runs in the GPU tier)."""
    t = make_inputs(bias=True, dtype=dtype)

    def loss_fn(student_hidden, student_weight, student_bias):
        loss = topk_align(student_hidden, student_weight, t["teacher_hidden"], t["teacher_weight"],
                          t["mass"], t["vision_mask"], ratio=0.3, normalize="token",
                          divergence="reverse", student_bias=student_bias,
                          teacher_bias=t["teacher_bias"], impl="torch")
        return loss * 3

    a, b = leaves(t), leaves(t)
    names = ("student_hidden", "student_weight", "student_bias")
    eager = loss_fn(*(a[k] for k in names))
    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)(*(b[k] for k in names))
    assert torch.equal(compiled, eager)
    for k, ga, gb in zip(names, grads_of(eager, a).values(), grads_of(compiled, b).values()):
        assert torch.equal(ga, gb), k


# --------------------------------------------------------------------------------------------
# feature-level variant
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("loss_kind", ["cosine", "mse"])
def test_feature_variant(loss_kind):
    t = make_inputs()
    proj = FeatureProjection(HS, HT)
    hs = t["student_hidden"].clone().requires_grad_()
    got = topk_feature_align(hs, t["teacher_hidden"], t["mass"], t["vision_mask"], k=6,
                             loss=loss_kind, projection=proj)
    rows, w = select_topk_reference(t["mass"], t["vision_mask"], k=6)
    hs_ref = t["student_hidden"].clone().requires_grad_()
    ps = proj(hs_ref.reshape(B * L, -1)[rows])
    pt = t["teacher_hidden"].reshape(B * L, -1)[rows]
    if loss_kind == "cosine":
        d = 1 - torch.nn.functional.cosine_similarity(ps, pt, dim=-1)
    else:
        d = ((ps - pt) ** 2).mean(-1)
    want = (w * d).sum() / w.sum()
    assert_close(got, want, atol=1e-6, rtol=1e-5)
    for a, b in zip(torch.autograd.grad(got, (hs, proj.proj.weight)),
                    torch.autograd.grad(want, (hs_ref, proj.proj.weight))):
        assert_close(a, b, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="projection=FeatureProjection"):
        topk_feature_align(t["student_hidden"], t["teacher_hidden"], t["mass"], t["vision_mask"])
    with pytest.raises(ValueError, match="loss must be one of"):
        topk_feature_align(t["student_hidden"], t["teacher_hidden"], t["mass"], t["vision_mask"],
                           loss="l1", projection=proj)


# --------------------------------------------------------------------------------------------
# end to end on the tiny LLaVA models
# --------------------------------------------------------------------------------------------

def test_end_to_end_tiny_llava():
    from align_ti.data.llava import encode_example, pad_batch
    from align_ti.data.synthetic import synthetic_vqa
    from align_ti.models.capture import capture_qk
    from align_ti.models.tiny import IMAGE_TOKEN_ID, build_processor, build_tiny_llava
    from align_ti.ops.attention_mass import attention_mass

    processor = build_processor()
    items = synthetic_vqa(n_images=2, questions_per_image=1, seed=3)
    encoded = [encode_example(processor, it, return_instruction_mask=True) for it in items]
    encoded.append(encode_example(processor, dict(items[0], image=None), return_instruction_mask=True))
    # pad_batch concatenates pixel_values of every example; the image-less one has none, and LLaVA
    # takes one image per <image> span in batch order, so concatenate the others' by hand
    pixels = torch.cat([e.pop("pixel_values") for e in encoded if "pixel_values" in e])
    batch = pad_batch(encoded, processor.tokenizer.pad_token_id)
    batch["pixel_values"] = pixels
    instruction = batch.pop("instruction_mask")
    batch.pop("labels")
    vision = batch["input_ids"] == IMAGE_TOKEN_ID
    assert not bool(vision[2].any()) and bool(vision[0].any())

    teacher = build_tiny_llava("teacher")
    student = build_tiny_llava("student")
    layer = 1  # e.g. the IRS argmax layer of the teacher
    with capture_qk(teacher, layers=[layer]) as cap:
        t_out = teacher(**batch, output_hidden_states=True)
    q, kk = cap[layer]
    mass = attention_mass(q, kk, instruction, batch["attention_mask"])
    s_out = student(**batch, output_hidden_states=True)
    loss = topk_align(
        s_out.hidden_states[-1], student.lm_head.weight,
        t_out.hidden_states[-1], teacher.lm_head.weight,
        mass, vision, ratio=0.5, temperature=1.0,
    )
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert student.lm_head.weight.grad is not None and student.lm_head.weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0
               for p in student.model.language_model.parameters())
    assert all(p.grad is None for p in teacher.parameters())


# --------------------------------------------------------------------------------------------
# Triton path: interpreter tier (CPU tensors) and GPU tier
# --------------------------------------------------------------------------------------------

def _triton_vs_reference(t, opts, dtype=torch.float32, atol=1e-5, rtol=1e-4, chunk_bytes=None):
    tt = {k: (v.to(dtype) if v.is_floating_point() and k != "mass" else v) for k, v in t.items()}
    a, r = leaves(tt), leaves(t)
    loss = topk_align(**a, impl="triton", chunk_bytes=chunk_bytes, **opts)
    want = topk_align_reference(**r, **opts)
    assert_close(loss, want, atol=atol, rtol=rtol, name="loss")
    ga, gr = grads_of(loss * 2, a), grads_of(want * 2, r)
    for k in ga:
        assert ga[k].dtype == a[k].dtype
        assert_close(ga[k].float(), gr[k], atol=atol, rtol=rtol * 10, name=f"grad {k}")
    return loss, ga


@pytest.mark.interpret
@pytest.mark.parametrize(
    "opts, bias",
    [
        (dict(), False),
        (dict(k=3, divergence="reverse", temperature=1.5), True),
        (dict(ratio=0.3, divergence="jsd", beta=0.7, normalize="token", vocab_size=290), True),
    ],
    ids=str,
)
def test_triton_matches_reference(opts, bias):
    t = make_inputs(b=3, length=21, hs=24, ht=40, vs=301, vt=333, bias=bias)
    _triton_vs_reference(t, opts, chunk_bytes=4 * 2 * 301 * 7)  # 7-row chunks: the chunk loop


@pytest.mark.interpret
def test_triton_fp16_and_deterministic():
    t = make_inputs(b=2, length=19, hs=32, ht=48, vs=257, vt=260)
    loss, g1 = _triton_vs_reference(t, dict(k=6), dtype=torch.float16, atol=3e-3, rtol=3e-3)
    loss2, g2 = _triton_vs_reference(t, dict(k=6), dtype=torch.float16, atol=3e-3, rtol=3e-3)
    assert torch.equal(loss, loss2) and all(torch.equal(g1[k], g2[k]) for k in g1)


@pytest.mark.interpret
def test_triton_no_image_and_grad_only_on_selected_rows():
    t = make_inputs(b=2, length=9, hs=16, ht=16, vs=97, vt=97, imageless=(0, 1))
    a = leaves(t)
    loss = topk_align(**a, impl="triton")
    assert loss.item() == 0.0
    assert all(bool((g == 0).all()) for g in grads_of(loss, a).values())
    t = make_inputs(b=2, length=9, hs=16, ht=16, vs=97, vt=97, imageless=(1,))
    a = leaves(t)
    loss = topk_align(**a, impl="triton", k=2)
    g = grads_of(loss, a)["student_hidden"].reshape(18, -1)
    rows, _ = select_topk(t["mass"], t["vision_mask"], k=2)
    off = torch.ones(18, dtype=torch.bool)
    off[rows] = False
    assert bool((g[off] == 0).all()) and bool((g[rows] != 0).any(1).all())


@pytest.mark.interpret
def test_triton_compile_aot_eager_fullgraph():
    """The gather driver (impl="triton") inside torch.compile(fullgraph=True)."""
    t = make_inputs(b=2, length=9, hs=16, ht=16, vs=97, vt=97, bias=True)

    def loss_fn(student_hidden, student_weight):
        return topk_align(student_hidden, student_weight, t["teacher_hidden"], t["teacher_weight"],
                          t["mass"], t["vision_mask"], k=3, impl="triton")

    a, b = leaves(t), leaves(t)
    eager = loss_fn(a["student_hidden"], a["student_weight"])
    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)(b["student_hidden"],
                                                                           b["student_weight"])
    assert torch.equal(compiled, eager)
    names = ("student_hidden", "student_weight")
    for k, ga, gb in zip(names, grads_of(eager, a, names).values(), grads_of(compiled, b, names).values()):
        assert torch.equal(ga, gb), k


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["auto", "triton"])
def test_gpu_compile_inductor_fullgraph(impl):
    t = make_inputs(b=4, length=300, hs=128, ht=256, vs=4099, vt=4200, bias=True, device="cuda",
                    dtype=torch.bfloat16)
    t["mass"] = t["mass"].float()

    def loss_fn(student_hidden, student_weight):
        return topk_align(student_hidden, student_weight, t["teacher_hidden"], t["teacher_weight"],
                          t["mass"], t["vision_mask"], ratio=0.2, student_bias=t["student_bias"],
                          teacher_bias=t["teacher_bias"], impl=impl) * 2

    a, b = leaves(t), leaves(t)
    names = ("student_hidden", "student_weight")
    eager = loss_fn(a["student_hidden"], a["student_weight"])
    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, backend="inductor", fullgraph=True)(b["student_hidden"],
                                                                          b["student_weight"])
    assert_close(compiled, eager, atol=1e-5, rtol=1e-4)
    for k, ga, gb in zip(names, grads_of(eager, a, names).values(), grads_of(compiled, b, names).values()):
        assert_close(gb.float(), ga.float(), atol=1e-4, rtol=1e-2, name=k)


@pytest.mark.gpu
def test_gpu_autotune_matches_fixed_blocks(monkeypatch):
    """ALIGN_TI_AUTOTUNE=1: the gather, weight-gradient and scatter kernels (and the row kernel)
    run under triton.autotune (the accumulating weight-gradient kernel's trials restore dw and
    db) and give the fixed-configuration result."""
    t = make_inputs(b=4, length=300, hs=128, ht=256, vs=4099, vt=4200, bias=True, device="cuda")
    a, b = leaves(t), leaves(t)
    fixed = topk_align(**a, ratio=0.3, impl="triton", chunk_bytes=4 * 2 * 4099 * 64)
    monkeypatch.setenv("ALIGN_TI_AUTOTUNE", "1")
    tuned = topk_align(**b, ratio=0.3, impl="triton", chunk_bytes=4 * 2 * 4099 * 64)
    assert_close(tuned, fixed, atol=1e-5, rtol=1e-4)
    for (k, ga), gb in zip(grads_of(fixed, a).items(), grads_of(tuned, b).values()):
        assert_close(gb, ga, atol=1e-4, rtol=1e-3, name=k)


@pytest.mark.gpu
@pytest.mark.parametrize("opts", [dict(), dict(ratio=0.1), dict(k=16, divergence="jsd")], ids=str)
def test_gpu_bf16_three_way_and_deterministic(opts):
    t32 = make_inputs(b=4, length=300, hs=128, ht=256, vs=4099, vt=4200, bias=True, device="cuda")
    tbf = {k: (v.to(torch.bfloat16) if v.is_floating_point() and k != "mass" else v) for k, v in t32.items()}
    a1, a2, at, r = leaves(tbf), leaves(tbf), leaves(tbf), leaves(t32)
    cand = topk_align(**a1, impl="triton", **opts)
    cand2 = topk_align(**a2, impl="triton", **opts)
    plain = topk_align(**at, impl="torch", **opts)
    truth = topk_align_reference(**r, **opts)
    assert_three_way(cand, plain, truth, atol=1e-3, name="loss")
    g1, g2, gt, gr = grads_of(cand, a1), grads_of(cand2, a2), grads_of(plain, at), grads_of(truth, r)
    assert torch.equal(cand, cand2)
    for k in g1:
        assert torch.equal(g1[k], g2[k]), f"{k} not deterministic"
        assert_three_way(g1[k].float(), gt[k].float(), gr[k], atol=1e-4, rtol=1e-2, name=f"grad {k}")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_auto_is_fused_linear_kl_on_the_selected_rows(device):
    """impl="auto" is fused_linear_kl (with its own "auto") on the selected rows and their
    normalised weights: the same numbers bit for bit, gradients included (on CUDA the
    measured faster route)."""
    from align_ti.ops.fused_kl import fused_linear_kl

    t = make_inputs(b=3, length=50, hs=32, ht=48, vs=1300, vt=1320, device=device)
    a, b = leaves(t), leaves(t)
    loss = topk_align(**a, ratio=0.5)
    rows, weights = select_topk(t["mass"], t["vision_mask"], ratio=0.5)
    hs, ht = b["student_hidden"], b["teacher_hidden"]
    ref = fused_linear_kl(hs.reshape(-1, hs.shape[-1]), b["student_weight"],
                          ht.reshape(-1, ht.shape[-1]), b["teacher_weight"], rows=rows,
                          weights=weights)
    assert torch.equal(loss, ref)
    ga, gb = grads_of(loss, a), grads_of(ref, b)
    for k in ga:
        assert torch.equal(ga[k], gb[k]), k
