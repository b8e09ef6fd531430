"""Every model family (`align_ti.models.families`) on tiny random-weight models of that family:

- IRS, capture_qk + attention_mass (IVA's weights) equal the model's eager output_attentions
  at every decoder layer (fp32), capturing under sdpa and under eager;
- TPA: the candidate rows equal separate forwards of prefix + candidate at y_t's position ids as
  the family computes them (Qwen-VL: 3-D ids from its rope-index function), and the ground-truth
  rows the plain forward, in both TPA ways (expanded forward, prefix cache), sdpa and eager;
- a trainer step (SFT, KD, IVA, TPA) and its student gradients against the plain-PyTorch
  composition (full logits, eager attentions, a forward per candidate), both TPA ways;
- the family's pieces: registry errors, torchvision, checkpoint folders, encodings, freezing;
- (e2e) `align-ti distill teacher=DIR student=DIR data=...` from the folders that
  `align-ti synth-models` writes, and `align-ti irs --model DIR`.

The batch mixes an image, an image of another size (other grids and tile counts) and a text-only
sample, right padded. Models are built once per family (module fixture).
"""
import copy
import tempfile

import pytest
import torch
from transformers import AutoProcessor

from align_ti.constants import IGNORE_INDEX
from align_ti.data.llava import encode_example, pad_batch
from align_ti.data.synthetic import synthetic_vqa
from align_ti.models.capture import capture_qk
from align_ti.models.families import family_names, family_of, get_family, set_trainable
from align_ti.models.tiny import build_tiny, build_tiny_processor
from align_ti.ops.attention_mass import attention_mass
from align_ti.ops.branches import (
    build_expanded_batch,
    candidate_hidden_states,
    expanded_hidden_states,
    forbidden_token_ids,
    ground_truth_pass,
)
from tests.utils import sharpen_attention

FAMILIES = family_names()
ANSWER = "two red circles and one blue square"  # several response tokens to branch


@pytest.fixture(scope="module", params=FAMILIES)
def fam(request):
    """(family, teacher, student, processor, examples, batch) of one family; read-only."""
    family = get_family(request.param)
    try:
        family.model_class()
    except ImportError:
        import transformers

        pytest.skip(f"transformers {transformers.__version__} has no {family.title}")
    if family.needs_torchvision:
        pytest.importorskip("torchvision", reason=f"the {family.title} processor needs torchvision: "
                                                  "pip install 'align-ti[vlm]'")
    teacher = build_tiny(family.name, "teacher", seed=1).eval()
    student = build_tiny(family.name, "student", seed=0)
    for model in (teacher, student):
        sharpen_attention(family.decoder_layers(model), 3.0)  # random init attends almost uniformly
    processor = build_tiny_processor(student.config)
    scene = synthetic_vqa("train", 2, seed=5)
    other = scene[1]["image"].resize((64, 40))  # another aspect ratio: other grids / tiles
    items = [dict(scene[0], answer=ANSWER), dict(scene[1], image=other, answer="yes"),
             dict(scene[0], image=None, question="Say the colours.", answer="red and blue")]
    examples = [encode_example(processor, it, return_instruction_mask=True) for it in items]
    return family, teacher, student, processor, examples, pad_batch(examples, processor.tokenizer.pad_token_id)


def _images(family, batch, model):
    return family.model_images(batch, next(model.parameters()).dtype)


def _with_attention(model, impl):
    """A copy of ``model`` whose language model runs ``impl`` (the vision tower keeps its own)."""
    model = copy.deepcopy(model)
    model.config.get_text_config()._attn_implementation = impl
    return model


def _hidden(model, batch, family, positions, **extra):
    return model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=positions,
                       use_cache=False, **_images(family, batch, model), **extra)


# ---- IRS / attention mass --------------------------------------------------------------------------

