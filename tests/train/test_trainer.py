"""The distillation trainer on the tiny models: every loss combination trains end to end, the
wrapper's terms equal plain-PyTorch definitions, gradient accumulation is normalised by the
global token count, the teacher stays frozen, non-finite losses stop the run naming the term,
and the data/tokenizer checks give clear errors."""
import copy
import json

import pytest
import torch

from align_ti.constants import IGNORE_INDEX
from align_ti.data.synthetic import synthetic_vqa, write_llava_dataset
from align_ti.models.tiny import build_processor, build_tiny_llava
from align_ti.ops.branches import select_branch_steps
from align_ti.train.build import build_trainer, resolve_iva_layer
from align_ti.train.config import load_config
from align_ti.train.data import (
    DistillCollator,
    TokenizerMismatchError,
    check_image_expansion,
    check_tokenizers,
    language_model_attention,
)
from align_ti.train.loss import DistillModule, LossSpec, NonFiniteLossError, count_normalizers
from align_ti.train.trainer import CheckpointError, DistillTrainer
from tests.utils import PATCH, QUIET, run_config, tiny_pair


def _config(tmp_path, **kw):
    return run_config(tmp_path / "run", **kw)


def _trainer(tiny, tmp_path, **kw):
    """A trainer of a copy of the tiny student (the module's own stays untrained)."""
    return build_trainer(_config(tmp_path, **kw), student=copy.deepcopy(tiny.student), teacher=tiny.teacher,
                         processor=tiny.processor, teacher_processor=tiny.processor, train_dataset=tiny.dataset,
                         items=tiny.items)


def _module(tiny, spec, **kw):
    """The loss wrapper over the tiny pair (the teacher's image and pad ids given by default)."""
    kw = {"image_token_id": tiny.student.config.image_token_index, "pad_token_id": 0, **kw}
    return DistillModule(tiny.student, tiny.teacher, spec, **kw)


COMBOS = {
    "sft": dict(w_kd=0, w_iva=0, w_tpa=0),
    "kd": dict(w_sft=0, w_iva=0, w_tpa=0),
    "sft+kd": dict(w_iva=0, w_tpa=0),
    "iva": dict(w_sft=0, w_kd=0, w_tpa=0),
    "tpa": dict(w_sft=0, w_kd=0, w_iva=0),
    "all": dict(),
}


@pytest.mark.parametrize("combo", list(COMBOS))
def test_every_loss_combination_trains(tiny, tmp_path, combo):
    trainer = _trainer(tiny, tmp_path, **COMBOS[combo])
    before = {k: v.clone() for k, v in trainer.model.student.state_dict().items()}
    teacher_before = {k: v.clone() for k, v in tiny.teacher.state_dict().items()}
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2
    spec = trainer.model.spec
    expected = {f"loss_{t}" for t in ("sft", "kd", "iva", "tpa") if spec.weight(t) > 0}
    for rec in logs:
        assert expected <= set(rec), rec
        assert not ({"loss_sft", "loss_kd", "loss_iva", "loss_tpa"} - expected) & set(rec)
        total = sum(spec.weight(k[5:]) * rec[k] for k in expected)
        assert rec["loss"] == pytest.approx(total, rel=1e-4, abs=1e-5)
        assert all(torch.isfinite(torch.tensor(rec[k])) for k in expected)
    after = trainer.model.student.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), "the student did not change"
    # the teacher is frozen, in eval mode and untouched (and not used at all for SFT)
    teacher = trainer.model.teacher
    if not spec.needs_teacher:
        assert teacher is None
        return
    assert teacher is tiny.teacher
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(teacher_before[k], v) for k, v in teacher.state_dict().items())
    assert "teacher" not in dict(trainer.model.named_children())


def _batch(tiny, n=6):
    return DistillCollator(0)([tiny.dataset[i] for i in range(n)])


