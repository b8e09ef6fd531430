"""TPA branches: the fast builder against the loop oracle, the expanded forward against separate
forwards on tiny Qwen2 and Llava (sdpa, eager; flex on CUDA), candidate sampling, positions,
reproducibility, max_expanded_len, the TPA loss and bad input."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

import align_ti
from align_ti.data.llava import VQACollator
from align_ti.data.synthetic import synthetic_vqa
from align_ti.models.tiny import IMAGE_TOKEN_ID, PAD_TOKEN_ID, build_tiny_causal_lm, build_tiny_llava
from align_ti.ops.branches import (
    ExpandedBatch,
    build_expanded_batch,
    candidate_hidden_states,
    default_position_ids,
    expanded_hidden_states,
    forbidden_token_ids,
    ground_truth_pass,
    prefix_cache_unsupported,
    sample_candidates,
    select_branch_steps,
    tpa_loss,
)
from align_ti.reference.branches import additive_mask, expanded_batch_reference
from align_ti.reference.fused_kl import fused_linear_kl_reference
from tests.utils import assert_close, forbid_host_syncs

HAS_CUDA = torch.cuda.is_available()


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

def random_batch(g, b, length, vocab=200, min_len=3, prompt=2):
    """Right-padded batch of variable lengths; labels = ids after a short prompt."""
    lengths = torch.randint(min_len, length + 1, (b,), generator=g)
    lengths[0] = length
    ids = torch.randint(5, vocab, (b, length), generator=g)
    am = torch.zeros(b, length, dtype=torch.long)
    labels = torch.full((b, length), -100)
    for i, n in enumerate(lengths.tolist()):
        am[i, :n] = 1
        ids[i, n:] = 0
        p = min(prompt, n - 1)
        labels[i, p:n] = ids[i, p:n]
    return ids, am, labels


def flat_slots(steps, cands):
    b, s, d = cands.shape
    return steps[:, :, None].expand(b, s, d).reshape(b, s * d), cands.reshape(b, s * d)


def check_against_reference(eb: ExpandedBatch, ids, am, slot_steps, slot_cands, labels, pad_id=0):
    ref = expanded_batch_reference(ids, am, slot_steps, slot_cands, labels=labels, pad_id=pad_id)
    for key in ("input_ids", "position_ids", "attention_mask", "targets"):
        want = ref[key]
        got = getattr(eb, key)
        if want is None:
            assert got is None
            continue
        assert torch.equal(got, want), f"{key}: {got} vs {want}"
    assert torch.equal(eb.allowed(), ref["allowed"])
    assert torch.equal(eb.sdpa_mask(), ref["allowed"].unsqueeze(1))
    assert torch.equal(eb.eager_mask(torch.bfloat16), additive_mask(ref["allowed"], torch.bfloat16))
    # the FlexAttention mask_mod is the same rule, evaluated at every (b, q, k)
    t = eb.total_length
    mm = eb.mask_mod()(torch.arange(eb.batch_size)[:, None, None], None,
                       torch.arange(t)[None, :, None], torch.arange(t)[None, None, :])
    assert torch.equal(mm, ref["allowed"])


# --------------------------------------------------------------------------------------------
# builder == reference
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_builder_matches_reference_sampled_steps(seed):
    g = torch.Generator().manual_seed(seed)
    ids, am, labels = random_batch(g, 4, 13)
    steps = select_branch_steps(labels, am, fraction=[1.0, 0.5, 0.25, 0.3][seed], seed=seed)
    d = 1 + seed % 3
    cands = torch.randint(5, 200, (*steps.shape, d), generator=g)
    eb = build_expanded_batch(ids, am, steps, cands, labels=labels, pad_id=3)
    ss, cc = flat_slots(steps, cands)
    assert eb.num_slots == ss.shape[1] and eb.total_length == 13 + ss.shape[1]
    check_against_reference(eb, ids, am, ss, cc, labels, pad_id=3)


@pytest.mark.parametrize("seed", [0, 1])
def test_builder_matches_reference_empty_slots_anywhere(seed):
    """[B, C] slots in any order with empty slots in between, no labels, custom position ids."""
    g = torch.Generator().manual_seed(100 + seed)
    ids, am, labels = random_batch(g, 3, 11, min_len=2)
    c = 7
    steps = torch.full((3, c), -1)
    for b in range(3):
        n = int(am[b].sum())
        for j in range(c):
            if torch.rand((), generator=g) < 0.6:
                steps[b, j] = int(torch.randint(1, n, (), generator=g))
    cands = torch.randint(5, 200, (3, c), generator=g)
    eb = build_expanded_batch(ids, am, steps, cands)
    check_against_reference(eb, ids, am, steps, cands, None)
    assert eb.targets is None
    pos = torch.randint(0, 50, ids.shape, generator=g)
    eb2 = build_expanded_batch(ids, am, steps, cands, position_ids=pos)
    ref = expanded_batch_reference(ids, am, steps, cands, position_ids=pos)
    assert torch.equal(eb2.position_ids, ref["position_ids"])


@pytest.mark.parametrize("padding", ["right", "left"])
def test_default_position_ids_equal_the_references_twin(padding):
    """The fast path's default position ids (0.. over real tokens) and the oracle's own loop
    copy agree, also before the first real token and on an all-padding row."""
    am = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
    if padding == "left":
        am = am.flip(1)
    ids = torch.arange(5, 10).repeat(3, 1)
    none = torch.zeros(3, 0, dtype=torch.long)
    want = expanded_batch_reference(ids, am, none, none)["position_ids"]
    assert torch.equal(default_position_ids(am), want)
    assert torch.equal(build_expanded_batch(ids, am, none, none).position_ids, want)


def test_builder_no_slots():
    ids = torch.tensor([[5, 6, 7, 0]])
    am = torch.tensor([[1, 1, 1, 0]])
    eb = build_expanded_batch(ids, am, torch.zeros(1, 0, dtype=torch.long), torch.zeros(1, 0, 4, dtype=torch.long))
    assert eb.total_length == 4 and eb.num_slots == 0 and eb.candidate_rows.numel() == 0


def test_row_helpers():
    ids = torch.tensor([[5, 6, 7, 8], [5, 6, 0, 0]])
    am = (ids > 0).long()
    steps = torch.tensor([[2, 3], [1, -1]])
    eb = build_expanded_batch(ids, am, steps, torch.full((2, 2, 2), 9))
    t = eb.total_length
    assert t == 8
    assert eb.candidate_rows.tolist() == [4, 5, 6, 7, 12, 13, 14, 15]
    assert eb.candidate_valid.tolist() == [True] * 6 + [False] * 2
    assert eb.ground_truth_rows().tolist() == [0, 1, 2, 3, 8, 9, 10, 11]
    sel = torch.tensor([[False, True, True, False], [True, False, False, False]])
    rows = eb.expand_rows(sel)
    assert rows.nonzero().squeeze(1).tolist() == [1, 2, 8]
    assert eb.expand_positions(torch.tensor([[0, 3], [1, 2]])).tolist() == [[0, 3], [9, 10]]
    x = torch.randn(2, t, 5)
    assert torch.equal(eb.ground_truth(x), x[:, :4])


# --------------------------------------------------------------------------------------------
# max_expanded_len
# --------------------------------------------------------------------------------------------

def test_max_expanded_len_drops_latest_steps_first():
    ids = torch.arange(10, 20).repeat(2, 1)
    am = torch.ones(2, 10, dtype=torch.long)
    am[1, 6:] = 0
    steps = torch.tensor([[7, 2, 5, 8], [3, 1, 5, -1]])  # unsorted on purpose
    cands = torch.arange(100, 116).view(2, 4, 2)
    # budget 5 slots: sample 0 keeps steps 2, 5 (4 slots; step 7 needs 2 more); sample 1 keeps 1, 3
    eb = build_expanded_batch(ids, am, steps, cands, max_expanded_len=15)
    assert eb.total_length == 15 and eb.num_slots == 5
    assert eb.steps.tolist() == [[2, 2, 5, 5, -1], [3, 3, 1, 1, -1]]
    assert eb.candidates[0, :4].tolist() == [102, 103, 104, 105]
    assert eb.candidates[1, :4].tolist() == [108, 109, 110, 111]
    # the kept slots equal the reference built from the kept steps only
    check_against_reference(eb, ids, am, eb.steps, eb.candidates, None)
    # budget for everything: unchanged; L alone too long: all branches dropped, gt kept
    assert build_expanded_batch(ids, am, steps, cands, max_expanded_len=18).num_slots == 8
    none = build_expanded_batch(ids, am, steps, cands, max_expanded_len=6)
    assert none.num_slots == 0 and torch.equal(none.input_ids, ids)


def test_max_expanded_len_is_deterministic_and_batch_independent():
    g = torch.Generator().manual_seed(7)
    ids, am, labels = random_batch(g, 4, 12)
    steps = select_branch_steps(labels, am)
    cands = torch.randint(5, 200, (*steps.shape, 3), generator=g)
    a = build_expanded_batch(ids, am, steps, cands, labels=labels, max_expanded_len=12 + 9)
    b = build_expanded_batch(ids[1:2], am[1:2], steps[1:2], cands[1:2], labels=labels[1:2], max_expanded_len=12 + 9)
    assert torch.equal(a.steps[1], b.steps[0]) and torch.equal(a.input_ids[1], b.input_ids[0])
    kept = a.steps[a.steps >= 0]
    for row, full in zip(a.steps, steps):  # every kept step keeps all 3 candidates; earliest steps kept
        k = row[row >= 0]
        assert (k.bincount() % 3 == 0).all()
        full = full[full >= 0]
        assert torch.equal(k.unique(), full[: k.unique().numel()])
    assert kept.numel() > 0


# --------------------------------------------------------------------------------------------
# the expanded forward == separate forwards (tiny Qwen2 and tiny Llava)
# --------------------------------------------------------------------------------------------

def _logits(model, hidden):
    return hidden @ model.get_output_embeddings().weight.t()


def _check_forward_equivalence(model, ids, am, steps, cands, pixel_values=None, labels=None):
    eb = build_expanded_batch(ids, am, steps, cands, labels=labels, pad_id=PAD_TOKEN_ID)
    with torch.no_grad():
        hidden = expanded_hidden_states(model, eb, pixel_values=pixel_values)
        assert hidden.shape[:2] == (ids.shape[0], eb.total_length)
        out = _logits(model, hidden)
        kw = {} if pixel_values is None else {"pixel_values": pixel_values}
        plain = model(input_ids=ids, attention_mask=am, **kw).logits  # the unexpanded forward
        length = ids.shape[1]
        n_checked = 0
        for b in range(ids.shape[0]):
            n = int(am[b].sum())
            assert_close(out[b, :n], plain[b, :n], atol=1e-5, name=f"ground-truth rows of sample {b}")
            pv = None if pixel_values is None else pixel_values[b : b + 1]
            for c in range(eb.num_slots):
                t = int(eb.steps[b, c])
                if t < 0:
                    continue
                seq = torch.cat([ids[b, :t], eb.candidates[b, c : c + 1]]).unsqueeze(0)
                alone = model(input_ids=seq, **({} if pv is None else {"pixel_values": pv})).logits[0, -1]
                assert_close(out[b, length + c], alone, atol=1e-5, name=f"candidate slot {c} of sample {b}")
                n_checked += 1
    assert n_checked > 0
    return eb


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_qwen2_expanded_forward_equals_separate_forwards(attn):
    model = build_tiny_causal_lm("student", "qwen2", attn_implementation=attn).eval()
    g = torch.Generator().manual_seed(5)
    ids, am, labels = random_batch(g, 3, 14, vocab=400, min_len=6, prompt=4)
    steps = select_branch_steps(labels, am, max_per_sample=3, seed=1)
    cands = torch.randint(5, 400, (*steps.shape, 2), generator=g)
    _check_forward_equivalence(model, ids, am, steps, cands, labels=labels)


def test_expanded_forward_refuses_a_mask_form_the_model_does_not_run():
    model = build_tiny_causal_lm("student", "qwen2", attn_implementation="eager").eval()
    ids, am, _ = _small()
    eb = build_expanded_batch(ids, am, torch.tensor([[2]]), torch.tensor([[[9]]]))
    with torch.no_grad():
        same = expanded_hidden_states(model, eb, attn_implementation="eager")
        assert torch.equal(same, expanded_hidden_states(model, eb))
        for other in ("sdpa", "flex_attention"):  # a bool mask under eager is silently wrong
            with pytest.raises(ValueError, match="attn_implementation"):
                expanded_hidden_states(model, eb, attn_implementation=other)


def _llava_batch(proc, n=3):
    items = synthetic_vqa("train", n_images=4, seed=0, questions_per_image=None)
    by_len, picked = {}, []
    for it in items:  # samples of different lengths: right padding is exercised
        n_tok = len(proc.tokenizer(it["question"] + it["answer"])["input_ids"])
        if n_tok not in by_len:
            by_len[n_tok] = it
    picked = [by_len[k] for k in sorted(by_len)[-n:]]
    batch = VQACollator(proc)(picked)
    assert batch["attention_mask"].sum(1).unique().numel() > 1
    # widen the "response" to the question too (more steps; the builder only needs a mask)
    labels = batch["labels"].clone()
    after_image = (batch["input_ids"] == IMAGE_TOKEN_ID).cumsum(1) == (batch["input_ids"] == IMAGE_TOKEN_ID).sum(1, keepdim=True)
    after_image &= batch["input_ids"] != IMAGE_TOKEN_ID
    resp = after_image & batch["attention_mask"].bool()
    labels[resp] = batch["input_ids"][resp]
    return batch, labels


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_llava_expanded_forward_equals_separate_forwards(attn, processor):
    model = build_tiny_llava("student", "qwen2", attn_implementation=attn).eval()
    batch, labels = _llava_batch(processor)
    forbidden, vlim = forbidden_token_ids(model, processor.tokenizer)
    assert IMAGE_TOKEN_ID in forbidden and PAD_TOKEN_ID in forbidden and vlim == len(processor.tokenizer)
    steps = select_branch_steps(labels, batch["attention_mask"], max_per_sample=2, seed=2)
    with torch.no_grad():
        h = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        pixel_values=batch["pixel_values"]).last_hidden_state
    cands = sample_candidates(h, model.get_output_embeddings().weight, batch["input_ids"], steps,
                              num_candidates=2, forbidden_ids=forbidden, vocab_limit=vlim, seed=3)
    _check_forward_equivalence(model, batch["input_ids"], batch["attention_mask"], steps, cands,
                               pixel_values=batch["pixel_values"], labels=labels)


# --------------------------------------------------------------------------------------------
# the prefix-cached way == the expanded forward == separate forwards, gradients included
# --------------------------------------------------------------------------------------------

def _prefix_cached(model, batch, eb, pixel_values=None):
    """[B, L + C] hidden states the prefix-cached way (ground truth, then the candidates)."""
    prefix = ground_truth_pass(model, batch["input_ids"], batch["attention_mask"], eb.position_ids[:, :eb.length],
                               pixel_values=pixel_values)
    return torch.cat([prefix.hidden, candidate_hidden_states(model, eb, prefix)], 1)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("left_pad", [False, True])
def test_prefix_cached_way_equals_the_expanded_forward_with_gradients(attn, left_pad, processor):
    """The candidates' own pass over the ground truth's cached keys and values gives the expanded
    forward's hidden states (ground-truth and candidate rows), and the same gradient for every
    parameter (the candidates' gradients reach the student's ground-truth keys and values
    through the cache); each candidate row also equals a separate forward of its prefix plus
    itself. fp32, training mode."""
    import copy

    model = build_tiny_llava("student", "qwen2", attn_implementation=attn).train()
    batch, labels = _llava_batch(processor)
    if left_pad:  # the padding moved to the front of each sample
        n = batch["attention_mask"].sum(1)
        length = batch["input_ids"].shape[1]
        for key, fill in (("input_ids", PAD_TOKEN_ID), ("attention_mask", 0), ("labels", -100)):
            t = batch[key] if key != "labels" else labels
            rolled = torch.stack([torch.roll(t[b], int(length - n[b])) for b in range(t.shape[0])])
            if key == "labels":
                labels = rolled
            else:
                batch[key] = rolled
    ids, am, pv = batch["input_ids"], batch["attention_mask"], batch["pixel_values"]
    steps = select_branch_steps(labels, am, max_per_sample=3, seed=4)
    cands = torch.randint(5, 1000, (*steps.shape, 2), generator=torch.Generator().manual_seed(6))
    cands[cands == IMAGE_TOKEN_ID] = 7
    eb = build_expanded_batch(ids, am, steps, cands, labels=labels, pad_id=PAD_TOKEN_ID)
    valid = torch.cat([am.bool(), eb.candidate_valid.view(ids.shape[0], -1)], 1)
    g = torch.randn(*valid.shape, model.config.text_config.hidden_size, generator=torch.Generator().manual_seed(7))
    g = g * valid[..., None]  # padding rows and empty slots carry nothing

    twin = copy.deepcopy(model)
    expanded = expanded_hidden_states(twin, eb, pixel_values=pv)
    (expanded * g).sum().backward()
    cached = _prefix_cached(model, batch, eb, pixel_values=pv)
    (cached * g).sum().backward()
    assert_close(cached * valid[..., None], expanded * valid[..., None], atol=2e-6, rtol=1e-5, name="hidden")
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if q.grad is None:  # the LM head: hidden states never pass it
            continue
        scale = q.grad.abs().max().item()
        if scale > 1e-4:  # (a key bias's true gradient is 0: softmax ignores it; noise only)
            assert_close(p.grad, q.grad, atol=1e-5 * scale, rtol=0, name=f"grad of {name}")
    with torch.no_grad():  # the candidate rows against separate forwards of prefix + candidate
        out = _logits(model, cached)
        length, checked = ids.shape[1], 0
        for b in range(ids.shape[0]):
            real = am[b].bool()
            for c in range(eb.num_slots):
                t = int(eb.steps[b, c])
                if t < 0:
                    continue
                prefix_ids = ids[b, :t][real[:t]]
                seq = torch.cat([prefix_ids, eb.candidates[b, c:c + 1]]).unsqueeze(0)
                alone = model(input_ids=seq, pixel_values=pv[b:b + 1]).logits[0, -1]
                assert_close(out[b, length + c], alone, atol=2e-5, name=f"candidate slot {c} of sample {b}")
                checked += 1
        assert checked > 0


def test_prefix_cache_unsupported_says_why():
    """What the cached way cannot run: gradient checkpointing in training (transformers keeps no
    cache then: ground_truth_pass refuses rather than run candidates without their prefix),
    sliding-window attention, dynamic RoPE, FlexAttention; a plain model can."""
    model = build_tiny_causal_lm("student", "qwen2").train()
    assert prefix_cache_unsupported(model) is None
    model.gradient_checkpointing_enable()
    assert "checkpointing" in prefix_cache_unsupported(model)
    ids = torch.randint(5, 300, (2, 9))
    with pytest.raises(RuntimeError, match="cache holds 0 positions"):
        ground_truth_pass(model, ids, torch.ones_like(ids), torch.arange(9).expand(2, 9))
    model.eval()
    assert prefix_cache_unsupported(model) is None  # no checkpointing outside training
    sliding = build_tiny_causal_lm("student", "qwen2", use_sliding_window=True, sliding_window=4,
                                   max_window_layers=0)
    assert "sliding-window" in prefix_cache_unsupported(sliding)
    dynamic = build_tiny_causal_lm("student", "qwen2",
                                   rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4})
    assert "dynamic" in prefix_cache_unsupported(dynamic)
    flex = build_tiny_causal_lm("student", "qwen2", attn_implementation="flex_attention")
    assert "flex_attention" in prefix_cache_unsupported(flex)


def test_candidate_pass_checks_its_prefix(processor):
    model = build_tiny_causal_lm("student", "qwen2").eval()
    ids, am, labels = random_batch(torch.Generator().manual_seed(2), 2, 10, vocab=300, min_len=5, prompt=2)
    steps = select_branch_steps(labels, am, max_per_sample=2, seed=1)
    eb = build_expanded_batch(ids, am, steps, torch.randint(5, 300, (*steps.shape, 2)), labels=labels)
    with torch.no_grad():
        prefix = ground_truth_pass(model, ids, am, eb.position_ids[:, :eb.length])
        candidate_hidden_states(model, eb, prefix)
        with pytest.raises(ValueError, match="a prefix serves one candidates' pass"):
            candidate_hidden_states(model, eb, prefix)  # its cache now holds the candidates too
        with pytest.raises(TypeError, match="prefix must be a PrefixPass"):
            candidate_hidden_states(model, eb, prefix.hidden)


def test_block_mask_attention_equals_dense_sdpa_cpu():
    """The BlockMask (small blocks, so several are skipped) gives SDPA's dense-mask result
    through flex_attention (uncompiled: the unfused CPU path; the model-level flex test runs on
    CUDA, since compiling flex on CPU takes ~25 s)."""
    from torch.nn.attention.flex_attention import flex_attention

    g = torch.Generator().manual_seed(3)
    ids, am, labels = random_batch(g, 2, 40, min_len=20)
    steps = select_branch_steps(labels, am, fraction=0.5, seed=0)
    eb = build_expanded_batch(ids, am, steps, torch.randint(5, 200, (*steps.shape, 2), generator=g), labels=labels)
    q, k, v = (torch.randn(2, 2, eb.total_length, 8, generator=g) for _ in range(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bm = eb.block_mask(block_size=16)
        out = flex_attention(q, k, v, block_mask=bm)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=eb.sdpa_mask())
    assert_close(out, ref, atol=1e-5, name="flex vs sdpa")
    assert bm.sparsity() > 0  # the candidate-candidate blocks are skipped


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["qwen2", "llava"])
def test_flex_expanded_forward_equals_sdpa_cuda(kind, processor):
    """Inductor's CUDA flex kernels need head_dim >= 16 (the tiny text models have 16, the
    tiny vision tower 12) and found no fp32 configuration for the short-query (decoding)
    kernel on an H100 (torch 2.11): head_dim 32 and expanded sequences longer than 128 here,
    and the vision tower on SDPA (TPA only needs flex in the language model)."""
    dev = torch.device("cuda")
    wide = dict(hidden_size=128, num_attention_heads=4)
    if kind == "qwen2":
        flex = build_tiny_causal_lm("student", attn_implementation="flex_attention", **wide).to(dev).eval()
        sdpa = build_tiny_causal_lm("student", attn_implementation="sdpa", **wide).to(dev).eval()
        g = torch.Generator().manual_seed(5)
        ids, am, labels = random_batch(g, 3, 96, vocab=400, min_len=70, prompt=4)
        pv = None
    else:
        impl = {"text_config": "flex_attention", "vision_config": "sdpa", "": "sdpa"}
        flex = build_tiny_llava("student", attn_implementation=impl, **wide).to(dev).eval()
        sdpa = build_tiny_llava("student", attn_implementation="sdpa", **wide).to(dev).eval()
        batch, labels = _llava_batch(processor)
        ids, am, pv = batch["input_ids"], batch["attention_mask"], batch["pixel_values"].to(dev)
    # qwen2: L=96, half the steps x 4 candidates; llava: every step x 6 (expanded L > 128)
    fraction, d = (0.5, 4) if kind == "qwen2" else (1.0, 6)
    steps = select_branch_steps(labels, am, fraction=fraction)
    cands = torch.randint(5, 400, (*steps.shape, d))
    eb = build_expanded_batch(ids.to(dev), am.to(dev), steps.to(dev), cands.to(dev), labels=labels.to(dev))
    with torch.no_grad():
        a = expanded_hidden_states(flex, eb, pixel_values=pv)
        b = expanded_hidden_states(sdpa, eb, pixel_values=pv)
    assert_close(a, b, atol=2e-4, rtol=1e-4, name="flex vs sdpa expanded hidden states")
    # training path: flex has a backward on CUDA
    flex.train()
    h = expanded_hidden_states(flex, eb, pixel_values=pv)
    h[:, eb.length:].float().pow(2).mean().backward()
    grad = flex.get_decoder().layers[0].self_attn.q_proj.weight.grad
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------
# branched positions
# --------------------------------------------------------------------------------------------

def test_select_branch_steps_counts_and_eligibility():
    g = torch.Generator().manual_seed(11)
    ids, am, labels = random_batch(g, 5, 20, min_len=4, prompt=3)
    elig = (labels != -100) & am.bool() & (torch.arange(20) >= 1)
    n = elig.sum(1)
    all_steps = select_branch_steps(labels, am)
    for b in range(5):
        got = all_steps[b][all_steps[b] >= 0]
        assert got.tolist() == elig[b].nonzero().squeeze(1).tolist()
    for frac, cap in ((0.25, None), (0.3, None), (0.5, 2), (1.0, 3)):
        st = select_branch_steps(labels, am, fraction=frac, max_per_sample=cap, seed=4)
        for b in range(5):
            got = st[b][st[b] >= 0]
            want = math.ceil(round(frac * int(n[b]), 9))
            if cap is not None:
                want = min(want, cap)
            assert got.numel() == want
            assert bool(elig[b, got].all()) and bool((got.diff() > 0).all())


def test_select_branch_steps_reproducible_across_batches():
    g = torch.Generator().manual_seed(12)
    ids, am, labels = random_batch(g, 4, 30, min_len=10)
    sid = torch.tensor([10, 11, 12, 13])
    a = select_branch_steps(labels, am, fraction=0.3, seed=9, sample_ids=sid, epoch=2)
    # sample 2 alone, with extra padding, in another batch position
    lab2 = torch.full((2, 40), -100)
    am2 = torch.zeros(2, 40, dtype=torch.long)
    lab2[1, :30], am2[1, :30] = labels[2], am[2]
    lab2[0, :5], am2[0, :5] = torch.tensor([-100, 7, 8, 9, 10]), 1
    b = select_branch_steps(lab2, am2, fraction=0.3, seed=9, sample_ids=torch.tensor([99, 12]), epoch=2)
    assert a[2][a[2] >= 0].tolist() == b[1][b[1] >= 0].tolist()
    c = select_branch_steps(labels, am, fraction=0.3, seed=9, sample_ids=sid, epoch=3)
    assert not torch.equal(a, c)  # another epoch draws other positions


def _left_pad(x, n, value=0):
    return torch.cat([torch.full((x.shape[0], n, *x.shape[2:]), value, dtype=x.dtype), x], 1)


@pytest.mark.parametrize("seed", range(6))
def test_steps_and_candidates_do_not_depend_on_left_padding(seed):
    """Positions are keyed from each sample's first real token: left padding shifts the
    chosen steps and leaves the candidates unchanged."""
    hidden, weight, ids, am, labels = _head_setup(seed=seed, b=3, length=14)
    sid = torch.tensor([3, 4, 5])
    kw = dict(seed=seed, sample_ids=sid, epoch=1)
    steps = select_branch_steps(labels, am, fraction=0.4, **kw)
    cands = sample_candidates(hidden, weight, ids, steps, num_candidates=3, attention_mask=am, **kw)
    pad = 5
    steps_l = select_branch_steps(_left_pad(labels, pad, -100), _left_pad(am, pad), fraction=0.4, **kw)
    assert torch.equal(steps_l, torch.where(steps >= 0, steps + pad, steps))
    cands_l = sample_candidates(_left_pad(hidden, pad), weight, _left_pad(ids, pad), steps_l,
                                num_candidates=3, attention_mask=_left_pad(am, pad), **kw)
    assert torch.equal(cands_l, cands)


# --------------------------------------------------------------------------------------------
# candidate sampling
# --------------------------------------------------------------------------------------------

def _head_setup(seed=0, b=3, length=12, h=16, v=300):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, length, h, generator=g)
    weight = torch.randn(v, h, generator=g)
    ids, am, labels = random_batch(g, b, length, vocab=min(v, 200))
    return hidden, weight, ids, am, labels


def _full_logits(hidden, weight, steps, bias=None):
    t = steps.clamp(min=1)
    rows = hidden.gather(1, (t - 1)[:, :, None].expand(-1, -1, hidden.shape[-1]))
    z = rows @ weight.t()
    return z if bias is None else z + bias


@pytest.mark.parametrize("strategy", ["sample", "topk"])
def test_candidates_never_forbidden_nor_ground_truth(strategy):
    hidden, weight, ids, am, labels = _head_setup()
    steps = select_branch_steps(labels, am)
    gt = ids.gather(1, steps.clamp(min=1))
    # make the forbidden ids, the ids above the limit and the ground truth the most likely tokens
    bias = torch.zeros(weight.shape[0])
    forbidden = (0, 3, 17)
    bias[list(forbidden)] = 50.0
    bias[250:] = 60.0
    bias[ids.flatten()] += 40.0
    cands = sample_candidates(hidden, weight, ids, steps, num_candidates=4, strategy=strategy,
                              forbidden_ids=forbidden, vocab_limit=250, student_bias=bias, seed=1)
    valid = steps >= 0
    c = cands[valid]
    assert not torch.isin(c, torch.tensor(forbidden)).any()
    assert (c < 250).all()
    assert not (c == gt[valid][:, None]).any()
    assert all(len(set(row)) == 4 for row in c.tolist())  # without replacement
    assert (cands[~valid] == 0).all()
    # allowed when asked: topk then equals the true top-4 over the allowed ids, gt included
    top = sample_candidates(hidden, weight, ids, steps, num_candidates=4, strategy="topk",
                            forbidden_ids=forbidden, vocab_limit=250, student_bias=bias,
                            exclude_ground_truth=False)
    z = _full_logits(hidden, weight, steps, bias)[..., :250]
    z[..., list(forbidden)] = float("-inf")
    want = z.topk(4, dim=-1).indices
    assert torch.equal(top[valid].sort(-1).values, want[valid].sort(-1).values)
    assert (top[valid] == gt[valid][:, None]).any()


def test_topk_equals_true_top_d():
    hidden, weight, ids, am, labels = _head_setup(seed=2)
    steps = select_branch_steps(labels, am)
    forbidden = (1, 2, 5)
    got = sample_candidates(hidden, weight, ids, steps, num_candidates=5, strategy="topk",
                            forbidden_ids=forbidden, chunk_bytes=3 * 300 * 4)
    z = _full_logits(hidden, weight, steps)
    z[..., list(forbidden)] = float("-inf")
    z.scatter_(2, ids.gather(1, steps.clamp(min=1))[:, :, None], float("-inf"))
    want = z.topk(5, dim=-1).indices
    valid = steps >= 0
    assert torch.equal(got[valid].sort(-1).values, want[valid].sort(-1).values)


def test_sampling_reproducible_by_sample_id_not_batch():
    hidden, weight, ids, am, labels = _head_setup(seed=3, b=4, length=15)
    sid = torch.tensor([5, 6, 7, 8])
    steps = select_branch_steps(labels, am, fraction=0.5, seed=1, sample_ids=sid)
    kw = dict(num_candidates=3, temperature=1.3, seed=1, epoch=4)
    a = sample_candidates(hidden, weight, ids, steps, sample_ids=sid, **kw)
    # sample 1 in another batch: different neighbour, other batch position, longer padding,
    # a different chunking
    h2 = torch.zeros(2, 20, hidden.shape[-1])
    h2[0] = torch.randn(20, hidden.shape[-1])
    h2[1, :15] = hidden[1]
    ids2 = torch.zeros(2, 20, dtype=torch.long)
    ids2[1, :15] = ids[1]
    ids2[0] = torch.randint(5, 200, (20,))
    st2 = torch.full((2, steps.shape[1] + 2), -1)
    st2[1, : steps.shape[1]] = steps[1]
    st2[0, :3] = torch.tensor([4, 6, 9])
    b = sample_candidates(h2, weight, ids2, st2, sample_ids=torch.tensor([77, 6]), chunk_bytes=1, **kw)
    n = int((steps[1] >= 0).sum())
    assert torch.equal(a[1, :n], b[1, :n])
    c = sample_candidates(hidden, weight, ids, steps, sample_ids=sid, **{**kw, "epoch": 5})
    assert not torch.equal(a, c)


def test_sampling_follows_the_softmax():
    """Gumbel-top-1 frequencies over many independent steps match softmax(z / T) over the
    allowed tokens (the ground truth and the forbidden ids renormalised away)."""
    v, h, length = 8, 4, 2001
    g = torch.Generator().manual_seed(0)
    w = torch.randn(v, h, generator=g)
    x = torch.randn(h, generator=g)
    hidden = x.expand(1, length, h).clone()
    ids = torch.full((1, length), 7)
    steps = torch.arange(1, length)[None]
    temp = 1.7
    draws = sample_candidates(hidden, w, ids, steps, num_candidates=2, temperature=temp,
                              forbidden_ids=[6], seed=5)
    p = torch.softmax(x @ w.t() / temp, 0)
    p[6] = p[7] = 0
    p = p / p.sum()
    freq = torch.bincount(draws[0, :, 0], minlength=v).double() / (length - 1)
    assert (freq - p.double()).abs().max() < 0.035, (freq, p)
    assert (draws[0, :, 0] != draws[0, :, 1]).all()


# --------------------------------------------------------------------------------------------
# the TPA loss
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("divergence", ["forward", "reverse", "jsd"])
def test_tpa_loss_matches_reference_on_candidate_rows(divergence):
    g = torch.Generator().manual_seed(4)
    b, hs, ht, vs, vt = 2, 12, 20, 131, 140
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11], [5, 6, 7, 8, 0, 0, 0]])
    am = (ids > 0).long()
    steps = torch.tensor([[2, 4, 6], [3, -1, -1]])
    eb = build_expanded_batch(ids, am, steps, torch.randint(12, 100, (2, 3, 1), generator=g))
    assert eb.total_length == 10
    s_h = torch.randn(b, 10, hs, generator=g, requires_grad=True)
    t_h = torch.randn(b, 10, ht, generator=g)
    s_w = (torch.randn(vs, hs, generator=g) * 0.3).requires_grad_()
    t_w = torch.randn(vt, ht, generator=g) * 0.3
    loss = tpa_loss(s_h, s_w, t_h, t_w, eb, divergence=divergence, temperature=1.5)
    rows = eb.candidate_rows[eb.candidate_valid]
    assert rows.tolist() == [7, 8, 9, 17]
    ref_sh = s_h.detach().clone().requires_grad_()
    ref_sw = s_w.detach().clone().requires_grad_()
    ref = fused_linear_kl_reference(ref_sh.reshape(-1, hs), ref_sw, t_h.reshape(-1, ht), t_w, rows=rows,
                                    divergence=divergence, temperature=1.5)
    assert_close(loss, ref, atol=1e-5, name="tpa loss")
    loss.backward()
    ref.backward()
    assert_close(s_h.grad, ref_sh.grad, atol=1e-5, name="grad student_hidden")
    assert_close(s_w.grad, ref_sw.grad, atol=1e-5, name="grad student_weight")
    none = tpa_loss(s_h, s_w, t_h, t_w, eb, divergence=divergence, temperature=1.5, reduction="none")
    assert none.shape == (6,) and (none[eb.candidate_valid.logical_not()] == 0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ["sample", "topk"])
def test_gpu_sample_candidates_never_syncs_with_the_host(strategy):
    """With value checks off, candidate sampling makes no host sync (CUDA's sync debug mode
    raises on one): the forbidden-token mask goes to the device from pinned memory."""
    g = torch.Generator().manual_seed(6)
    h = torch.randn(2, 12, 16, generator=g).cuda()
    w = torch.randn(300, 16, generator=g).cuda()
    ids = torch.randint(5, 300, (2, 12), generator=g).cuda()
    steps = torch.tensor([[2, 5, 9], [3, 7, -1]]).cuda()
    kw = dict(num_candidates=4, strategy=strategy, forbidden_ids=(0, 3), sample_ids=torch.tensor([4, 9]).cuda())
    want = sample_candidates(h, w, ids, steps, **kw)  # warm-up, checks on
    with forbid_host_syncs():
        got = sample_candidates(h, w, ids, steps, **kw)
    assert torch.equal(got, want)


def test_tpa_loss_passes_kernel_options_on():
    """chunk_bytes and fp32_weight_grad reach fused_linear_kl: with bf16 heads, 1-row chunks
    and the weight gradient accumulated in bf16, tpa_loss equals fused_linear_kl called on the
    candidate rows with the same options, bit for bit."""
    g = torch.Generator().manual_seed(5)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11], [5, 6, 7, 8, 9, 0, 0]])
    steps = torch.tensor([[1, 3, 5], [2, 4, -1]])
    eb = build_expanded_batch(ids, (ids > 0).long(), steps, torch.randint(12, 100, (2, 3, 2), generator=g))
    t_len = eb.total_length
    s_h = torch.randn(2, t_len, 12, generator=g).bfloat16()
    t_h = torch.randn(2, t_len, 20, generator=g).bfloat16()
    s_w = (torch.randn(131, 12, generator=g) * 0.3).bfloat16()
    t_w = (torch.randn(140, 20, generator=g) * 0.3).bfloat16()
    opts = dict(chunk_bytes=1, fp32_weight_grad=False, temperature=2.0)
    a_h, a_w = s_h.clone().requires_grad_(), s_w.clone().requires_grad_()
    tpa_loss(a_h, a_w, t_h, t_w, eb, **opts).backward()
    b_h, b_w = s_h.clone().requires_grad_(), s_w.clone().requires_grad_()
    align_ti.fused_linear_kl(b_h.reshape(-1, 12), b_w, t_h.reshape(-1, 20), t_w, rows=eb.candidate_rows,
                             weights=eb.candidate_valid.float(), **opts).backward()
    assert a_w.grad.dtype == torch.bfloat16
    assert torch.equal(a_w.grad, b_w.grad) and torch.equal(a_h.grad, b_h.grad)


def test_tpa_end_to_end_gradient_reaches_student_only(processor):
    """One expanded forward per model; the TPA loss trains the student, never the teacher; the
    ground-truth rows of the same forward feed a KD/SFT loss."""
    student = build_tiny_llava("student").train()
    teacher = build_tiny_llava("teacher").eval()
    batch, labels = _llava_batch(processor, 2)
    forbidden, vlim = forbidden_token_ids(student, processor.tokenizer)
    ids, am, pv = batch["input_ids"], batch["attention_mask"], batch["pixel_values"]
    steps = select_branch_steps(labels, am, fraction=0.5, seed=0, sample_ids=torch.tensor([0, 1]))
    with torch.no_grad():
        h0 = student.model(input_ids=ids, attention_mask=am, pixel_values=pv).last_hidden_state
    ws, wt = student.get_output_embeddings().weight, teacher.get_output_embeddings().weight
    cands = sample_candidates(h0, ws, ids, steps, num_candidates=2, forbidden_ids=forbidden, vocab_limit=vlim)
    eb = build_expanded_batch(ids, am, steps, cands, labels=labels, pad_id=PAD_TOKEN_ID,
                              vocab_size=vlim, forbidden_ids=forbidden)
    hs = expanded_hidden_states(student, eb, pixel_values=pv)
    with torch.no_grad():
        ht = expanded_hidden_states(teacher, eb, pixel_values=pv)
    loss = tpa_loss(hs, ws, ht, wt, eb)
    # KD on the ground-truth rows of the same forwards
    from align_ti.ops.fused_kl import fused_linear_kl

    kd_rows = eb.expand_rows(eb.ground_truth(eb.targets) != -100)
    kd = fused_linear_kl(hs.reshape(-1, hs.shape[-1]), ws, ht.reshape(-1, ht.shape[-1]), wt, rows=kd_rows)
    (loss + kd).backward()
    assert torch.isfinite(loss) and loss > 0
    assert torch.isfinite(ws.grad).all() and ws.grad.abs().sum() > 0
    assert student.model.language_model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------

def _small():
    ids = torch.tensor([[5, 6, 7, 8, 0]])
    am = torch.tensor([[1, 1, 1, 1, 0]])
    labels = torch.tensor([[-100, -100, 7, 8, -100]])
    return ids, am, labels


@pytest.mark.parametrize("steps, cands, kw, match", [
    ([[2]], [[[300]]], {"vocab_size": 200}, "candidates.*vocab_size"),
    ([[2]], [[[-4]]], {"vocab_size": 200}, "candidates.*vocab_size"),
    ([[2]], [[[3]]], {"forbidden_ids": (3, 0)}, "forbidden_ids"),
    ([[1]], [[[9]]], {}, "response"),
    ([[4]], [[[9]]], {}, "attention_mask|response"),
    ([[5]], [[[9]]], {}, "steps"),
    ([[0]], [[[9]]], {}, "steps"),
    ([[-3]], [[[9]]], {}, "steps"),
])
def test_builder_bad_values(steps, cands, kw, match):
    ids, am, labels = _small()
    with pytest.raises(ValueError, match=match):
        build_expanded_batch(ids, am, torch.tensor(steps), torch.tensor(cands), labels=labels, **kw)


def test_builder_bad_shapes():
    ids, am, labels = _small()
    st, c = torch.tensor([[2]]), torch.tensor([[[9]]])
    with pytest.raises(ValueError, match="attention_mask"):
        build_expanded_batch(ids, am[:, :4], st, c)
    with pytest.raises(ValueError, match="attention_mask"):
        build_expanded_batch(ids, am[0], st, c)
    with pytest.raises(ValueError, match="labels"):
        build_expanded_batch(ids, am, st, c, labels=labels[:, :3])
    with pytest.raises(ValueError, match="candidates"):
        build_expanded_batch(ids, am, st, torch.tensor([[[9], [9]]]))
    with pytest.raises(ValueError, match="d = 0"):
        build_expanded_batch(ids, am, st, torch.zeros(1, 1, 0, dtype=torch.long))
    with pytest.raises(TypeError, match="input_ids"):
        build_expanded_batch(ids.float(), am, st, c)
    with pytest.raises(ValueError, match="max_expanded_len"):
        build_expanded_batch(ids, am, st, c, max_expanded_len=0)
    eb = build_expanded_batch(ids, am, st, c)
    with pytest.raises(ValueError, match="attn_implementation"):
        eb.attention_mask_for("flash_attention_2")
    with pytest.raises(ValueError, match="mask"):
        eb.expand_rows(torch.zeros(1, 6, dtype=torch.bool))
    for bad in ([[5]], [[-1]]):  # L = 5: row 5 would be a candidate's
        with pytest.raises(ValueError, match="positions"):
            eb.expand_positions(torch.tensor(bad))
    with pytest.raises(ValueError, match="vocab_size"):
        build_expanded_batch(ids, am, st, c, vocab_size=99.5)
    with pytest.raises(TypeError, match="pad_id"):
        build_expanded_batch(ids, am, st, c, pad_id=1.5)
    with pytest.raises(TypeError, match="forbidden_ids"):
        build_expanded_batch(ids, am, st, c, forbidden_ids=["a"])
    with pytest.raises(ValueError, match="student_hidden"):
        tpa_loss(torch.randn(1, 5, 4), torch.randn(10, 4), torch.randn(1, 6, 4), torch.randn(10, 4), eb)
    with pytest.raises(TypeError, match="batch"):
        tpa_loss(torch.randn(1, 6, 4), torch.randn(10, 4), torch.randn(1, 6, 4), torch.randn(10, 4), {"x": 1})


def test_sampling_bad_input():
    hidden, weight, ids, am, labels = _head_setup()
    steps = select_branch_steps(labels, am)
    with pytest.raises(ValueError, match="num_candidates"):
        sample_candidates(hidden, weight, ids, steps, num_candidates=0)
    with pytest.raises(ValueError, match="strategy"):
        sample_candidates(hidden, weight, ids, steps, strategy="beam")
    with pytest.raises(ValueError, match="temperature"):
        sample_candidates(hidden, weight, ids, steps, temperature=0.0)
    with pytest.raises(ValueError, match="vocab_limit"):
        sample_candidates(hidden, weight, ids, steps, vocab_limit=10_000)
    with pytest.raises(ValueError, match="num_candidates"):
        sample_candidates(hidden, weight, ids, steps, num_candidates=5, vocab_limit=6, forbidden_ids=[0])
    with pytest.raises(ValueError, match="steps"):
        sample_candidates(hidden, weight, ids, torch.tensor([[12], [1], [1]]))
    with pytest.raises(ValueError, match="input_ids"):
        sample_candidates(hidden, weight, ids[:, :5], steps)
    with pytest.raises(ValueError, match="student_weight"):
        sample_candidates(hidden, weight[:, :5], ids, steps)
    with pytest.raises(TypeError, match="student_hidden and student_weight"):
        sample_candidates(hidden.double(), weight, ids, steps)
    with pytest.raises(ValueError, match="sample_ids"):
        sample_candidates(hidden, weight, ids, steps, sample_ids=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="epoch"):
        sample_candidates(hidden, weight, ids, steps, epoch=1.5)
    with pytest.raises(ValueError, match="student_weight"):
        sample_candidates(hidden, weight.to("meta"), ids, steps)
    with pytest.raises(TypeError, match="student_bias"):
        sample_candidates(hidden, weight, ids, steps, student_bias=torch.zeros(weight.shape[0], dtype=torch.long))
    with pytest.raises(TypeError, match="exclude_ground_truth"):
        sample_candidates(hidden, weight, ids, steps, exclude_ground_truth="no")
    with pytest.raises(TypeError, match="forbidden_ids"):
        sample_candidates(hidden, weight, ids, steps, forbidden_ids="ab")
    for bad in (0, -5, "1X"):
        with pytest.raises(ValueError, match="chunk_bytes"):
            sample_candidates(hidden, weight, ids, steps, chunk_bytes=bad)
    with pytest.raises(ValueError, match="attention_mask"):
        sample_candidates(hidden, weight, ids, steps, attention_mask=am[:, :4])
    for poison in (float("nan"), float("inf")):
        h = hidden.clone()
        h[:] = poison
        with pytest.raises(ValueError, match="NaN or inf"):
            sample_candidates(h, weight, ids, steps)
    with pytest.raises(ValueError, match="epoch"):
        select_branch_steps(labels, am, epoch="x")  # checked also when every step is branched
    with pytest.raises(ValueError, match="fraction"):
        select_branch_steps(labels, am, fraction=0.0)
    with pytest.raises(ValueError, match="max_per_sample"):
        select_branch_steps(labels, am, max_per_sample=0)
    with pytest.raises(ValueError, match="attention_mask"):
        select_branch_steps(labels, am[:, :3])


@pytest.mark.parametrize("strategy", ["sample", "topk"])
def test_minus_inf_bias_masks_tokens(strategy):
    """A -inf in the student's bias masks its token (issue #17): it is never drawn and makes no
    NaN; fewer unmasked tokens than d is an error naming num_candidates."""
    hidden, weight, ids, am, labels = _head_setup()
    steps = select_branch_steps(labels, am)
    valid = steps >= 0
    bias = torch.full((weight.shape[0],), float("-inf"))
    allowed = torch.tensor([2, 5, 7, 11, 13, 250])
    bias[allowed] = 0.0
    cands = sample_candidates(hidden, weight, ids, steps, num_candidates=5, strategy=strategy,
                              student_bias=bias, exclude_ground_truth=False, seed=3)
    assert torch.isin(cands[valid], allowed).all()
    assert all(len(set(row)) == 5 for row in cands[valid].tolist())
    with pytest.raises(ValueError, match="num_candidates"):
        sample_candidates(hidden, weight, ids, steps, num_candidates=7, strategy=strategy,
                          student_bias=bias, exclude_ground_truth=False)
