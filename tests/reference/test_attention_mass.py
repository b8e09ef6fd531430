"""The fp32 reference of the attention-mass op and of IRS.

- against a brute-force, element-by-element float64 form of DESIGN.md's definition;
- against the attention probabilities of a tiny random transformers Qwen2 model (eager
  attention, GQA), with the post-RoPE q/k captured from its attention function;
- IRS (METHOD.md Definition 3.1) against a brute-force loop and its basic properties.
The reference checks no argument: the bad-input tests are the op's (tests/ops) and IRS's
(tests/models/test_irs.py).
"""
import math

import pytest
import torch

from align_ti.reference.attention_mass import (
    attention_mass_reference,
    irs_argmax,
    irs_from_mass_reference,
    irs_reference,
    select_vision_mass,
)
from tests.utils import assert_close, sharpen_attention

# --------------------------------------------------------------------------------------
# brute force
# --------------------------------------------------------------------------------------


def brute_force_mass(q, k, query_mask, attention_mask, scale, average_heads):
    """Loops over samples, heads, queries and keys in Python floats."""
    B, Hq, L, D = q.shape
    Hkv = k.shape[1]
    group = Hq // Hkv
    q = q.double().tolist()
    k = k.double().tolist()
    qm = query_mask.tolist()
    am = [[1] * L for _ in range(B)] if attention_mask is None else attention_mask.int().tolist()
    out = [[[0.0] * L for _ in range(Hq)] for _ in range(B)]
    for b in range(B):
        sel = [i for i in range(L) if qm[b][i] and am[b][i] == 1]
        for h in range(Hq):
            kh = h // group
            for i in sel:
                keys = [j for j in range(i + 1) if am[b][j] == 1]
                logits = [
                    scale * sum(q[b][h][i][d] * k[b][kh][j][d] for d in range(D)) for j in keys
                ]
                m = max(logits)
                e = [math.exp(x - m) for x in logits]
                s = sum(e)
                for j, ej in zip(keys, e):
                    out[b][h][j] += ej / s / len(sel)
    t = torch.tensor(out, dtype=torch.float64)
    return t.mean(dim=1) if average_heads else t


def _padding_mask(B, L, kind, dtype=torch.int64):
    am = torch.ones(B, L, dtype=torch.int64)
    if kind == "right":
        for b in range(B):
            am[b, L - 2 * b - 1:] = 0 if b else 1
    elif kind == "left":
        for b in range(B):
            am[b, : 2 * b + 1] = 0 if b else 1
    elif kind == "holes":
        am = (torch.rand(B, L) > 0.3).long()
    elif kind == "none":
        return None
    return am.to(dtype)


