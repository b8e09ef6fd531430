"""IVA with uniform weights (config ``iva_weighting=uniform``): vision KD without the teacher's
instruction-aware attention weights, the demo's control (issue #21). Its term equals a
plain-PyTorch mean over each sample's vision tokens (tests/train/test_trainer.py checks the
attention-weighted term against its own reference), and it needs no IVA layer."""
import copy

import pytest
import torch

from align_ti.train.config import load_config
from align_ti.train.data import DistillCollator
from align_ti.train.loss import DistillModule, LossSpec


def _module(tiny, spec, student=None, teacher=None, **kw):
    return DistillModule(student if student is not None else tiny.student,
                         teacher if teacher is not None else tiny.teacher, spec,
                         image_token_id=tiny.student.config.image_token_index, pad_token_id=0, **kw)


def _batch(tiny, n=6):
    return DistillCollator(0)([tiny.dataset[i] for i in range(n)])


def _uniform_vision_kl(student, teacher, batch):
    """Forward KL(p_T || p_S) at every vision position from full logits, averaged over each
    sample's vision tokens, then over samples."""
    kw = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
              pixel_values=batch["pixel_values"])
    zs = student(**kw).logits.double()
    with torch.no_grad():
        zt = teacher(**kw).logits.double()
    v = min(zs.shape[-1], zt.shape[-1])
    lps, lpt = zs[..., :v].log_softmax(-1), zt[..., :v].log_softmax(-1)
    kl_tok = (lpt.exp() * (lpt - lps)).sum(-1)  # [B, L]
    vision = (batch["input_ids"] == student.config.image_token_index).double()
    return ((kl_tok * vision).sum(1) / vision.sum(1)).mean()


def test_uniform_iva_is_the_mean_kl_over_vision_tokens(tiny):
    student = copy.deepcopy(tiny.student)
    batch = _batch(tiny)
    spec = LossSpec(w_sft=0.0, w_kd=0.0, w_iva=1.0, w_tpa=0.0, iva_weighting="uniform")  # no iva_layer
    out = _module(tiny, spec, student)(**batch)
    want = _uniform_vision_kl(student, tiny.teacher, batch)
    torch.testing.assert_close(out["terms"]["iva"].double(), want, rtol=1e-4, atol=1e-6)
    out["loss"].backward()
    got = student.lm_head.weight.grad.clone()
    student.zero_grad()
    _uniform_vision_kl(student, tiny.teacher, batch).backward()
    torch.testing.assert_close(got.double(), student.lm_head.weight.grad.double(), rtol=1e-3, atol=1e-7)


@pytest.mark.parametrize("tpa_forward", ["expanded", "prefix_cache"])
def test_uniform_iva_term_is_the_same_with_tpa(tiny, tpa_forward):
    """With TPA the vision rows come from TPA's forwards (expanded, or the prefix cache's
    ground-truth pass); the term is the one without TPA."""
    batch = _batch(tiny)
    common = dict(w_sft=1.0, w_kd=1.0, w_iva=1.0, iva_weighting="uniform", tpa_fraction=1.0, tpa_forward=tpa_forward)
    kw = dict(forbidden_ids=(0, 3), vocab_limit=1200)
    plain = _module(tiny, LossSpec(w_tpa=0.0, **common), **kw)(**batch)
    with_tpa = _module(tiny, LossSpec(w_tpa=1.0, **common), **kw)(**batch)
    torch.testing.assert_close(with_tpa["terms"]["iva"], plain["terms"]["iva"], rtol=1e-4, atol=1e-6)


def test_uniform_iva_skips_samples_without_an_instruction(tiny):
    """A sample with no instruction token gets no IVA weight either way, so the per-sample
    normaliser (`count_normalizers`) covers the same samples."""
    batch = _batch(tiny, 4)
    batch["instruction_mask"][0] = False
    spec = LossSpec(w_sft=0.0, w_kd=0.0, w_iva=1.0, w_tpa=0.0, iva_weighting="uniform")
    out = _module(tiny, spec)(**batch)
    rest = {k: v[1:] for k, v in batch.items()}  # every sample has an image: pixel_values align
    torch.testing.assert_close(out["terms"]["iva"], _module(tiny, spec)(**rest)["terms"]["iva"], rtol=1e-5,
                               atol=1e-7)


def test_config_key_and_spec_check(tiny, tmp_path):
    cfg = load_config(overrides=["iva_weighting=uniform", f"output_dir={tmp_path}"])
    assert LossSpec.from_config(cfg).iva_weighting == "uniform"
    assert LossSpec.from_config(load_config(overrides=[f"output_dir={tmp_path}"])).iva_weighting == "attention"
    with pytest.raises(ValueError, match="config iva_weighting must be one of"):
        load_config(overrides=["iva_weighting=flat", f"output_dir={tmp_path}"])
    with pytest.raises(ValueError, match="iva_k / iva_ratio"):
        load_config(overrides=["iva_weighting=uniform", "iva_k=4", f"output_dir={tmp_path}"])
    with pytest.raises(ValueError, match="iva_weighting must be one of"):
        _module(tiny, LossSpec(w_iva=1.0, iva_weighting="flat", iva_layer=1))
