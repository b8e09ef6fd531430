"""The paper-code way of one distillation step, for `align_ti.benchmarks.train_step`.

What the released model code does (it has no training code; METHOD.md): both models run
``attn_implementation="eager"`` with ``output_attentions=True``, full fp32 ``[B, L, V]`` logits
of both are materialised and every term is computed on them in plain PyTorch.

- IVA: the teacher's forward returns all layers' attention probabilities; the IVA layer's
  ``[B, H, L, L]`` is averaged over heads and summed over the instruction query rows -> mass
  over keys; the mass on vision tokens, normalised per sample, weighs KL(p_T || p_S) computed
  from the materialised logits at the vision rows. The student also runs with
  ``output_attentions=True``.
- TPA: ``d`` separate extra forwards of the student (with grad) and the teacher (no grad).
  Candidate ``i`` is a token sampled from the student's (detached) distribution at row t-1
  for each branched position t; extra forward ``i`` is the full sequence with *all* branched
  positions of a sample replaced by their i-th candidates at once (one forward per candidate
  index, not one per (position, candidate): a lower bound on the paper code's cost), and the
  KL(p_T || p_S) is taken on the materialised logits at those positions (the distribution that
  follows the candidate). To keep this way's memory as low as it can honestly be, the main
  loss is backpropagated first and each candidate forward is backpropagated right after it
  (gradient accumulation), so at most one extra student graph is alive at a time.
- Vocabularies differ (student 151936 rows, teacher 152064): the first V' = min(Vs, Vt)
  entries are compared, as in the align-ti way.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from align_ti.constants import IGNORE_INDEX
from align_ti.ops.branches import next_token_targets

__all__ = ["paper_step_fn"]


def _kl_rows(s_logits, t_logits):
    """forward KL(p_T || p_S) per row, fp32 materialised (what the paper code does)."""
    lp_s = F.log_softmax(s_logits.float(), -1)
    lp_t = F.log_softmax(t_logits.float(), -1)
    return (lp_t.exp() * (lp_t - lp_s)).sum(-1)


def paper_step_fn(student, teacher, batch, meta, align_ti: bool, tpa_d: int = 4, tpa_fraction: float = 0.25):
    ids, am, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    pix = batch["pixel_values"]
    vprime = min(student.config.text_config.vocab_size, teacher.config.text_config.vocab_size)
    layer = meta["iva_layer"]

    def loss_and_backward():
        gen = torch.Generator(device=ids.device).manual_seed(0)  # sampling on the device
        s_out = student(input_ids=ids, pixel_values=pix, attention_mask=am, use_cache=False,
                        output_attentions=True)
        s_logits = s_out.logits.float()[..., :vprime]  # fp32 [B, L, V']
        with torch.no_grad():
            t_out = teacher(input_ids=ids, pixel_values=pix, attention_mask=am, use_cache=False,
                            output_attentions=True)
            t_logits = t_out.logits.float()[..., :vprime]
        tgt = next_token_targets(labels)
        rows = tgt != IGNORE_INDEX
        ce = F.cross_entropy(s_logits[rows], tgt[rows])
        kd = _kl_rows(s_logits[rows], t_logits[rows]).mean()
        loss = ce + kd
        if align_ti:
            # IVA: instruction->vision attention mass at one teacher layer
            att = t_out.attentions[layer].float().mean(1)  # [B, L, L]
            qmask = batch["instruction_mask"].bool()
            mass = (att * qmask[..., None]).sum(1)  # [B, L] over keys
            vmask = ids == meta["image_token_id"]
            w = mass * vmask
            w = w / w.sum(1, keepdim=True).clamp(min=1e-12)
            kl_v = _kl_rows(s_logits, t_logits)  # [B, L]
            loss = loss + (w * kl_v).sum(1).mean()
        loss.backward()
        if align_ti:
            # TPA: d separate extra forwards per model on prefix + candidate
            elig = rows.roll(1, 1) & (torch.arange(ids.shape[1], device=ids.device) >= 1)
            n = elig.sum(1)
            sel = torch.zeros_like(elig)
            for b in range(ids.shape[0]):
                pos = elig[b].nonzero().squeeze(1)
                k = int(torch.ceil(n[b].double() * tpa_fraction))
                pick = pos[torch.randperm(pos.numel(), generator=gen, device=pos.device)[:k]]
                sel[b, pick] = True
            probs_prev = F.softmax(s_logits.detach().roll(1, 1)[sel], -1)  # row t-1 for each t
            cands = torch.multinomial(probs_prev, tpa_d, replacement=False, generator=gen)
            n_cand = sel.sum() * tpa_d
            del s_out, s_logits, t_out, t_logits
            for i in range(tpa_d):
                ids_i = ids.clone()
                ids_i[sel] = cands[:, i]
                s_l = student(input_ids=ids_i, pixel_values=pix, attention_mask=am, use_cache=False).logits
                with torch.no_grad():
                    t_l = teacher(input_ids=ids_i, pixel_values=pix, attention_mask=am, use_cache=False).logits
                s_l = s_l.float()[..., :vprime]
                t_l = t_l.float()[..., :vprime]
                tpa = _kl_rows(s_l[sel], t_l[sel]).sum() / n_cand
                tpa.backward()
                del s_l, t_l, tpa
        return loss.detach()

    return loss_and_backward
