"""attention_mass: torch path (CPU tier), Triton kernels (interpreter / GPU tiers).

- against the fp32 reference (GQA, odd L / D, right / left / holes padding, batch > 1,
  per-head and averaged, forward and gradients with a random upstream gradient, loss * 2);
- against transformers eager output_attentions on tiny Qwen2 and Llava models, with q / k
  from capture_qk;
- lse supplied vs computed; no selected query; low precision three-way;
- bad input (errors name the argument).
"""
import pytest
import torch

from align_ti.ops.attention_mass import attention_mass
from align_ti.reference.attention_mass import attention_mass_reference
from tests.utils import assert_close, assert_three_way, sharpen_attention


def _padding(B, L, kind):
    am = torch.ones(B, L, dtype=torch.int64)
    if kind == "right":
        for b in range(1, B):
            am[b, L - 2 * b - 1:] = 0
    elif kind == "left":
        for b in range(1, B):
            am[b, : 2 * b + 1] = 0
    elif kind == "holes":
        am = (torch.rand(B, L) > 0.25).long()
        am[:, -1] = 1
    elif kind == "none":
        return None
    return am


def _inputs(B, Hq, Hkv, L, D, dtype=torch.float32, padding="right", p_sel=0.5):
    q = (torch.randn(B, Hq, L, D) * 2).to(dtype).requires_grad_()
    k = (torch.randn(B, Hkv, L, D) * 2).to(dtype).requires_grad_()
    query_mask = torch.rand(B, L) < p_sel
    query_mask[0, -1] = True
    return q, k, query_mask, _padding(B, L, padding)


def _grads(out, q, k, g):
    return torch.autograd.grad((out * g).sum(), (q, k))