SHAPES = [  # B, Hq, Hkv, L, D
    (1, 1, 1, 1, 4),
    (2, 4, 2, 13, 8),
    (3, 6, 3, 13, 5),
    (2, 4, 1, 7, 16),
    (2, 2, 2, 9, 3),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("padding", ["none", "right", "left", "holes"])
@pytest.mark.parametrize("average_heads", [True, False])
def test_matches_brute_force(shape, padding, average_heads):
    B, Hq, Hkv, L, D = shape
    q = torch.randn(B, Hq, L, D) * 2
    k = torch.randn(B, Hkv, L, D) * 2
    query_mask = torch.rand(B, L) > 0.4
    query_mask[0, -1] = True  # at least one selected query in sample 0
    am = _padding_mask(B, L, padding)
    if am is not None:
        am[0, -1] = 1
    scale = D**-0.5
    got = attention_mass_reference(q, k, query_mask, am, average_heads=average_heads)
    want = brute_force_mass(q, k, query_mask, am, scale, average_heads)
    assert got.dtype == torch.float32
    assert got.shape == ((B, L) if average_heads else (B, Hq, L))
    assert_close(got, want, atol=1e-6, rtol=1e-5, name="mass")


def test_explicit_scale_bool_mask_and_padding_query_selected():
    """A bool attention_mask equals the 0/1 one; a padding query marked in query_mask is
    not selected; padding keys get exactly zero mass; an explicit scale is used."""
    B, Hq, Hkv, L, D = 2, 4, 2, 13, 8
    q, k = torch.randn(B, Hq, L, D), torch.randn(B, Hkv, L, D)
    am = torch.ones(B, L, dtype=torch.int32)
    am[0, 10:] = 0
    am[1, :3] = 0
    query_mask = torch.zeros(B, L, dtype=torch.bool)
    query_mask[:, 4:12] = True  # covers padding positions 10, 11 of sample 0
    got = attention_mass_reference(q, k, query_mask, am.bool(), scale=0.7)
    got_int = attention_mass_reference(q, k, query_mask, am, scale=0.7)
    want = brute_force_mass(q, k, query_mask, am, 0.7, True)
    assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert torch.equal(got, got_int)
    assert torch.all(got[am == 0] == 0)
    assert torch.all(got[:, 12] == 0)  # after the last selected query
    # Each head's mass over keys sums to 1 (a mean of probability rows).
    assert_close(got.sum(-1), torch.ones(B), atol=1e-6)


def test_no_selected_query_gives_zeros():
    B, Hq, Hkv, L, D = 3, 4, 2, 13, 8
    q, k = torch.randn(B, Hq, L, D), torch.randn(B, Hkv, L, D)
    query_mask = torch.rand(B, L) > 0.5
    query_mask[1] = False
    am = torch.ones(B, L, dtype=torch.int64)
    am[2, :6] = 0
    query_mask[2] = False
    query_mask[2, :6] = True  # only padding queries: none selected
    got = attention_mass_reference(q, k, query_mask, am, average_heads=False)
    assert not torch.isnan(got).any()
    assert torch.all(got[1:] == 0)
    assert got[0].sum() > 0


def test_low_precision_inputs_computed_in_fp32():
    B, Hq, Hkv, L, D = 2, 4, 2, 13, 8
    q = torch.randn(B, Hq, L, D).to(torch.bfloat16)
    k = torch.randn(B, Hkv, L, D).to(torch.bfloat16)
    query_mask = torch.rand(B, L) > 0.3
    am = _padding_mask(B, L, "left")
    for dtype in (torch.bfloat16, torch.float16):
        got = attention_mass_reference(q.to(dtype), k.to(dtype), query_mask, am)
        assert got.dtype == torch.float32
        # fp32 logits from the rounded inputs: equals the fp32 computation exactly.
        want = attention_mass_reference(q.float(), k.float(), query_mask, am)
        assert torch.equal(got, want)


def test_fp64_inputs_stay_fp64_and_gradcheck():
    B, Hq, Hkv, L, D = 2, 4, 2, 7, 3
    q = torch.randn(B, Hq, L, D, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, Hkv, L, D, dtype=torch.float64, requires_grad=True)
    query_mask = torch.rand(B, L) > 0.3
    am = _padding_mask(B, L, "left")
    out = attention_mass_reference(q, k, query_mask, am)
    assert out.dtype == torch.float64
    assert_close(out, brute_force_mass(q.detach(), k.detach(), query_mask, am, D**-0.5, True),
                 atol=1e-12, rtol=1e-12)
    for avg in (True, False):
        assert torch.autograd.gradcheck(
            lambda a, b: attention_mass_reference(a, b, query_mask, am, average_heads=avg),
            (q, k),
        )


def test_gradients_finite_with_fully_masked_rows():
    """Left padding creates query rows with no visible key; their gradient must be 0, not NaN."""
    B, Hq, Hkv, L, D = 2, 4, 2, 13, 8
    q = torch.randn(B, Hq, L, D, requires_grad=True)
    k = torch.randn(B, Hkv, L, D, requires_grad=True)
    am = torch.ones(B, L, dtype=torch.int64)
    am[1, :5] = 0
    query_mask = torch.ones(B, L, dtype=torch.bool)
    out = attention_mass_reference(q, k, query_mask, am)
    (out * torch.randn_like(out)).sum().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()
    assert torch.all(q.grad[1, :, :5] == 0)  # padding queries are not selected
    assert torch.all(k.grad[1, :, :5] == 0)  # padding keys are never attended


# --------------------------------------------------------------------------------------
# against transformers (tiny random Qwen2, eager attention, GQA)
# --------------------------------------------------------------------------------------


def _tiny_qwen2():
    """The tiny Qwen2 student (hidden 64, 4 query / 2 key-value heads of 16) under eager
    attention, sharpened so that the test is not trivially uniform."""
    from align_ti.models.tiny import build_tiny_causal_lm

    model = build_tiny_causal_lm("student", "qwen2", attn_implementation="eager").eval()
    sharpen_attention(model.model.layers, 8.0)
    return model


def _run_capturing_qk(model, input_ids, attention_mask, monkeypatch):
    """Forward with output_attentions=True, recording the q/k that each layer hands to its
    attention function.

    In transformers 5.x, Qwen2Attention.forward applies RoPE and then looks the attention
    function up on every call:
        ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, eager_attention_forward)
    "eager" is not a key of ALL_ATTENTION_FUNCTIONS, so the default, the *module-level* name
    `transformers.models.qwen2.modeling_qwen2.eager_attention_forward`, is what runs, and
    patching that global is seen by the next forward.
    """
    from transformers.models.qwen2 import modeling_qwen2

    original = modeling_qwen2.eager_attention_forward
    captured = {}

    def recording(module, query, key, value, attention_mask, *args, **kwargs):
        captured[module.layer_idx] = (query.detach().clone(), key.detach().clone())
        return original(module, query, key, value, attention_mask, *args, **kwargs)

    monkeypatch.setattr(modeling_qwen2, "eager_attention_forward", recording)
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_attentions=True)
    monkeypatch.setattr(modeling_qwen2, "eager_attention_forward", original)
    return out, captured