def _reference_terms(student, teacher, teacher_eager, batch, layer):
    """SFT, KD and IVA from full [B, L, V] logits and eager attention probabilities."""
    kw = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
              pixel_values=batch["pixel_values"])
    zs = student(**kw).logits.double()
    with torch.no_grad():
        zt = teacher(**kw).logits.double()
        att = teacher_eager(**kw, output_attentions=True).attentions[layer].double()  # [B, H, L, L]
    v = min(zs.shape[-1], zt.shape[-1])
    labels = batch["labels"]
    rows = labels[:, 1:] != IGNORE_INDEX
    ce = torch.nn.functional.cross_entropy(zs[:, :-1][rows], labels[:, 1:][rows])
    lps, lpt = zs[..., :v].log_softmax(-1), zt[..., :v].log_softmax(-1)
    kl_tok = (lpt.exp() * (lpt - lps)).sum(-1)  # [B, L] forward KL
    kd = kl_tok[:, :-1][rows].mean()
    # IVA (all vision tokens, weights = normalised instruction->vision attention mass)
    q = batch["instruction_mask"].bool() & batch["attention_mask"].bool()
    mass = (att.mean(1) * q[:, :, None]).sum(1) / q.sum(1, keepdim=True)  # [B, L]
    vis = batch["input_ids"] == student.config.image_token_index
    w = mass * vis
    w = w / w.sum(1, keepdim=True)
    iva = (w * kl_tok).sum(1).mean()
    return ce, kd, iva


def test_terms_match_plain_pytorch(tiny):
    teacher, student = tiny.teacher, copy.deepcopy(tiny.student)
    layer = 2
    teacher_eager = build_tiny_llava("teacher", seed=1, patch_size=PATCH, attn_implementation="eager")
    teacher_eager.load_state_dict(teacher.state_dict())
    batch = _batch(tiny)
    spec = LossSpec(w_sft=1.0, w_kd=1.0, w_iva=1.0, w_tpa=0.0, iva_layer=layer)
    module = DistillModule(student, teacher, spec, image_token_id=student.config.image_token_index,
                           pad_token_id=0)
    out = module(**batch)
    ce, kd, iva = _reference_terms(student, teacher, teacher_eager, batch, layer)
    torch.testing.assert_close(out["terms"]["sft"].double(), ce, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["terms"]["kd"].double(), kd, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["terms"]["iva"].double(), iva, rtol=1e-4, atol=1e-5)
    # gradient of the total equals the reference gradient (student LM head)
    out["loss"].backward()
    g = student.lm_head.weight.grad.clone()
    student.zero_grad()
    ce, kd, iva = _reference_terms(student, teacher, teacher_eager, batch, layer)
    (ce + kd + iva).backward()
    torch.testing.assert_close(g.double(), student.lm_head.weight.grad.double(), rtol=1e-3, atol=1e-6)


def test_tpa_expanded_forward_serves_the_other_terms(tiny):
    """With TPA on, SFT/KD/IVA come from the ground-truth rows of the expanded forwards and
    equal the values of the plain forwards."""
    batch = _batch(tiny)
    common = dict(w_sft=1.0, w_kd=1.0, w_iva=1.0, iva_layer=1, tpa_fraction=1.0)
    kw = dict(forbidden_ids=(0, 3), vocab_limit=1200)
    plain = _module(tiny, LossSpec(w_tpa=0.0, **common), **kw)(**batch)
    with_tpa = _module(tiny, LossSpec(w_tpa=1.0, **common), **kw)(**batch)
    for name in ("sft", "kd", "iva"):
        torch.testing.assert_close(with_tpa["terms"][name], plain["terms"][name], rtol=1e-4, atol=1e-5)
    assert with_tpa["terms"]["tpa"] > 0 and torch.isfinite(with_tpa["terms"]["tpa"])


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_tpa_ways_give_the_same_terms_and_gradients(tiny, attn):
    """tpa_forward='prefix_cache' (candidates drawn from the training forward, then run over its
    cached keys/values) and 'expanded' (a no-grad sampling pass, then one forward over ground
    truth + candidates) give the same four terms and the same student gradients."""
    batch = _batch(tiny)
    results = {}
    for way in ("expanded", "prefix_cache"):
        student, teacher = copy.deepcopy(tiny.student), copy.deepcopy(tiny.teacher)
        for model in (student, teacher):
            model.config.get_text_config()._attn_implementation = attn
        spec = LossSpec(w_sft=1.0, w_kd=1.0, w_iva=1.0, w_tpa=1.0, iva_layer=1, tpa_fraction=0.5, tpa_forward=way)
        module = _module(tiny, spec, forbidden_ids=(0, 3), vocab_limit=1200)
        module.student, module.teacher = student, teacher
        assert module.tpa_way() == way
        out = module(**batch)
        out["loss"].backward()
        results[way] = out["terms"], {n: p.grad for n, p in student.named_parameters() if p.grad is not None}
    (terms_e, grads_e), (terms_p, grads_p) = results["expanded"], results["prefix_cache"]
    assert terms_p.keys() == terms_e.keys() == {"sft", "kd", "iva", "tpa"}
    for name in terms_e:
        torch.testing.assert_close(terms_p[name], terms_e[name], rtol=1e-5, atol=1e-7)
    assert grads_p.keys() == grads_e.keys()
    for name, g in grads_e.items():
        scale = g.abs().max().item()
        if scale > 1e-4:
            torch.testing.assert_close(grads_p[name], g, rtol=0, atol=1e-5 * scale)