def _lse_reference(q, k, attention_mask, scale=None):
    """Natural-log LSE [B, Hq, L] of the scaled causal logits over real keys (fp32)."""
    B, Hq, L, D = q.shape
    scale = D ** -0.5 if scale is None else scale
    kx = k.float().repeat_interleave(Hq // k.shape[1], dim=1)
    s = scale * q.float() @ kx.transpose(-1, -2)
    real = torch.ones(B, L, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    ok = torch.ones(L, L, dtype=torch.bool).tril()[None] & real[:, None, :]
    s = s.masked_fill(~ok[:, None], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    return torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)).detach()


SHAPES = [  # B, Hq, Hkv, L, D
    (2, 4, 2, 13, 8),
    (3, 6, 3, 63, 5),
    (2, 4, 1, 33, 16),
    (1, 8, 8, 17, 32),
]

# --------------------------------------------------------------------------------------
# CPU tier: torch path
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("padding", ["none", "right", "left", "holes"])
def test_torch_matches_reference(shape, padding):
    q, k, qm, am = _inputs(*shape, padding=padding)
    for avg in (True, False):
        # default (one chunk here), and a few row x key chunks (1/4 of the full logits)
        for chunk in (None, shape[0] * shape[1] * shape[3] ** 2):
            want = attention_mass_reference(q, k, qm, am, average_heads=avg)
            got = attention_mass(q, k, qm, am, average_heads=avg, impl="torch", chunk_bytes=chunk)
            assert got.dtype == torch.float32 and got.shape == want.shape
            assert_close(got, want, atol=1e-6, rtol=1e-5, name="mass")
            g = torch.randn_like(want)
            (dq, dk), (dq_ref, dk_ref) = _grads(got, q, k, g), _grads(want, q, k, g)
            assert_close(dq, dq_ref, atol=1e-5, rtol=1e-4, name="dq")
            assert_close(dk, dk_ref, atol=1e-5, rtol=1e-4, name="dk")


def test_torch_fp64_exact_and_gradcheck():
    B, Hq, Hkv, L, D = 2, 4, 2, 7, 3
    q = torch.randn(B, Hq, L, D, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, Hkv, L, D, dtype=torch.float64, requires_grad=True)
    qm = torch.rand(B, L) > 0.3
    am = _padding(B, L, "left")
    got = attention_mass(q, k, qm, am, chunk_bytes=300)
    assert got.dtype == torch.float64
    assert_close(got, attention_mass_reference(q, k, qm, am), atol=1e-13, rtol=1e-12)
    assert torch.autograd.gradcheck(
        lambda a, b: attention_mass(a, b, qm, am, average_heads=False, chunk_bytes=300), (q, k),
        fast_mode=True,
    )


def test_loss_times_two_and_auto_is_torch_on_cpu():
    q, k, qm, am = _inputs(2, 4, 2, 21, 8)
    out = attention_mass(q, k, qm, am)  # impl="auto" -> torch on CPU
    dq1, dk1 = torch.autograd.grad(out[:, 3:9].sum(), (q, k))
    out = attention_mass(q, k, qm, am, impl="torch")
    dq2, dk2 = torch.autograd.grad((out[:, 3:9].sum()) * 2, (q, k))
    assert_close(dq2, 2 * dq1, atol=1e-7, rtol=1e-6)
    assert_close(dk2, 2 * dk1, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("avg", [True, False])
def test_lse_supplied_equals_computed(avg):
    q, k, qm, am = _inputs(2, 4, 2, 31, 8, padding="left")
    lse = _lse_reference(q, k, am).requires_grad_()
    a = attention_mass(q, k, qm, am, average_heads=avg)
    b = attention_mass(q, k, qm, am, lse=lse, average_heads=avg, chunk_bytes=4000)
    assert_close(b, a, atol=1e-6, rtol=1e-5, name="mass with lse")
    g = torch.randn_like(a)
    ga, gb = _grads(a, q, k, g), _grads(b, q, k, g)
    assert_close(gb[0], ga[0], atol=1e-5, rtol=1e-4, name="dq")
    assert_close(gb[1], ga[1], atol=1e-5, rtol=1e-4, name="dk")
    b2 = attention_mass(q, k, qm, am, lse=lse, average_heads=avg)
    (b2 * g).sum().backward()
    assert lse.grad is None  # a supplied lse carries no gradient


def test_no_selected_query_zero_and_finite():
    q, k, qm, am = _inputs(3, 4, 2, 15, 8, padding="left")
    qm[1] = False
    qm[2] = False
    qm[2, :5] = True  # only padding queries in sample 2 (left padding covers 0..4)
    am[2, :5] = 0
    out = attention_mass(q, k, qm, am, average_heads=False)
    assert torch.isfinite(out).all()
    assert torch.all(out[1:] == 0)
    assert out[0].sum() > 0
    dq, dk = _grads(out, q, k, torch.randn_like(out))
    assert torch.isfinite(dq).all() and torch.isfinite(dk).all()
    assert torch.all(dq[1:] == 0) and torch.all(dk[1:] == 0)
    # Nothing selected anywhere, and empty shapes: zeros, no launch, no NaN.
    none = attention_mass(q, k, torch.zeros_like(qm), am)
    assert torch.all(none == 0)
    empty = attention_mass(torch.randn(0, 4, 5, 8), torch.randn(0, 2, 5, 8), torch.ones(0, 5, dtype=torch.bool))
    assert empty.shape == (0, 5)


def test_padding_keys_and_late_keys_get_zero():
    q, k, qm, am = _inputs(2, 4, 2, 19, 8, padding="holes")
    qm[:] = False
    qm[:, 4:11] = True
    out = attention_mass(q, k, qm, am)
    assert torch.all(out[am == 0] == 0)
    assert torch.all(out[:, 11:] == 0)
    sel = (qm & am.bool()).any(1)
    assert_close(out.sum(-1)[sel], torch.ones(int(sel.sum())), atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_torch_low_precision_three_way(dtype):
    q, k, qm, am = _inputs(2, 4, 2, 37, 16, dtype=dtype)
    truth = attention_mass_reference(q.detach().float(), k.detach().float(), qm, am)
    got = attention_mass(q, k, qm, am)
    # plain torch in the same dtype: softmax(q k^T) in low precision
    kx = k.detach().repeat_interleave(2, dim=1)
    s = (q.detach() @ kx.transpose(-1, -2)) * 16 ** -0.5
    ok = torch.ones(37, 37, dtype=torch.bool).tril()[None] & am.bool()[:, None, :]
    p = torch.softmax(s.masked_fill(~ok[:, None], float("-inf")), dim=-1)
    sel = (qm & am.bool()).to(dtype)
    plain = ((p * sel[:, None, :, None]).sum(2) / sel.sum(-1).clamp(min=1)[:, None, None]).mean(1)
    assert_three_way(got, plain.float(), truth, atol=1e-6, name=f"mass {dtype}")
    assert got.dtype == torch.float32
    dq, dk = _grads(got, q, k, torch.ones_like(got))
    assert dq.dtype == dtype and dk.dtype == dtype and torch.isfinite(dq.float()).all()


def test_non_contiguous_inputs():
    """q / k as the model hands them (views of [B, L, H, D] transposed)."""
    B, Hq, Hkv, L, D = 2, 4, 2, 23, 8
    q = torch.randn(B, L, Hq, D).transpose(1, 2).requires_grad_()
    k = torch.randn(B, L, Hkv, D).transpose(1, 2).requires_grad_()
    qm = torch.rand(B, L) > 0.5
    am = _padding(B, L, "right")
    assert_close(attention_mass(q, k, qm, am), attention_mass_reference(q, k, qm, am), atol=1e-6)


# --------------------------------------------------------------------------------------
# CPU tier: against transformers eager output_attentions (q / k from capture_qk)
# --------------------------------------------------------------------------------------


def _mass_from_weights(weights, query_mask, attention_mask):
    sel = (query_mask & attention_mask.bool()).to(weights.dtype)
    n = sel.sum(-1).clamp(min=1)
    per_head = (weights * sel[:, None, :, None]).sum(2) / n[:, None, None]
    return per_head.mean(1), per_head


@pytest.mark.parametrize("kind", ["qwen2", "qwen3", "llava"])
@pytest.mark.parametrize("padding", ["right", "left"])
def test_matches_transformers_eager_output_attentions(kind, padding):
    from align_ti.models.capture import capture_qk
    from align_ti.models.tiny import IMAGE_TOKEN_ID, build_tiny_causal_lm, build_tiny_llava

    B, L = 2, 61 if kind == "llava" else 27  # odd L
    batch = {}
    if kind == "llava":
        model = build_tiny_llava("teacher", attn_implementation="eager").eval()
        layers = model.model.language_model.layers
        n_img = model.config.image_seq_length
        ids = torch.randint(10, 300, (B, L))
        start = 2 if padding == "right" else 6
        ids[:, start:start + n_img] = IMAGE_TOKEN_ID
        batch["pixel_values"] = torch.randn(B, 3, 48, 48)
    else:
        model = build_tiny_causal_lm("teacher", text=kind, attn_implementation="eager").eval()
        layers = model.model.layers
        ids = torch.randint(10, 300, (B, L))
    sharpen_attention(layers)
    am = torch.ones(B, L, dtype=torch.int64)
    if padding == "right":
        am[1, L - 7:] = 0
    else:
        am[1, :5] = 0
    qm = torch.zeros(B, L, dtype=torch.bool)
    qm[:, L - 15:L - 3] = True  # the instruction span; overlaps padding in one case
    n_layers = len(layers)
    with torch.no_grad(), capture_qk(model, layers=None) as cap:
        out = model(input_ids=ids, attention_mask=am, output_attentions=True, **batch)
    for layer in range(n_layers):
        q, k = cap[layer]
        assert q.shape[1] == 4 and k.shape[1] == 2  # GQA
        want, want_heads = _mass_from_weights(out.attentions[layer].float(), qm, am)
        assert_close(attention_mass(q, k, qm, am), want, atol=1e-5, rtol=0, name=f"layer {layer}")
        assert_close(attention_mass(q, k, qm, am, average_heads=False), want_heads, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------


def _ok():
    return torch.randn(2, 4, 9, 8), torch.randn(2, 2, 9, 8), torch.ones(2, 9, dtype=torch.bool)


@pytest.mark.parametrize(
    "mutate, exc, name",
    [
        (lambda q, k, m: (q[0], k, m, {}), ValueError, "q"),
        (lambda q, k, m: (q, k[:, :, :, :, None], m, {}), ValueError, "k"),
        (lambda q, k, m: (q, k[:1], m, {}), ValueError, "k"),
        (lambda q, k, m: (q, k[:, :, :7], m, {}), ValueError, "k"),
        (lambda q, k, m: (q, k[..., :5], m, {}), ValueError, "k"),
        (lambda q, k, m: (q, torch.randn(2, 3, 9, 8), m, {}), ValueError, "heads"),
        (lambda q, k, m: (q, k.double(), m, {}), TypeError, "k"),
        (lambda q, k, m: (q, k, m[:, :8], {}), ValueError, "query_mask"),
        (lambda q, k, m: (q, k, m.long(), {}), TypeError, "query_mask"),
        (lambda q, k, m: (q, k, m, {"attention_mask": torch.ones(2, 8, dtype=torch.long)}), ValueError, "attention_mask"),
        (lambda q, k, m: (q, k, m, {"attention_mask": torch.full((2, 9), 2)}), ValueError, "attention_mask"),
        (lambda q, k, m: (q, k, m, {"lse": torch.zeros(2, 2, 9)}), ValueError, "lse"),
        (lambda q, k, m: (q, k, m, {"lse": torch.zeros(2, 4)}), ValueError, "lse"),
        (lambda q, k, m: (q, k, m, {"scale": -1.0}), ValueError, "scale"),
        (lambda q, k, m: (q, k, m, {"impl": "cuda"}), ValueError, "impl"),
        (lambda q, k, m: (q, k, m, {"chunk_bytes": 0}), ValueError, "chunk_bytes"),
        (lambda q, k, m: (q, k, m, {"chunk_bytes": "lots"}), ValueError, "chunk_bytes"),
        (lambda q, k, m: (q, k, m, {"scale": float("inf")}), ValueError, "scale"),
        (lambda q, k, m: (q[..., :0], k[..., :0], m, {}), ValueError, "head dim"),
        (lambda q, k, m: (q, k, m, {"lse": torch.full((2, 4, 9), float("inf"))}), ValueError, "lse"),
        (lambda q, k, m: (q, k, m, {"lse": torch.full((2, 4, 9), float("nan"))}), ValueError, "lse"),
        (lambda q, k, m: (q, k, m, {"average_heads": 1}), TypeError, "average_heads"),
        (lambda q, k, m: ("q", k, m, {}), TypeError, "q"),
    ],
)
def test_bad_input(mutate, exc, name):
    q, k, m, kw = mutate(*_ok())
    with pytest.raises(exc, match=name):
        attention_mass(q, k, m, **kw)


def _good():
    B, Hq, Hkv, L, D = 2, 4, 2, 7, 8
    return dict(
        q=torch.randn(B, Hq, L, D),
        k=torch.randn(B, Hkv, L, D),
        query_mask=torch.ones(B, L, dtype=torch.bool),
        attention_mask=torch.ones(B, L, dtype=torch.int64),
    )


BAD_MASS = [
    ("q", lambda a: a["q"].tolist(), TypeError, "q must be a torch.Tensor"),
    ("q", lambda a: a["q"][0], ValueError, "q must be 4-D"),
    ("q", lambda a: a["q"].long(), TypeError, "q must have dtype"),
    ("k", lambda a: a["k"][0], ValueError, "k must be 4-D"),
    ("k", lambda a: a["k"].double(), TypeError, "k and q must share one dtype"),
    ("k", lambda a: a["k"][:1], ValueError, "k has size 1 in dim 0.*batch size of q"),
    ("k", lambda a: a["k"][:, :, :5], ValueError, "k has size 5 in dim 2.*sequence length of q"),
    ("k", lambda a: a["k"][..., :4], ValueError, "k has size 4 in dim 3.*head dim of q"),
    ("k", lambda a: torch.randn(2, 3, 7, 8), ValueError, "multiple of the number of key heads.*Hkv = 3"),
    ("query_mask", lambda a: a["query_mask"].long(), TypeError, "query_mask must have dtype"),
    ("query_mask", lambda a: a["query_mask"][0], ValueError, "query_mask must be 2-D"),
    ("query_mask", lambda a: a["query_mask"][:, :6], ValueError, "query_mask has size 6 in dim 1"),
    ("query_mask", lambda a: a["query_mask"][:1], ValueError, "query_mask has size 1 in dim 0"),
    ("attention_mask", lambda a: a["attention_mask"].float(), TypeError, "attention_mask must have dtype"),
    ("attention_mask", lambda a: a["attention_mask"][:, :6], ValueError, "attention_mask has size 6 in dim 1"),
    ("attention_mask", lambda a: a["attention_mask"][None], ValueError, "attention_mask must be 2-D"),
    ("attention_mask", lambda a: a["attention_mask"] * 2, ValueError, "attention_mask must hold only 0 and 1"),
]


@pytest.mark.parametrize("name,make,exc,match", BAD_MASS, ids=[m for _, _, _, m in BAD_MASS])
def test_bad_input_messages(name, make, exc, match):
    args = _good()
    args[name] = make(args)
    with pytest.raises(exc, match=match):
        attention_mass(**args)


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan"), float("inf"), "0.5", True])
def test_bad_scale(scale):
    with pytest.raises(ValueError, match="scale"):
        attention_mass(**_good(), scale=scale)


def test_bad_average_heads():
    with pytest.raises(TypeError, match="average_heads"):
        attention_mass(**_good(), average_heads="yes")


def test_lse_is_only_checked_at_selected_queries_and_chunk_bytes_takes_a_size_string():
    q, k, m = _ok()
    m[:, 5:] = False
    z = (q @ k.repeat_interleave(2, dim=1).transpose(-1, -2)) * q.shape[-1] ** -0.5
    lse = z.masked_fill(torch.ones(9, 9, dtype=torch.bool).triu(1), float("-inf")).logsumexp(-1)
    want = attention_mass(q, k, m)
    lse[:, :, 5:] = float("nan")  # never read: those queries are not selected
    assert_close(attention_mass(q, k, m, lse=lse, chunk_bytes="1K"), want, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------
# the torch.library op: schema, fake tensors, torch.compile
# --------------------------------------------------------------------------------------


def _op_arguments():
    """align_ti::attention_mass's arguments as its schema names them: the tensors, and the
    options (keywords) that the public function would pass."""
    q, k, qm, am = _inputs(2, 4, 2, 13, 8, padding="left")
    real = am != 0
    options = dict(lse=None, scale=8 ** -0.5, impl="torch", chunk_bytes=2 << 20, block_m=None, block_n=None,
                   need_lse=True)
    return (q, k, qm & real, real), options


@pytest.mark.parametrize("with_lse", [False, True])
def test_opcheck(with_lse):
    """Schema, fake-tensor and autograd-registration checks of align_ti::attention_mass and its
    backward op (what torch.compile relies on)."""
    tensors, options = _op_arguments()
    q, k, selected, real = tensors
    if with_lse:
        options["lse"] = _lse_reference(q, k, real.long())
    torch.library.opcheck(torch.ops.align_ti.attention_mass.default, tensors, options)
    _, lse = torch.ops.align_ti.attention_mass(*tensors, **options)
    grad = torch.randn(q.shape[0], q.shape[1], q.shape[2])
    backward_options = {name: v for name, v in options.items() if name not in ("lse", "need_lse")}
    torch.library.opcheck(torch.ops.align_ti.attention_mass_backward.default,
                          (grad, q.detach(), k.detach(), selected, real, lse), backward_options)


def test_compile_aot_eager_fullgraph():
    """attention_mass inside torch.compile(fullgraph=True): no graph break, the same mass and
    gradients as eager (aot_eager on CPU; inductor runs in the GPU tier)."""
    q, k, qm, am = _inputs(2, 4, 2, 13, 8, padding="right")

    def loss_fn(q, k):
        return (attention_mass(q, k, qm, am) * torch.arange(13.0)).sum()

    eager = loss_fn(q, k)
    want = torch.autograd.grad(eager, (q, k))
    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
    got = compiled(q, k)
    assert_close(got, eager, atol=1e-6, rtol=1e-6)
    for a, b in zip(torch.autograd.grad(got, (q, k)), want):
        assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_autocast_changes_nothing():
    """Inside torch.autocast (bf16 on CPU) the mass and its gradients of fp32 q/k are those
    computed outside it: the op keeps its fp32 logits."""
    q, k, qm, am = _inputs(2, 4, 2, 13, 8)
    g = torch.randn(2, 13)
    want = attention_mass(q, k, qm, am)
    gw = _grads(want, q, k, g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = attention_mass(q, k, qm, am)
    assert got.dtype == torch.float32
    assert_close(got, want, atol=0, rtol=0)
    for a, b in zip(_grads(got, q, k, g), gw):
        assert_close(a, b, atol=0, rtol=0)


def test_double_backward_is_refused():
    q, k, qm, am = _inputs(2, 4, 2, 13, 8)
    (dq,) = torch.autograd.grad(attention_mass(q, k, qm, am).sum(), (q,), create_graph=False)
    assert dq.shape == q.shape
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(attention_mass(q, k, qm, am).sum(), (q,), create_graph=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only check")
def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="impl='triton'"):
        attention_mass(*_ok(), impl="triton")


# --------------------------------------------------------------------------------------
# interpreter tier (TRITON_INTERPRET=1, CPU tensors) / CUDA: the Triton kernels
# --------------------------------------------------------------------------------------

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

INTERP_CASES = [  # B, Hq, Hkv, L, D, padding
    (2, 4, 2, 13, 8, "right"),
    (2, 4, 1, 37, 5, "left"),
    (3, 2, 2, 21, 16, "holes"),
    (1, 6, 3, 40, 32, "none"),
]


def _to(device, *ts):
    return [None if t is None else t.detach().to(device) for t in ts]


@pytest.mark.interpret
@pytest.mark.parametrize("case", INTERP_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_matches_reference(case, dtype):
    *shape, padding = case
    q, k, qm, am = _inputs(*shape, dtype=dtype, padding=padding)
    q, k, qm, am = _to(DEVICE, q, k, qm, am)
    q.requires_grad_()
    k.requires_grad_()
    avg = dtype == torch.float32
    got = attention_mass(q, k, qm, am, average_heads=avg, impl="triton")
    plain = attention_mass(q, k, qm, am, average_heads=avg, impl="torch")
    truth = attention_mass_reference(q.float(), k.float(), qm, am, average_heads=avg)
    assert_three_way(got, plain, truth, atol=1e-6, name="mass")
    g = torch.randn_like(got)
    gt, gp = _grads(got, q, k, g), _grads(plain, q, k, g)
    qf, kf = q.detach().float().requires_grad_(), k.detach().float().requires_grad_()
    gr = _grads(attention_mass_reference(qf, kf, qm, am, average_heads=avg), qf, kf, g)
    tol = 1e-5 if dtype == torch.float32 else 1e-3
    for name, a, b, c in (("dq", gt[0], gp[0], gr[0]), ("dk", gt[1], gp[1], gr[1])):
        assert a.dtype == dtype
        assert_three_way(a.float(), b.float(), c, atol=tol, name=name)


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_lse_supplied_and_no_selected(dtype):
    q, k, qm, am = _inputs(3, 4, 2, 19, 8, dtype=dtype, padding="left")
    qm[2] = False
    lse = _lse_reference(q, k, am)
    q, k, qm, am, lse = _to(DEVICE, q, k, qm, am, lse)
    q.requires_grad_()
    k.requires_grad_()
    a = attention_mass(q, k, qm, am, impl="triton")
    b = attention_mass(q, k, qm, am, lse=lse, impl="triton")
    assert torch.all(a[2] == 0) and torch.all(b[2] == 0)
    assert_close(b, a, atol=1e-6, rtol=1e-5)
    g = torch.randn_like(a)
    ga, gb = _grads(a, q, k, g), _grads(b, q, k, g)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    assert_close(gb[0].float(), ga[0].float(), atol=tol, rtol=tol, name="dq")
    assert_close(gb[1].float(), ga[1].float(), atol=tol, rtol=tol, name="dk")
    assert torch.all(ga[0][2] == 0) and torch.all(ga[1][2] == 0)


@pytest.mark.interpret
def test_triton_non_contiguous_and_single_query():
    B, Hq, Hkv, L, D = 2, 4, 2, 18, 16
    q = torch.randn(B, L, Hq, D).transpose(1, 2).to(DEVICE).requires_grad_()
    k = torch.randn(B, L, Hkv, D).transpose(1, 2).to(DEVICE).requires_grad_()
    qm = torch.zeros(B, L, dtype=torch.bool, device=DEVICE)
    qm[0, 0] = True  # a query that sees only itself
    qm[1, 17] = True
    got = attention_mass(q, k, qm, impl="triton")
    want = attention_mass_reference(q, k, qm)
    assert_close(got, want, atol=1e-6, rtol=1e-5)
    g = torch.randn_like(got)
    for a, b in zip(_grads(got, q, k, g), _grads(want, q, k, g)):
        assert_close(a, b, atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------------------
# GPU tier
# --------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_triton_qwen2_7b_layout(dtype):
    B, Hq, Hkv, L, D = 2, 28, 4, 1031, 128
    q = torch.randn(B, Hq, L, D, device="cuda").to(dtype).requires_grad_()
    k = torch.randn(B, Hkv, L, D, device="cuda").to(dtype).requires_grad_()
    am = torch.ones(B, L, dtype=torch.int64, device="cuda")
    am[1, 900:] = 0
    qm = torch.zeros(B, L, dtype=torch.bool, device="cuda")
    qm[:, 760:824] = True
    got = attention_mass(q, k, qm, am, impl="triton")
    plain = attention_mass(q, k, qm, am, impl="torch")
    truth = attention_mass_reference(q.float(), k.float(), qm, am)
    assert_three_way(got, plain, truth, atol=1e-5 if dtype == torch.float32 else 1e-6, name="mass")
    g = torch.randn_like(got)
    gt, gp = _grads(got, q, k, g), _grads(plain, q, k, g)
    for a, b in zip(gt, gp):
        assert a.dtype == dtype
        assert_close(a.float(), b.float(), atol=1e-3, rtol=1e-2)


@pytest.mark.gpu
def test_gpu_lse_from_sdpa_shape_contract():
    """An lse [B, Hq, L] computed elsewhere (here: by logsumexp) gives the same mass."""
    B, Hq, Hkv, L, D = 1, 8, 2, 300, 64
    q = torch.randn(B, Hq, L, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, Hkv, L, D, device="cuda", dtype=torch.bfloat16)
    qm = torch.zeros(B, L, dtype=torch.bool, device="cuda")
    qm[:, 200:260] = True
    lse = _lse_reference(q.cpu(), k.cpu(), None).cuda()
    a = attention_mass(q, k, qm)
    b = attention_mass(q, k, qm, lse=lse)
    assert_close(b, a, atol=1e-5, rtol=1e-4)


@pytest.mark.gpu
def test_gpu_compile_inductor_fullgraph():
    q, k, qm, am = _to("cuda", *_inputs(2, 8, 2, 96, 64, dtype=torch.bfloat16, padding="right"))
    q.requires_grad_()
    k.requires_grad_()

    def loss_fn(q, k):
        return (attention_mass(q, k, qm, am) * torch.arange(96.0, device="cuda")).sum()

    eager = loss_fn(q, k)
    want = torch.autograd.grad(eager, (q, k))
    torch._dynamo.reset()
    got = torch.compile(loss_fn, backend="inductor", fullgraph=True)(q, k)
    assert_close(got, eager, atol=1e-4, rtol=1e-4)
    for a, b in zip(torch.autograd.grad(got, (q, k)), want):
        assert_close(a, b, atol=1e-3, rtol=1e-3)


@pytest.mark.gpu
def test_gpu_autotune_matches_fixed_blocks(monkeypatch):
    """ALIGN_TI_AUTOTUNE=1: every attention-mass kernel runs under triton.autotune and gives the
    fixed-block result."""
    q, k, qm, am = _to("cuda", *_inputs(2, 8, 2, 200, 64, padding="holes"))
    q.requires_grad_()
    k.requires_grad_()
    g = torch.randn(2, 200, device="cuda")
    fixed = attention_mass(q, k, qm, am)
    want = _grads(fixed, q, k, g)
    monkeypatch.setenv("ALIGN_TI_AUTOTUNE", "1")
    tuned = attention_mass(q, k, qm, am)
    assert_close(tuned, fixed, atol=1e-6, rtol=1e-5)
    for a, b in zip(_grads(tuned, q, k, g), want):
        assert_close(a, b, atol=1e-5, rtol=1e-4)