def _mass_from_weights(weights, query_mask, attention_mask):
    """Mean over selected queries and heads of the model's own attention rows [B, H, L, L]."""
    sel = (query_mask & attention_mask.bool()).to(weights.dtype)  # [B, L]
    n = sel.sum(-1).clamp(min=1)
    per_head = (weights * sel[:, None, :, None]).sum(2) / n[:, None, None]
    return per_head.mean(1), per_head


@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("layer", [0, 1])
def test_matches_transformers_attention(padding, layer, monkeypatch):
    B, L = 2, 13
    model = _tiny_qwen2()
    input_ids = torch.randint(0, 100, (B, L))
    am = torch.ones(B, L, dtype=torch.int64)
    if padding == "right":
        am[1, 9:] = 0
    else:
        am[1, :4] = 0
    query_mask = torch.zeros(B, L, dtype=torch.bool)
    query_mask[:, 5:11] = True  # an "instruction" span; in sample 1 it overlaps padding
    query_mask[0, 2] = True

    out, captured = _run_capturing_qk(model, input_ids, am, monkeypatch)
    q, k = captured[layer]
    attn = out.attentions[layer]
    assert q.shape == (B, 4, L, 16) and k.shape == (B, 2, L, 16)
    assert attn.shape == (B, 4, L, L)
    assert torch.isfinite(attn).all()

    want, want_heads = _mass_from_weights(attn.float(), query_mask, am)
    got = attention_mass_reference(q, k, query_mask, am)  # scale = head_dim ** -0.5
    got_heads = attention_mass_reference(q, k, query_mask, am, average_heads=False)
    assert_close(got, want, atol=1e-5, rtol=0)
    assert_close(got_heads, want_heads, atol=1e-5, rtol=0)
    assert torch.all(got[am == 0] == 0)
    # Not a trivial pass: the attention is far from uniform (what zero queries would give).
    uniform = attention_mass_reference(torch.zeros_like(q), k, query_mask, am)
    assert (got - uniform).abs().max() > 0.05


# --------------------------------------------------------------------------------------
# IRS
# --------------------------------------------------------------------------------------


def brute_force_irs(a, b):
    n_layers, P, _ = a.shape
    out = []
    for l in range(n_layers):
        total = 0.0
        for p in range(P):
            x, y = a[l, p].double().tolist(), b[l, p].double().tolist()
            nx = math.sqrt(sum(v * v for v in x))
            ny = math.sqrt(sum(v * v for v in y))
            cos = 0.0 if nx * ny == 0 else sum(u * v for u, v in zip(x, y)) / (nx * ny)
            total += cos
        out.append(1.0 - total / P)
    return torch.tensor(out, dtype=torch.float64)


def test_irs_identical_is_zero():
    a = torch.rand(3, 5, 17)
    s = irs_reference(a, a.clone())
    assert s.shape == (3,) and s.dtype == torch.float32
    assert_close(s, torch.zeros(3), atol=1e-6)


def test_irs_orthogonal_is_one():
    a = torch.zeros(2, 4, 10)
    b = torch.zeros(2, 4, 10)
    a[..., :5] = torch.rand(2, 4, 5) + 0.1
    b[..., 5:] = torch.rand(2, 4, 5) + 0.1
    assert_close(irs_reference(a, b), torch.ones(2), atol=1e-7)