def _eager_masses(model, batch, family):
    """[n_layers, B, L]: instruction->token attention mass from eager output_attentions."""
    eager = _with_attention(model, "eager")
    positions = family.position_ids(eager, batch["input_ids"], batch["attention_mask"], _images(family, batch, eager))
    with torch.no_grad():
        out = eager(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=positions,
                    output_attentions=True, **_images(family, batch, eager))
    sel = (batch["instruction_mask"] & batch["attention_mask"].bool()).double()
    assert len(out.attentions) == len(family.decoder_layers(model))  # the language model's, not the tower's
    return torch.stack([((a.double() * sel[:, None, :, None]).sum(2) / sel.sum(1)[:, None, None]).mean(1)
                        for a in out.attentions])


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_capture_and_attention_mass_equal_eager_attentions(fam, impl):
    family, teacher, _, _, _, batch = fam
    model = _with_attention(teacher, impl)
    want = _eager_masses(teacher, batch, family)
    positions = family.position_ids(model, batch["input_ids"], batch["attention_mask"], _images(family, batch, model))
    with torch.no_grad(), capture_qk(model, layers=None) as cap:
        _hidden(model, batch, family, positions)
    real = batch["attention_mask"].bool()
    got = torch.stack([attention_mass(*cap[l], batch["instruction_mask"], real) for l in cap.layers])
    assert len(cap.layers) == want.shape[0]
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)
    vision = family.vision_mask(model.config, batch["input_ids"])
    assert bool(vision[:2].any(1).all()) and not bool(vision[2].any())
    assert float((want[:, :2] * vision[:2]).sum()) > 0.05  # the instructions do look at the image


def test_irs_equals_the_eager_reference(fam):
    from align_ti.models.irs import irs_scores, pair_cosines, select_vision_mass

    family, teacher, _, processor, _, _ = fam
    scene = synthetic_vqa("train", 2, seed=9)
    pairs = [(dict(scene[0], question="What colour is the circle?"), dict(scene[0], question="Where is the square?")),
             (dict(scene[1], image=scene[1]["image"].resize((40, 64))),
              dict(scene[1], image=scene[1]["image"].resize((40, 64)), question="How many shapes are there?"))]
    cosines = []
    for pair in pairs:
        encs = [encode_example(processor, dict(it, answer=""), return_instruction_mask=True) for it in pair]
        batch = pad_batch(encs, processor.tokenizer.pad_token_id)
        masses = _eager_masses(teacher, batch, family)
        alpha = select_vision_mass(masses, family.vision_mask(teacher.config, batch["input_ids"]))
        cosines.append(pair_cosines(alpha[:, 0], alpha[:, 1]))
    want = 1 - torch.stack(cosines, 1).mean(1)
    got = irs_scores(teacher, processor, pairs, batch_size=2)  # both pairs in one batch: two image sizes
    torch.testing.assert_close(torch.tensor(got.scores, dtype=torch.float64), want, rtol=1e-3, atol=2e-5)
    assert got.num_pairs == 2 and max(got.scores) > 1e-4


# ---- TPA -------------------------------------------------------------------------------------------

def _branches(batch, d=2):
    """d candidates at two response steps of the first sample and one of the text-only third (the
    second's answer is too short to branch: an empty slot)."""
    labels = batch["labels"]
    steps = []
    for b, n in enumerate((2, 0, 1)):
        pos = torch.nonzero(labels[b] != IGNORE_INDEX).flatten().tolist()
        steps.append(([pos[1], pos[-2]][:n] + [-1, -1])[:2])
    cands = torch.randint(300, 500, (3, 2, d), generator=torch.Generator().manual_seed(3))
    return torch.tensor(steps), cands


