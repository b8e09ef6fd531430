"""capture_qk: post-RoPE q / k of chosen decoder layers, under sdpa / eager / flex.

- identical q / k under sdpa and eager (real positions), Qwen2 / Qwen3 / LLaVA;
- outputs unchanged while capturing; the configured implementation unchanged;
- registry and eager globals restored on exit, also after an exception;
- the SigLIP tower (same registry) is not captured; one record per forward, also with
  gradient checkpointing (which calls attention twice);
- gradients flow through the captured tensors; bad layers.
"""
import pytest
import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from align_ti.models.capture import capture_qk, decoder_attention_modules
from align_ti.models.tiny import IMAGE_TOKEN_ID, build_tiny_causal_lm, build_tiny_llava


def _snapshot():
    """Everything capture_qk may patch: the registry's tables and every eager global."""
    import sys

    eager = {
        name: mod.__dict__.get("eager_attention_forward")
        for name, mod in list(sys.modules.items())
        if name.startswith("transformers.models.") and mod is not None
        and "eager_attention_forward" in getattr(mod, "__dict__", {})
    }
    return dict(ALL_ATTENTION_FUNCTIONS._local_mapping), dict(type(ALL_ATTENTION_FUNCTIONS)._global_mapping), eager


def _same(a, b):
    """Two snapshots agree (modeling files imported in between are compared where both have them)."""
    common = a[2].keys() & b[2].keys()
    return a[:2] == b[:2] and all(a[2][m] is b[2][m] for m in common)


def _text_batch(B=2, L=19, padding="right"):
    ids = torch.randint(10, 300, (B, L))
    am = torch.ones(B, L, dtype=torch.int64)
    if padding == "right":
        am[1, L - 5:] = 0
    else:
        am[1, :4] = 0
    return {"input_ids": ids, "attention_mask": am}


def _llava_batch(B=2, L=47, padding="right"):
    batch = _text_batch(B, L, padding)
    batch["input_ids"][:, 5:5 + 36] = IMAGE_TOKEN_ID
    batch["pixel_values"] = torch.randn(B, 3, 48, 48)
    return batch


def _build(kind, impl):
    if kind == "llava":
        return build_tiny_llava("teacher", attn_implementation=impl).eval()
    return build_tiny_causal_lm("teacher", text=kind, attn_implementation=impl).eval()


@pytest.mark.parametrize("kind", ["qwen2", "qwen3", "llava"])
@pytest.mark.parametrize("padding", ["right", "left"])
def test_sdpa_and_eager_give_identical_qk_and_unchanged_outputs(kind, padding):
    batch = _llava_batch(padding=padding) if kind == "llava" else _text_batch(padding=padding)
    real = batch["attention_mask"].bool()
    caps = {}
    before = _snapshot()
    for impl in ("sdpa", "eager"):
        model = _build(kind, impl)
        n = len(decoder_attention_modules(model))
        with torch.no_grad():
            plain = model(**batch).logits
            with capture_qk(model, layers=[0, n - 1]) as cap:
                out = model(**batch).logits
        assert torch.equal(out, plain), f"{impl}: outputs changed while capturing"
        cfg = model.config.text_config if kind == "llava" else model.config
        assert cfg._attn_implementation == impl
        assert cap.calls == {0: 1, n - 1: 1}
        caps[impl] = cap
        assert _same(_snapshot(), before)
    for layer in caps["sdpa"].layers:
        for a, b in zip(caps["sdpa"][layer], caps["eager"][layer]):
            assert a.shape[2] == real.shape[1]
            diff = (a - b).abs().amax(dim=(1, 3))[real]
            # Layer 0 of a text model sees the same inputs bit for bit; later layers (and the
            # vision tower's output) may differ by float reassociation between sdpa and eager.
            assert diff.max() <= (0 if (layer == 0 and kind != "llava") else 1e-5)
    q, k = caps["eager"][-1]
    assert q.shape[1] == 4 and k.shape[1] == 2  # GQA heads as handed to attention
    assert cap[-1] is cap[n - 1]


@pytest.mark.e2e  # flex_attention builds its block mask with torch.compile: ~20 s on CPU
def test_flex_attention_capture():
    batch = _text_batch()
    model = _build("qwen2", "flex_attention")
    ref = _build("qwen2", "eager")
    with torch.no_grad():
        plain = model(**batch).logits
        with capture_qk(model, layers=[1]) as cap:
            out = model(**batch).logits
        with capture_qk(ref, layers=[1]) as cap_ref:
            ref(**batch)
    assert torch.equal(out, plain)
    real = batch["attention_mask"].bool()
    for a, b in zip(cap[1], cap_ref[1]):
        assert (a - b).abs().amax(dim=(1, 3))[real].max() <= 1e-5
    assert "flex_attention" not in ALL_ATTENTION_FUNCTIONS._local_mapping