@pytest.mark.parametrize("weights", [dict(), dict(w_sft=0.0), dict(w_kd=0.0, w_iva=0.5), dict(w_tpa=0.0, w_sft=2.0)],
                         ids=["all", "no-sft", "no-kd", "no-tpa"])
@pytest.mark.parametrize("divisors", [False, True])
def test_one_kl_pass_gives_the_per_term_terms_and_gradient(tiny, weights, divisors):
    """kl_pass='single' (SFT, KD, IVA and TPA rows in one fused_linear_distill call, each row
    weighted by its term's weight and normaliser) gives every term's value and the gradient of
    kl_pass='per_term' (one call per term), with the micro-batch's own counts or the step's
    divisors (top-k IVA, JSD)."""
    batch = _batch(tiny)
    base = {**dict(w_sft=1.0, w_kd=1.0, w_iva=1.0, w_tpa=1.0, iva_layer=1, iva_k=5, tpa_fraction=0.5,
                   divergence="jsd", beta=0.3), **weights}
    divisors = torch.tensor([40.0, 3.0, 20.0], dtype=torch.float64) if divisors else None
    results = {}
    for kl_pass in ("per_term", "single"):
        student = copy.deepcopy(tiny.student)
        module = _module(tiny, LossSpec(kl_pass=kl_pass, **base), forbidden_ids=(0, 3), vocab_limit=1200)
        module.student = student
        out = module(**batch, loss_divisors=divisors)
        out["loss"].backward()
        results[kl_pass] = out, {n: p.grad for n, p in student.named_parameters() if p.grad is not None}
    (per_term, g_ref), (single, g) = results["per_term"], results["single"]
    assert single["terms"].keys() == per_term["terms"].keys()
    for name, value in per_term["terms"].items():
        torch.testing.assert_close(single["terms"][name], value, rtol=1e-5, atol=1e-7, msg=name)
    torch.testing.assert_close(single["loss"], per_term["loss"], rtol=1e-5, atol=1e-7)
    assert g.keys() == g_ref.keys()
    for name, ref in g_ref.items():
        scale = ref.abs().max().item()
        if scale > 1e-5:
            torch.testing.assert_close(g[name], ref, rtol=0, atol=2e-5 * scale, msg=name)


def test_tpa_forward_auto_falls_back_where_the_cache_cannot_serve(tiny):
    """Under gradient checkpointing (transformers keeps no cache in a checkpointed training
    forward) 'auto' runs the expanded forward, and an explicit 'prefix_cache' says why it can't."""
    student = copy.deepcopy(tiny.student).train()
    module = _module(tiny, LossSpec(w_tpa=1.0, tpa_fraction=0.5), forbidden_ids=(0, 3), vocab_limit=1200)
    module.student = student
    assert module.tpa_way() == "prefix_cache"
    module.gradient_checkpointing_enable()
    assert module.tpa_way() == "expanded"
    out = module(**_batch(tiny))
    assert torch.isfinite(out["terms"]["tpa"]) and out["terms"]["tpa"] > 0
    module.spec.tpa_forward = "prefix_cache"
    with pytest.raises(ValueError, match="tpa_forward='prefix_cache' cannot run here: gradient checkpointing"):
        module(**_batch(tiny))