def _separate_candidate_hidden(model, family, example, t, token):
    """The final hidden state of ``token`` placed at step t of one sample, alone: its prefix
    (the real tokens before t, the sample's own image) and the candidate at y_t's position ids,
    as the family computes them for that sample."""
    one = pad_batch([example], 0)
    images = _images(family, one, model)
    positions = family.position_ids(model, one["input_ids"], one["attention_mask"], images)
    ids = torch.cat([one["input_ids"][:, :t], torch.tensor([[token]])], 1)
    pos = torch.cat([positions[..., :t], positions[..., t:t + 1]], -1)
    out = model.model(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=pos, use_cache=False, **images)
    return out.last_hidden_state[0, -1]


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_tpa_rows_equal_separate_forwards(fam, impl):
    family, teacher, _, _, examples, batch = fam
    model = _with_attention(teacher, impl)
    ids, real = batch["input_ids"], batch["attention_mask"]
    images = _images(family, batch, model)
    positions = family.position_ids(model, ids, real, images)
    assert positions.dim() == (3 if family.multimodal_rope else 2)
    steps, cands = _branches(batch)
    expanded = build_expanded_batch(ids, real, steps, cands, labels=batch["labels"], pad_id=0, position_ids=positions)
    length = ids.shape[1]
    with torch.no_grad():
        plain = _hidden(model, batch, family, positions).last_hidden_state
        h_expanded = expanded_hidden_states(model, expanded, **images)
        prefix = ground_truth_pass(model, ids, real, positions, **images)
        h_cached = torch.cat([prefix.hidden, candidate_hidden_states(model, expanded, prefix)], 1)
    rows = real.bool()
    for name, h in (("expanded", h_expanded), ("prefix_cache", h_cached)):
        torch.testing.assert_close(h[:, :length][rows], plain[rows], rtol=0, atol=1e-5, msg=lambda m: f"{name}: {m}")
    slots = expanded.steps
    assert int((slots >= 0).sum()) == 6
    with torch.no_grad():
        for b in range(slots.shape[0]):
            for c in range(slots.shape[1]):
                t = int(slots[b, c])
                if t < 0:
                    continue
                want = _separate_candidate_hidden(model, family, examples[b], t, int(expanded.candidates[b, c]))
                for name, h in (("expanded", h_expanded), ("prefix_cache", h_cached)):
                    torch.testing.assert_close(h[b, length + c], want, rtol=0, atol=1e-5,
                                               msg=lambda m: f"{name}, sample {b}, slot {c}: {m}")


def test_candidates_take_the_ground_truth_ids_in_every_component(fam):
    family, teacher, _, _, _, batch = fam
    positions = family.position_ids(teacher, batch["input_ids"], batch["attention_mask"], _images(family, batch, teacher))
    steps, cands = _branches(batch)
    expanded = build_expanded_batch(batch["input_ids"], batch["attention_mask"], steps, cands, pad_id=0,
                                    position_ids=positions)
    length, d = batch["input_ids"].shape[1], cands.shape[-1]
    for b in range(steps.shape[0]):
        for s in range(steps.shape[1]):
            t = int(steps[b, s])
            if t < 0:
                continue
            for k in range(d):
                assert torch.equal(expanded.position_ids[..., b, length + s * d + k], positions[..., b, t])
    if family.multimodal_rope:  # the image's rows and columns differ: three real components
        assert not torch.equal(positions[1], positions[2])


@pytest.mark.gpu
def test_flex_attention_expanded_rows_equal_sdpa(fam):
    """FlexAttention (the expanded forward's BlockMask) on the family's language model gives the
    rows of SDPA's dense mask (CUDA: FlexAttention compiles; fp32)."""
    from align_ti.train.data import language_model_attention

    family, teacher, _, _, _, batch = fam
    batch = {k: v.cuda() for k, v in batch.items()}
    sdpa = copy.deepcopy(teacher).cuda()
    flex = family.model_class()._from_config(teacher.config, attn_implementation=language_model_attention(
        "flex_attention")).cuda().eval()
    flex.load_state_dict(sdpa.state_dict())
    images = _images(family, batch, sdpa)
    positions = family.position_ids(sdpa, batch["input_ids"], batch["attention_mask"], images)
    steps, cands = _branches({k: v.cpu() for k, v in batch.items()})
    expanded = build_expanded_batch(batch["input_ids"], batch["attention_mask"], steps.cuda(), cands.cuda(),
                                    labels=batch["labels"], pad_id=0, position_ids=positions)
    with torch.no_grad():
        want = expanded_hidden_states(sdpa, expanded, **images)
        got = expanded_hidden_states(flex, expanded, **images)
    rows = expanded.attention_mask.bool()
    torch.testing.assert_close(got[rows], want[rows], rtol=0, atol=1e-4)


