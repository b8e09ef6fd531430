"""Evaluation of one demo model on held-out (or validation) items: greedy generation, exact
match and object-level F1 per item (`align_ti.data.synthetic.score_answer`), and the
teacher-student KL along two kinds of prefixes, the exposure-bias measure:

- along the *reference* answers (teacher forcing: the prefixes the student trained on), and
- along the student's *own* greedy answers (the prefixes it meets when it generates).

``kl_own / kl_reference`` > 1 says the student drifts from the teacher more on its own
prefixes than on the training prefixes: exposure bias, which TPA targets (METHOD.md).
"""
from __future__ import annotations

from collections import defaultdict

import torch

from align_ti.constants import IGNORE_INDEX
from align_ti.data.llava import pad_batch
from align_ti.data.synthetic import score_answer
from align_ti.ops.branches import next_token_targets
from align_ti.ops.fused_kl import fused_linear_kl

__all__ = ["generate_answers", "kl_along", "evaluate_model", "summary"]


def _prompt(example: dict) -> dict:
    """The example cut before its answer: what the model sees when it generates."""
    start = int((example["labels"] != IGNORE_INDEX).nonzero()[0])
    return {"input_ids": example["input_ids"][:start], "attention_mask": example["attention_mask"][:start],
            "pixel_values": example["pixel_values"]}


@torch.no_grad()
def generate_answers(model, examples: list[dict], eos_token_id: int, max_new_tokens: int,
                     batch_size: int = 256) -> list[list[int]]:
    """Greedy answers (token ids, cut after the first eos) of ``model`` for encoded examples.

    Prompts of one length are batched together (the task's prompts differ only in the question),
    so no batch is padded and generation needs no position-id care."""
    was = model.training
    model.eval()
    prompts = [_prompt(e) for e in examples]
    by_length = defaultdict(list)
    for i, p in enumerate(prompts):
        by_length[p["input_ids"].numel()].append(i)
    out: list = [None] * len(examples)
    for idx in by_length.values():
        for start in range(0, len(idx), batch_size):
            chunk = idx[start:start + batch_size]
            batch = pad_batch([prompts[i] for i in chunk], 0)
            gen = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos_token_id,
                                 pad_token_id=eos_token_id, use_cache=True)
            new = gen[:, batch["input_ids"].shape[1]:].tolist()
            for i, ids in zip(chunk, new):
                out[i] = ids[:ids.index(eos_token_id) + 1] if eos_token_id in ids else ids
    model.train(was)
    return out


@torch.no_grad()
def kl_along(student, teacher, examples: list[dict], continuations: list[list[int]] | None = None,
             batch_size: int = 128) -> float:
    """Mean KL(p_T || p_S) per answer token, along each example's reference answer
    (``continuations=None``) or along the given continuations of its prompt (e.g. the
    student's own greedy answers): the distributions that predict each answer token, given the
    prompt and the answer tokens before it."""
    total, rows_n = 0.0, 0
    was = student.training
    student.eval()  # dropout (if a student had any) off: the distributions it generates with
    for start in range(0, len(examples), batch_size):
        chunk = []
        for j, e in enumerate(examples[start:start + batch_size]):
            if continuations is None:
                chunk.append({k: e[k] for k in ("input_ids", "attention_mask", "labels", "pixel_values")})
                continue
            p = _prompt(e)
            cont = torch.tensor(continuations[start + j], dtype=p["input_ids"].dtype)
            ids = torch.cat([p["input_ids"], cont])
            labels = torch.cat([torch.full_like(p["input_ids"], IGNORE_INDEX), cont])
            chunk.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
                          "pixel_values": p["pixel_values"]})
        b = pad_batch(chunk, 0)
        kw = dict(input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=b["pixel_values"],
                  use_cache=False)
        rows = (next_token_targets(b["labels"]) != IGNORE_INDEX).reshape(-1)
        hs = student.model(**kw).last_hidden_state
        ht = teacher.model(**kw).last_hidden_state
        kl = fused_linear_kl(hs.reshape(-1, hs.shape[-1]), student.get_output_embeddings().weight,
                             ht.reshape(-1, ht.shape[-1]), teacher.get_output_embeddings().weight, rows=rows,
                             reduction="sum")
        total += float(kl)
        rows_n += int(rows.sum())
    student.train(was)
    return total / max(rows_n, 1)


def evaluate_model(model, examples: list[dict], items: list[dict], tokenizer, teacher=None,
                   max_new_tokens: int = 24) -> dict:
    """Greedy answers of ``model`` scored against ``items`` (the raw items of ``examples``):
    per-item ``predictions``, ``exact`` (0/1) and ``f1``, their means, and with a teacher the KL
    along reference and own prefixes and their ratio (`kl_along`)."""
    eos = tokenizer.eos_token_id
    answers = generate_answers(model, examples, eos, max_new_tokens)
    texts = [tokenizer.decode([t for t in a if t != eos], skip_special_tokens=True).strip() for a in answers]
    scores = [score_answer(t, it) for t, it in zip(texts, items)]
    exact = [int(e) for e, _ in scores]
    f1 = [round(f, 4) for _, f in scores]
    out = {"exact_match": sum(exact) / len(exact), "f1": sum(f1) / len(f1), "n": len(exact),
           "predictions": texts, "exact": exact, "item_f1": f1}
    if teacher is not None:
        kl_ref = kl_along(model, teacher, examples)
        kl_own = kl_along(model, teacher, examples, answers)
        out.update(kl_reference=kl_ref, kl_own=kl_own, exposure_ratio=kl_own / kl_ref if kl_ref > 0 else float("nan"))
    return out


def summary(evaluation: dict) -> dict:
    """An `evaluate_model` result without its per-item lists."""
    return {k: v for k, v in evaluation.items() if not isinstance(v, list)}