def test_checkpointing_reaches_the_student_without_deprecation_warnings(tiny):
    """Both names the Trainer may call (activation_checkpointing_enable in the newest
    transformers, gradient_checkpointing_enable in 5.17) turn the student's checkpointing on,
    with its kwargs, and neither calls the name transformers deprecated."""
    import warnings

    for name in ("activation_checkpointing_enable", "gradient_checkpointing_enable"):
        module = _module(tiny, LossSpec(w_tpa=1.0, tpa_fraction=0.5), forbidden_ids=(0, 3), vocab_limit=1200)
        module.student = copy.deepcopy(tiny.student).train()
        if not hasattr(module.student, "activation_checkpointing_enable") and name.startswith("activation"):
            continue  # transformers 5.17: the Trainer calls gradient_checkpointing_enable
        kwargs = ({"gradient_checkpointing_kwargs": {"use_reentrant": False}} if name.startswith("gradient")
                  else {"activation_checkpointing_kwargs": {"use_reentrant": False}})
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            getattr(module, name)(**kwargs)
        on = getattr(module.student, "is_activation_checkpointing", None)
        assert on if on is not None else module.student.is_gradient_checkpointing, name
        assert module.tpa_way() == "expanded", name


def test_kernel_options_reach_every_fused_op(tiny, monkeypatch):
    """kl_chunk_bytes / fp32_weight_grad of the config reach the SFT+KD, IVA and TPA ops (the one
    call of kl_pass=single, the three of per_term; and TPA's candidate sampling gets the chunk
    budget, the ground-truth rule and the padding).
    The spies replace the names align_ti.train.loss calls (monkeypatch refuses a name that
    module no longer has, so the test cannot silently spy on nothing)."""
    import align_ti.train.loss as loss

    seen = {}
    for name in ("fused_linear_distill", "topk_align", "tpa_loss", "sample_candidates"):
        def spy(*args, _op=getattr(loss, name), _name=name, **kw):
            seen[_name] = (kw.get("chunk_bytes"), kw.get("fp32_weight_grad"))
            if _name == "sample_candidates":
                seen["sampling"] = (kw["exclude_ground_truth"], kw["attention_mask"] is not None)
            return _op(*args, **kw)
        monkeypatch.setattr(loss, name, spy)
    for kl_pass, ops in (("per_term", ("fused_linear_distill", "topk_align", "tpa_loss")),
                         ("single", ("fused_linear_distill",))):  # one call for every term
        seen.clear()
        cfg = load_config(overrides=["kl_chunk_bytes=1M", "fp32_weight_grad=false", "iva_layer=1",
                                     "tpa_exclude_ground_truth=false", f"kl_pass={kl_pass}"])
        _module(tiny, LossSpec.from_config(cfg, iva_layer=1))(**_batch(tiny))
        assert seen == {**{n: (1 << 20, False) for n in ops},
                        "sample_candidates": (1 << 20, None),  # sampling has no weight gradient
                        "sampling": (False, True)}, kl_pass


def test_attn_implementation_reaches_both_models(tmp_path):
    trainer = build_trainer(_config(tmp_path, attn_implementation="eager", w_iva=0, w_tpa=0,
                                    synthetic_images=2))
    for model in (trainer.model.student, trainer.model.teacher):
        assert model.get_decoder().config._attn_implementation == "eager"
        assert model.config.vision_config._attn_implementation == "sdpa"  # unmasked: kept


@pytest.mark.e2e  # ~20 s on 2 cores: transformers compiles its causal BlockMask on first use
def test_flex_attention_language_models_give_the_sdpa_terms(tiny):
    """The trainer's step on FlexAttention language models (the BlockMask of TPA's expanded
    batch, IVA's q/k captured from flex) gives the SDPA terms; forward only: FlexAttention has
    no backward on CPU, the GPU run times it (train_step's 'align-ti flex')."""
    teacher, student = tiny.teacher, tiny.student
    t_flex, s_flex, _ = tiny_pair(attn_implementation=language_model_attention("flex_attention"))
    t_flex.load_state_dict(teacher.state_dict())
    s_flex.load_state_dict(student.state_dict())
    spec = LossSpec(w_sft=1.0, w_kd=1.0, w_iva=1.0, w_tpa=1.0, iva_layer=1, tpa_fraction=0.5)
    kw = dict(image_token_id=student.config.image_token_index, pad_token_id=0,
              forbidden_ids=(0, student.config.image_token_index), vocab_limit=1200)
    batch = _batch(tiny, n=4)
    with torch.no_grad():
        want = DistillModule(student, teacher, spec, **kw)(**batch)["terms"]
        got = DistillModule(s_flex, t_flex, spec, **kw)(**batch)["terms"]
    assert s_flex.get_decoder().config._attn_implementation == "flex_attention"
    assert set(got) == {"sft", "kd", "iva", "tpa"}
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only refusal")
def test_flex_attention_is_refused_without_cuda(tmp_path):
    with pytest.raises(ValueError, match="attn_implementation='flex_attention' needs a CUDA device"):
        build_trainer(_config(tmp_path, attn_implementation="flex_attention"))