# ---- a trainer step against the plain-PyTorch composition ------------------------------------------

def _reference_loss(family, student, teacher, examples, batch, layer, expanded):
    """SFT + KD + IVA + TPA from full [.., V] logits, eager attentions and one forward per
    candidate (forward KL over the shared vocabulary)."""
    ids, real, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]

    def logits(model, **kw):
        return model.lm_head(model.model(**kw).last_hidden_state).double()

    def kl(zt, zs):
        v = min(zt.shape[-1], zs.shape[-1])
        lpt, lps = zt[..., :v].log_softmax(-1), zs[..., :v].log_softmax(-1)
        return (lpt.exp() * (lpt - lps)).sum(-1)

    s_pos = family.position_ids(student, ids, real, _images(family, batch, student))
    zs = logits(student, input_ids=ids, attention_mask=real, position_ids=s_pos, **_images(family, batch, student))
    with torch.no_grad():
        zt = logits(teacher, input_ids=ids, attention_mask=real, position_ids=s_pos, **_images(family, batch, teacher))
        mass = _eager_masses(teacher, batch, family)[layer]  # [B, L]
    rows = labels[:, 1:] != IGNORE_INDEX
    ce = torch.nn.functional.cross_entropy(zs[:, :-1][rows], labels[:, 1:][rows])
    kl_tok = kl(zt, zs)
    kd = kl_tok[:, :-1][rows].mean()
    vision = family.vision_mask(student.config, ids)
    w = mass * vision
    has = w.sum(1) > 0
    iva = ((w / w.sum(1, keepdim=True).clamp(min=1e-30)) * kl_tok).sum(1)[has].mean()
    tpa = []
    for b in range(expanded.steps.shape[0]):
        for c in range(expanded.steps.shape[1]):
            t = int(expanded.steps[b, c])
            if t < 0:
                continue
            token = int(expanded.candidates[b, c])
            one = pad_batch([examples[b]], 0)
            pos = family.position_ids(student, one["input_ids"], one["attention_mask"], _images(family, one, student))
            kw = dict(input_ids=torch.cat([one["input_ids"][:, :t], torch.tensor([[token]])], 1),
                      position_ids=torch.cat([pos[..., :t], pos[..., t:t + 1]], -1))
            kw["attention_mask"] = torch.ones_like(kw["input_ids"])
            s_last = logits(student, **kw, **_images(family, one, student))[0, -1]
            with torch.no_grad():
                t_last = logits(teacher, **kw, **_images(family, one, teacher))[0, -1]
            tpa.append(kl(t_last, s_last))
    return ce, kd, iva, torch.stack(tpa).mean()