def test_vision_tower_not_captured_and_one_record_per_forward():
    model = _build("llava", "sdpa")
    batch = _llava_batch()
    calls = []
    original = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def counting(module, *args, **kwargs):
        calls.append(type(module).__name__)
        return original(module, *args, **kwargs)

    ALL_ATTENTION_FUNCTIONS["sdpa"] = counting  # an outer patch: capture must chain and restore it
    try:
        with torch.no_grad(), capture_qk(model, layers=None) as cap:
            model(**batch)
            model(**batch)
        assert ALL_ATTENTION_FUNCTIONS["sdpa"] is counting
    finally:
        del ALL_ATTENTION_FUNCTIONS["sdpa"]
    assert any("Siglip" in c for c in calls)  # the tower went through the same registry
    assert cap.layers == [0, 1, 2, 3]
    assert cap.calls == {l: 2 for l in range(4)}  # two forwards, one record each
    for l in range(4):
        q, _ = cap[l]
        assert q.shape[2] == batch["input_ids"].shape[1]  # text positions, never patches


def test_registry_restored_after_exception():
    before = _snapshot()
    for impl in ("sdpa", "eager"):
        model = _build("qwen2", impl)
        with pytest.raises(RuntimeError, match="boom"):
            with capture_qk(model, layers=[0]):
                assert not _same(_snapshot(), before)  # something is patched inside
                raise RuntimeError("boom")
        assert _same(_snapshot(), before)
        # and the model still runs unpatched
        with torch.no_grad():
            model(**_text_batch())


def test_nested_captures():
    model = _build("qwen2", "sdpa")
    batch = _text_batch()
    with torch.no_grad(), capture_qk(model, layers=[0]) as outer:
        with capture_qk(model, layers=[0, 2]) as inner:
            model(**batch)
        model(**batch)
    assert outer.calls == {0: 2} and inner.calls == {0: 1, 2: 1}
    assert torch.equal(outer[0][0], inner[0][0])


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_overlapping_captures_closed_out_of_order(impl):
    """Blocks entered a, b and closed a, b (an ExitStack or manual __exit__): b keeps
    recording after a closes, and everything is restored once both are closed."""
    before = _snapshot()
    model = _build("qwen2", impl)
    batch = _text_batch()
    first, second = capture_qk(model, layers=0), capture_qk(model, layers=1)
    cap_a, cap_b = first.__enter__(), second.__enter__()
    with torch.no_grad():
        model(**batch)
        first.__exit__(None, None, None)
        assert not _same(_snapshot(), before)  # b's recording is still in place
        model(**batch)
    second.__exit__(None, None, None)
    assert cap_a.calls == {0: 1} and cap_b.calls == {1: 2}
    assert _same(_snapshot(), before)


@pytest.mark.parametrize("impl, reentrant", [("sdpa", False), ("eager", False), ("sdpa", True)])
def test_gradient_checkpointing_records_once_and_grads_flow(impl, reentrant):
    from align_ti.ops.attention_mass import attention_mass

    batch = _text_batch()
    model = _build("qwen2", impl)
    with capture_qk(model, layers=[1], detach=True) as cap_plain:
        model(**batch)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.train()  # checkpointing is active in training mode only (dropout is 0)
    qm = torch.zeros_like(batch["attention_mask"], dtype=torch.bool)
    qm[:, 8:14] = True
    with capture_qk(model, layers=[1]) as cap:
        out = model(**batch)
        q, k = cap[1]
        loss = out.logits.float().pow(2).mean()
        if not reentrant:  # reentrant checkpointing runs the first forward without autograd
            loss = loss + attention_mass(q, k, qm, batch["attention_mask"])[:, :6].sum()
        loss.backward()
    assert cap.calls == {1: 1}  # the recomputation during backward is not recorded
    for a, b in zip(cap[1], cap_plain[1]):
        assert torch.allclose(a.detach(), b, atol=1e-6)
    grad = model.model.layers[1].self_attn.q_proj.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_bad_layers():
    model = _build("qwen2", "sdpa")
    for bad in ([4], [-5], [0, 7]):
        with pytest.raises(ValueError, match="layers"):
            with capture_qk(model, layers=bad):
                pass
    with pytest.raises(ValueError, match="layers"):
        with capture_qk(model, layers=[]):
            pass
    with pytest.raises(TypeError, match="layers"):
        with capture_qk(model, layers=["0"]):
            pass
    with pytest.raises(TypeError, match="detach"):
        with capture_qk(model, layers=[0], detach="yes"):
            pass
    with pytest.raises(ValueError, match="model"):
        with capture_qk(torch.nn.Linear(2, 2), layers=[0]):
            pass
    with capture_qk(model, layers=2) as cap:
        pass
    with pytest.raises(KeyError, match="no forward"):
        cap[2]
    with pytest.raises(KeyError, match="not captured"):
        cap[1]