@pytest.mark.parametrize("fraction", [0.5, 0.28, 0.14, 0.07])
def test_normalizers_count_response_rows_images_and_candidates(fraction):
    """The TPA count is the number of steps select_branch_steps branches, also for fractions
    whose product with the row count lands just above an integer in floats (0.28 * 25)."""
    labels = torch.full((2, 110), IGNORE_INDEX)
    labels[0, 2:27] = 7    # 25 eligible rows: 0.28 * 25 = 7.000000000000001
    labels[1, 5:105] = 9   # 100: 0.07 * 100 = 7.000000000000001
    batch = dict(labels=labels, attention_mask=torch.ones_like(labels), input_ids=torch.full_like(labels, 3))
    spec = LossSpec(w_tpa=1.0, tpa_d=4, tpa_fraction=fraction)
    counts = count_normalizers(batch, spec, image_token_id=3)
    assert counts[0] == (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
    assert counts[1] == batch["labels"].shape[0]
    steps = select_branch_steps(batch["labels"], batch["attention_mask"], fraction=fraction)
    assert counts[2] == (steps >= 0).sum() * 4


def test_gradient_accumulation_matches_one_big_batch(tiny, tmp_path):
    """4 x 1 and 1 x 4 (accumulated) give the same update: losses are normalised by the
    response rows of the whole optimizer step, not averaged per micro-batch."""
    results = []
    for bs, ga in ((4, 1), (1, 4)):
        trainer = _trainer(tiny, tmp_path / f"{bs}x{ga}", w_iva=0, w_tpa=1, max_steps=1,
                           per_device_train_batch_size=bs, gradient_accumulation_steps=ga,
                           training_args=json.dumps(dict(QUIET, optim="sgd")))  # Adam hides scale
        trainer.train()
        results.append((trainer.state.log_history[0], trainer.model.student.state_dict()))
    (log0, w0) = results[0]
    for log, w in results[1:]:
        for key in ("loss", "loss_sft", "loss_kd", "loss_tpa"):
            assert log[key] == pytest.approx(log0[key], rel=1e-4), key
        for k in w0:
            torch.testing.assert_close(w[k], w0[k], rtol=1e-4, atol=1e-6, msg=lambda m: f"{k}: {m}")


def _with_teacher(tiny, teacher, tmp_path, **kw):
    """A trainer of a copy of the tiny student with another teacher."""
    return build_trainer(_config(tmp_path, **kw), student=copy.deepcopy(tiny.student), teacher=teacher,
                         processor=tiny.processor, teacher_processor=tiny.processor, train_dataset=tiny.dataset)


def test_nan_loss_stops_naming_the_term(tiny, tmp_path):
    bad_teacher = copy.deepcopy(tiny.teacher)
    with torch.no_grad():
        bad_teacher.lm_head.weight[5, 0] = float("nan")
    trainer = _with_teacher(tiny, bad_teacher, tmp_path, w_iva=0, w_tpa=0)
    with pytest.raises(NonFiniteLossError, match=r"step 0: term\(s\) \['kd'\]"):
        trainer.train()


def test_llava_json_data_through_the_config(tmp_path):
    path = write_llava_dataset(tmp_path / "data", n_images=2, seed=0)
    cfg = load_config(overrides=[f"data={path}", "max_steps=1", "per_device_train_batch_size=2",
                                 f"output_dir={tmp_path / 'run'}", "w_kd=0", "w_iva=0", "w_tpa=0",
                                 f"training_args={json.dumps(QUIET)}"])
    trainer = build_trainer(cfg)
    assert len(trainer.train_dataset) == 8
    trainer.train()
    assert "loss_sft" in trainer.state.log_history[0]


class _Tok:
    def __init__(self, vocab, pad="<pad>", eos="<eos>"):
        self.vocab, self.pad_token, self.eos_token = vocab, pad, eos

    def get_vocab(self):
        return dict(self.vocab)

    def __len__(self):
        return len(self.vocab)


def test_tokenizer_check():
    proc = build_processor()
    check_tokenizers(proc, build_processor())  # identical: fine
    vocab = proc.tokenizer.get_vocab()
    a, b = "Ġred", "Ġblue"
    swapped = dict(vocab, **{a: vocab[b], b: vocab[a]})
    with pytest.raises(TokenizerMismatchError, match=r"incompatible tokenizers.*2 of the .* shared token ids differ"):
        check_tokenizers(_Tok(swapped, proc.tokenizer.pad_token, proc.tokenizer.eos_token), proc.tokenizer)
    with pytest.raises(TokenizerMismatchError, match="eos_token"):
        check_tokenizers(_Tok(vocab, proc.tokenizer.pad_token, "</s>"), proc.tokenizer)


def test_image_expansion_check():
    with pytest.raises(ValueError, match="expand an image differently"):
        check_image_expansion(build_tiny_llava("teacher", patch_size=16), build_tiny_llava("student"))


def test_module_rejects_missing_pieces(tiny):
    with pytest.raises(ValueError, match="teacher is needed"):
        DistillModule(tiny.student, None, LossSpec(w_kd=1.0), image_token_id=3, pad_token_id=0)
    with pytest.raises(ValueError, match="iva_layer"):
        DistillModule(tiny.student, tiny.teacher, LossSpec(w_iva=1.0), image_token_id=3, pad_token_id=0)


def test_module_load_state_dict_honours_strict(tiny):
    """A plain student state dict or the wrapper's own keys; strict=True refuses a partial one
    (naming a missing key), strict=False loads what it holds and reports the rest."""
    module = DistillModule(copy.deepcopy(tiny.student), None, LossSpec(w_kd=0.0), image_token_id=3, pad_token_id=0)
    state = {k: torch.zeros_like(v) for k, v in tiny.student.state_dict().items()}
    name = "lm_head.weight"
    partial = {name: state[name]}
    with pytest.raises(RuntimeError, match="Missing key"):
        module.load_state_dict(partial)
    result = module.load_state_dict(partial, strict=False)
    assert f"student.{name}" not in result.missing_keys and len(result.missing_keys) == len(state) - 1
    assert torch.equal(module.student.lm_head.weight, state[name])
    module.load_state_dict({f"student.{k}": v for k, v in state.items()})  # the wrapper's own keys
    assert all(torch.equal(v, state[k]) for k, v in module.student.state_dict().items())


def test_irs_layer_cache_is_keyed_on_the_teacher(tiny, tmp_path, monkeypatch):
    """iva_layer=auto reuses irs.json only for the same teacher, tiny text model, data and
    seed, and only a layer the teacher has."""
    import align_ti.models.irs as irs

    teacher, processor = tiny.teacher, tiny.processor
    items = synthetic_vqa("train", 4, seed=0, questions_per_image=4)
    calls = []

    def fake_scores(model, proc, pairs):
        calls.append(len(pairs))
        return irs.IRSResult(scores=[0.1, 0.5], layer=1, num_pairs=len(pairs), cos_std=[0.0, 0.0])

    monkeypatch.setattr(irs, "irs_scores", fake_scores)
    cfg = _config(tmp_path, iva_layer="auto", irs_samples=4)
    assert resolve_iva_layer(cfg, teacher, processor, items, str(tmp_path)) == 1
    assert resolve_iva_layer(cfg, teacher, processor, items, str(tmp_path)) == 1
    assert len(calls) == 1  # the second call read the cache
    other = _config(tmp_path, iva_layer="auto", irs_samples=4, tiny_text_model="qwen3")
    resolve_iva_layer(other, teacher, processor, items, str(tmp_path))
    assert len(calls) == 2  # another tiny text model: recomputed
    record = json.loads((tmp_path / "irs.json").read_text())
    record["layer"] = 99  # not a layer of this teacher
    (tmp_path / "irs.json").write_text(json.dumps(record))
    assert resolve_iva_layer(other, teacher, processor, items, str(tmp_path)) == 1
    assert len(calls) == 3


# ---- divergence and save failures (issue #17; the e2e faults are in test_faults.py) ----------

def _layer_weight(model):
    return dict(model.named_parameters())["model.language_model.layers.0.mlp.down_proj.weight"]


def test_nan_gradient_stops_before_the_update(tiny, tmp_path):
    """A finite loss with a NaN gradient: the gradient-norm check stops the step before the
    optimizer applies it."""
    trainer = _trainer(tiny, tmp_path, w_iva=0, w_tpa=0)
    student = trainer.model.student
    weight = _layer_weight(student)
    weight.register_hook(lambda g: g * float("nan"))
    before = {k: v.clone() for k, v in student.state_dict().items()}
    with pytest.raises(NonFiniteLossError, match=r"diverged at step 0: the gradient norm is nan although the loss "
                                                 r"was finite; the update was not applied; its parameters are finite"):
        trainer.train()
    for k, v in student.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_non_finite_parameter_is_named_by_the_output_check(tiny, tmp_path):
    trainer = _trainer(tiny, tmp_path, w_iva=0, w_tpa=0)
    with torch.no_grad():
        _layer_weight(trainer.model.student)[0, 0] = float("inf")
    with pytest.raises(NonFiniteLossError, match=r"diverged at step 0: the student's final hidden states hold NaN or "
                                                 r"inf; 1 parameter tensor\(s\) hold NaN or \+inf, the first "
                                                 r"model\.language_model\.layers\.0\.mlp\.down_proj\.weight"):
        trainer.train()


def test_non_finite_teacher_output_blames_the_teacher(tiny, tmp_path):
    bad_teacher = copy.deepcopy(tiny.teacher)
    with torch.no_grad():
        _layer_weight(bad_teacher)[0, 0] = float("nan")
    trainer = _with_teacher(tiny, bad_teacher, tmp_path, w_iva=0, w_tpa=0)
    with pytest.raises(NonFiniteLossError, match=r"the teacher's final hidden states hold NaN or inf at step 0: the "
                                                 r"teacher \(tiny-teacher \(qwen2, seed 1\)\) or its precision"):
        trainer.train()


def test_a_save_never_writes_non_finite_parameters(tiny, tmp_path):
    """A parameter the forward never reads (the embedding row of an unused token) is caught
    when a save would write it."""
    trainer = _trainer(tiny, tmp_path, w_iva=0, w_tpa=0)
    embed = trainer.model.student.get_input_embeddings().weight
    with torch.no_grad():
        embed[-1, 0] = float("nan")
    out = tmp_path / "final"
    with pytest.raises(NonFiniteLossError, match=r"the student's parameter \S*embed_tokens.weight holds NaN or inf; "
                                                 r"it is not saved to"):
        trainer.save_model(str(out))
    assert not (out / "model.safetensors").exists()


def test_a_failed_save_says_why_and_keeps_the_previous_checkpoint(tiny, tmp_path, monkeypatch):
    """ENOSPC injected into the second save: one error naming the full disk, no staged folder
    left, checkpoint-1 intact (test_faults.py fills a real tmpfs)."""
    import errno
    import os

    from align_ti.train import checkpoint as ckpt

    trainer = _trainer(tiny, tmp_path, w_iva=0, w_tpa=0,
                       training_args=json.dumps({**QUIET, "save_strategy": "steps", "save_steps": 1}))
    original = DistillTrainer._save_optimizer_and_scheduler

    def full_disk(self, output_dir):
        if self.state.global_step == 2:
            raise OSError(errno.ENOSPC, "No space left on device", os.path.join(output_dir, "optimizer.pt"))
        return original(self, output_dir)

    monkeypatch.setattr(DistillTrainer, "_save_optimizer_and_scheduler", full_disk)
    run = tmp_path / "run"
    with pytest.raises(CheckpointError, match=rf"could not save checkpoint-2: no space left on {run}; its staged "
                                              rf"folder is removed and {run}/checkpoint-1 is untouched: free some space"):
        trainer.train()
    assert sorted(os.listdir(run)) == ["checkpoint-1"]
    assert ckpt.checkpoint_problem(str(run / "checkpoint-1")) is None