@pytest.mark.parametrize("way", ["prefix_cache", "expanded"])
def test_trainer_step_equals_the_plain_pytorch_composition(fam, way, monkeypatch):
    """Both TPA ways on Qwen2.5-VL (multimodal RoPE); the default prefix cache on every family
    (the ways' rows agree on every family: test_tpa_rows_equal_separate_forwards)."""
    import align_ti.train.loss as loss_module
    from align_ti.train.loss import DistillModule, LossSpec

    family, teacher, student, processor, examples, batch = fam
    if way == "expanded" and family.name != "qwen2_5_vl":
        pytest.skip("the expanded way's step runs on Qwen2.5-VL (CI time); its rows are checked on every family")
    student = copy.deepcopy(student)
    layer = 1
    seen = []

    def spy(*args, **kwargs):
        seen.append(build_expanded_batch(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(loss_module, "build_expanded_batch", spy)
    spec = LossSpec(w_sft=1.0, w_kd=1.0, w_iva=1.0, w_tpa=1.0, iva_layer=layer, tpa_d=2, tpa_fraction=0.4,
                    tpa_max_per_sample=1, tpa_forward=way)
    forbidden, vocab_limit = forbidden_token_ids(student, processor.tokenizer)
    module = DistillModule(student, teacher, spec, image_token_id=family.image_token_id(student.config),
                           pad_token_id=processor.tokenizer.pad_token_id, vocab_limit=vocab_limit,
                           forbidden_ids=forbidden)
    assert module.tpa_way() == way
    out = module(**batch)
    out["loss"].backward()
    grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    student.zero_grad()
    ce, kd, iva, tpa = _reference_loss(family, student, teacher, examples, batch, layer, seen[-1])
    for name, want in (("sft", ce), ("kd", kd), ("iva", iva), ("tpa", tpa)):
        torch.testing.assert_close(out["terms"][name].double(), want, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    (ce + kd + iva + tpa).backward()
    assert grads.keys() == {n for n, p in student.named_parameters() if p.grad is not None}
    for name, g in grads.items():
        ref = student.get_parameter(name).grad.double()
        scale = ref.abs().max().item()
        torch.testing.assert_close(g.double(), ref, rtol=0, atol=1e-4 * scale + 1e-9, msg=lambda m: f"{name}: {m}")
    assert any(k.startswith("model.language_model") for k in grads)  # the language model trains


# ---- the family's pieces ---------------------------------------------------------------------------

def test_every_family_is_registered_with_its_pieces():
    assert set(FAMILIES) == {"llava", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "internvl"}
    for name in FAMILIES:
        family = get_family(name)
        assert family.model_types and family.processor_classes and family.title


def test_unsupported_model_lists_the_supported_families():
    from align_ti.models.tiny import build_tiny_causal_lm

    with pytest.raises(ValueError, match=r"model: Qwen2ForCausalLM \(model_type 'qwen2'\) is not a supported model "
                                         r"family; supported: internvl, llava, llava_onevision, qwen2_5_vl"):
        family_of(build_tiny_causal_lm())
    with pytest.raises(ValueError, match="family 'gemma3' is not supported; supported: internvl, llava"):
        get_family("gemma3")


def test_unsupported_checkpoint_folder_fails_at_load(tmp_path):
    from align_ti.models.tiny import build_tiny_causal_lm
    from align_ti.train.data import load_model_and_processor

    build_tiny_causal_lm().save_pretrained(tmp_path / "lm")
    with pytest.raises(ValueError, match=r"model '.*lm': Qwen2Config \(model_type 'qwen2'\) is not a supported model "
                                         "family; supported: internvl, llava, llava_onevision"):
        load_model_and_processor(str(tmp_path / "lm"))


def test_missing_torchvision_names_the_extra(monkeypatch):
    import builtins

    from align_ti.models.families import require_torchvision

    real_import = builtins.__import__

    def no_torchvision(name, *args, **kwargs):
        if name == "torchvision" or name.startswith("torchvision."):
            raise ImportError("No module named 'torchvision'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torchvision)
    with pytest.raises(ImportError, match=r"model 'x': the Qwen2.5-VL processor needs torchvision, which is not "
                                          r"installed: pip install 'align-ti\[vlm\]'"):
        require_torchvision(get_family("qwen2_5_vl"), "model 'x'")
    require_torchvision(get_family("llava"))  # LLaVA's processor needs none


def test_checkpoint_folders_load_with_their_processor(fam, tmp_path):
    from align_ti.train.data import load_model_and_processor

    family, _, student, processor, _, _ = fam
    student.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    model, loaded = load_model_and_processor(str(tmp_path))
    assert family_of(model) is family and type(loaded) is type(processor)
    item = dict(synthetic_vqa("train", 1, seed=2)[0], answer=ANSWER)
    a, b = (encode_example(p, item, return_instruction_mask=True) for p in (processor, loaded))
    assert a.keys() == b.keys()
    for key in a:  # LLaVA's tiny processor is SigLIP's PIL backend, a loaded one torchvision's: 6e-8 apart
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=lambda m: f"{key}: {m}")


def test_encoding_labels_answers_and_marks_instructions(fam):
    family, _, student, processor, examples, batch = fam
    tok = processor.tokenizer
    first = examples[0]
    assert tok.decode(first["input_ids"][first["labels"] != IGNORE_INDEX]) == ANSWER + tok.eos_token
    assert tok.decode(first["input_ids"][first["instruction_mask"]]) == synthetic_vqa("train", 2, seed=5)[0]["question"]
    assert set(family.image_inputs) <= set(batch) and "pixel_values" not in examples[2]
    n_vision = family.vision_mask(student.config, batch["input_ids"]).sum(1)
    assert n_vision[0] > 0 and n_vision[1] > 0 and n_vision[2] == 0


def test_different_image_processing_stops_naming_the_sample(fam):
    from align_ti.train.data import check_same_encoding

    family, _, student, processor, _, _ = fam
    items = [dict(it, answer="yes") for it in synthetic_vqa("train", 2, seed=4)]
    check_same_encoding(build_tiny_processor(student.config), processor, items)  # same definition: fine
    # saved and loaded again (what a teacher checkpoint holds): LLaVA's processor comes back with
    # the torchvision backend instead of PIL, whose pixels differ by ~6e-8; that is the same input
    with tempfile.TemporaryDirectory() as d:
        processor.save_pretrained(d)
        check_same_encoding(AutoProcessor.from_pretrained(d), processor, items)
    if family.name == "llava":
        return  # its tiny processor takes no settings
    setting = {"qwen2_vl": dict(min_pixels=56 * 56, max_pixels=56 * 56),
               "qwen2_5_vl": dict(min_pixels=56 * 56, max_pixels=56 * 56),
               "qwen3_vl": dict(min_pixels=64 * 64, max_pixels=64 * 64),
               "internvl": dict(max_patches=1), "llava_onevision": dict(image_grid_pinpoints=[[16, 16]])}[family.name]
    other = build_tiny_processor(student.config, **setting)
    with pytest.raises(ValueError, match=rf"teacher and student encode sample '{items[0]['id']}' differently: token ids "
                                         r"differ \(teacher \d+ tokens, student \d+"):
        check_same_encoding(other, processor, items)
    normalised = build_tiny_processor(student.config, image_mean=[0.4, 0.4, 0.4])  # the same tokens
    with pytest.raises(ValueError, match=r"differently: pixel_values: different values \(max \|difference\| 0\.\d+"):
        check_same_encoding(normalised, processor, items)


def test_freezing_the_vision_tower_and_projector(fam):
    family, _, student, _, _, _ = fam
    model = copy.deepcopy(student)
    set_trainable(model, vision_tower=False, projector=True)
    vision = {id(p) for m in family.vision_tower(model) for p in m.parameters()}
    projector = {id(p) for part in family.projector(model)
                 for p in ([part] if isinstance(part, torch.nn.Parameter) else part.parameters())}
    frozen = {id(p) for p in model.parameters() if not p.requires_grad}
    assert frozen == vision - projector and frozen
    set_trainable(model, vision_tower=True, projector=False)
    assert {id(p) for p in model.parameters() if not p.requires_grad} == projector
    assert all(p.requires_grad for p in family.decoder_layers(model).parameters())


def test_position_ids_are_the_models_own(fam):
    """Qwen-VL: the ids the model computes itself from mm_token_type_ids when given none."""
    family, teacher, _, _, _, batch = fam
    images = _images(family, batch, teacher)
    positions = family.position_ids(teacher, batch["input_ids"], batch["attention_mask"], images)
    extra = {}
    if family.multimodal_rope:
        extra["mm_token_type_ids"] = family.vision_mask(teacher.config, batch["input_ids"]).long()
        teacher.model.rope_deltas = None
    with torch.no_grad():
        ours = _hidden(teacher, batch, family, positions).last_hidden_state
        theirs = teacher.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                               **images, **extra).last_hidden_state
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(ours[real], theirs[real], rtol=0, atol=1e-5)


# ---- the command line, from written checkpoint folders ---------------------------------------------

@pytest.mark.e2e
@pytest.mark.parametrize("name", FAMILIES)
def test_cli_distill_and_irs_from_synth_models(name, tmp_path, capsys):
    from align_ti.cli import main
    from align_ti.data.synthetic import write_llava_dataset

    if get_family(name).needs_torchvision:
        pytest.importorskip("torchvision", reason="this family's processor needs torchvision: pip install 'align-ti[vlm]'")
    assert main(["synth-models", "--family", name, "--out", str(tmp_path / "m")]) == 0
    data = write_llava_dataset(tmp_path / "d", n_images=3, seed=0)
    teacher, student = tmp_path / "m" / "teacher", tmp_path / "m" / "student"
    assert main(["distill", f"teacher={teacher}", f"student={student}", f"data={data}", "max_steps=2",
                 "per_device_train_batch_size=4", "iva_layer=auto", "irs_samples=3", "tpa_fraction=0.5",
                 f"output_dir={tmp_path / 'run'}",
                 'training_args={"logging_steps": 1, "save_strategy": "no", "disable_tqdm": true}']) == 0
    out = capsys.readouterr().out
    assert "train_loss" in out and "loss_tpa" in out and "loss_iva" in out
    model, _ = __import__("align_ti.train.data", fromlist=["x"]).load_model_and_processor(str(tmp_path / "run"))
    assert family_of(model).name == name and all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert main(["irs", "--model", str(teacher), "--data", str(data), "--samples", "3",
                 "--out", str(tmp_path / "irs")]) == 0
    assert "chosen layer:" in capsys.readouterr().out


def test_qwen2_5_vl_shaped_pair():
    """The benchmark's Qwen2.5-VL-shaped pair (7B -> 3B, unequal vocabularies): the full-scale
    shapes, and one DistillModule step with all four terms at 1/16 scale with 2 layers each."""
    from align_ti.models.shaped import qwen2_5_vl_batch, qwen2_5_vl_configs, qwen2_5_vl_pair
    from align_ti.train.loss import DistillModule, LossSpec

    s_cfg, t_cfg, meta = qwen2_5_vl_configs(1)
    assert (t_cfg.text_config.vocab_size, s_cfg.text_config.vocab_size) == (152064, 151936)
    assert (t_cfg.text_config.num_hidden_layers, s_cfg.text_config.num_hidden_layers) == (28, 36)
    assert (t_cfg.text_config.hidden_size, s_cfg.text_config.hidden_size) == (3584, 2048)
    assert s_cfg.text_config.rope_parameters["mrope_section"] == [16, 24, 24]
    assert (meta["n_vision"], meta["length"], meta["grid"]) == (729, 2048, 54)
    student, teacher, meta = qwen2_5_vl_pair(divisor=16, num_layers=2)
    batch = qwen2_5_vl_batch(meta)
    assert int((batch["input_ids"] == meta["image_token_id"]).sum(1)[0]) == meta["n_vision"]
    spec = LossSpec(w_sft=1.0, w_kd=1.0, w_iva=1.0, w_tpa=1.0, iva_layer=meta["iva_layer"], tpa_fraction=0.05)
    vprime = min(student.config.text_config.vocab_size, teacher.config.text_config.vocab_size)
    module = DistillModule(student, teacher, spec, image_token_id=meta["image_token_id"], pad_token_id=meta["pad_id"],
                           forbidden_ids=(meta["image_token_id"], meta["pad_id"]), vocab_limit=vprime - 6)
    out = module(**batch)
    out["loss"].backward()
    assert all(bool(torch.isfinite(v)) for v in out["terms"].values()) and out["terms"]["tpa"] > 0