def test_irs_scale_invariant_and_brute_force():
    a, b = torch.rand(4, 6, 29), torch.rand(4, 6, 29)
    s = irs_reference(a, b)
    assert_close(s, brute_force_irs(a, b), atol=1e-6)
    scaled = irs_reference(a * 1e-4, b * 37.0)
    assert_close(scaled, s, atol=1e-6)
    per_pair_scale = torch.rand(1, 6, 1) * 10 + 1e-3
    assert_close(irs_reference(a * per_pair_scale, b), s, atol=1e-6)
    # symmetric
    assert_close(irs_reference(b, a), s, atol=1e-7)


def test_irs_two_d_input_is_one_layer():
    a, b = torch.rand(6, 11), torch.rand(6, 11)
    s = irs_reference(a, b)
    assert s.shape == ()
    assert_close(s, brute_force_irs(a[None], b[None])[0], atol=1e-6)


def test_irs_zero_vector_counts_as_cos_zero():
    a, b = torch.rand(2, 3, 8), torch.rand(2, 3, 8)
    a[:, 1] = 0  # pair 1 has an all-zero mass on side 1 (no selected query)
    b[1, 2] = 0
    s = irs_reference(a, b)
    assert torch.isfinite(s).all()
    assert_close(s, brute_force_irs(a, b), atol=1e-6)
    z = torch.zeros(1, 2, 8)
    assert_close(irs_reference(z, z), torch.ones(1), atol=0)


def test_irs_tiny_values_no_eps_clamp():
    a = torch.rand(1, 3, 8, dtype=torch.float64) * 1e-30
    b = torch.rand(1, 3, 8, dtype=torch.float64) * 1e-30
    s = irs_reference(a, b)
    assert s.dtype == torch.float64
    assert_close(s, irs_reference(a * 1e30, b * 1e30), atol=1e-12)


def test_select_vision_mass_and_irs_from_mass_with_shifted_vision():
    """The two sides of a pair have different instruction/template lengths, so their vision
    tokens sit at different positions; each is restricted to its own, in order."""
    n_layers, P, Nv = 3, 2, 5
    L1, L2 = 12, 15
    vm1 = torch.zeros(P, L1, dtype=torch.bool)
    vm2 = torch.zeros(P, L2, dtype=torch.bool)
    vm1[0, 2:7] = True
    vm1[1, 4:9] = True
    vm2[0, 6:11] = True
    vm2[1, [0, 3, 5, 9, 14]] = True
    m1, m2 = torch.rand(n_layers, P, L1), torch.rand(n_layers, P, L2)
    a1 = select_vision_mass(m1, vm1)
    a2 = select_vision_mass(m2, vm2)
    assert a1.shape == (n_layers, P, Nv) and a2.shape == (n_layers, P, Nv)
    assert torch.equal(a1[:, 0], m1[:, 0, 2:7])
    assert torch.equal(a1[:, 1], m1[:, 1, 4:9])
    assert torch.equal(a2[:, 1], m2[:, 1, [0, 3, 5, 9, 14]])
    assert torch.equal(select_vision_mass(m1[0], vm1), a1[0])
    s = irs_from_mass_reference(m1, m2, vm1, vm2)
    assert s.shape == (n_layers,)
    assert_close(s, brute_force_irs(a1, a2), atol=1e-6)


def test_irs_end_to_end_from_attention_mass():
    """Same q/k on both sides -> IRS 0; a different instruction -> IRS > 0."""
    B, Hq, Hkv, L, D = 2, 4, 2, 13, 8
    q, k = torch.randn(B, Hq, L, D) * 3, torch.randn(B, Hkv, L, D) * 3
    vision = torch.zeros(B, L, dtype=torch.bool)
    vision[:, 1:6] = True
    instr1 = torch.zeros(B, L, dtype=torch.bool)
    instr1[:, 6:10] = True
    instr2 = torch.zeros(B, L, dtype=torch.bool)
    instr2[:, 10:13] = True
    m1 = attention_mass_reference(q, k, instr1)
    m1b = attention_mass_reference(q, k, instr1)
    m2 = attention_mass_reference(q, k, instr2)
    same = irs_from_mass_reference(m1[None], m1b[None], vision, vision)
    diff = irs_from_mass_reference(m1[None], m2[None], vision, vision)
    assert_close(same, torch.zeros(1), atol=1e-6)
    assert diff.item() > 1e-3


def test_irs_argmax():
    assert irs_argmax(torch.tensor([0.1, 0.5, 0.2])) == 1
    assert irs_argmax(torch.tensor([0.3, 0.7, 0.7, 0.1])) == 1  # ties -> lowest layer
    assert irs_argmax(torch.tensor([0.0])) == 0
