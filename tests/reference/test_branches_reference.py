"""The TPA expanded-layout reference: hand-checked structure, and the property that matters,
proven on a tiny transformers model: every candidate row's logits equal those of running the
model on prefix + [candidate], and every ground-truth row's logits are unchanged."""
import ast

import pytest
import torch

import align_ti.reference.branches as reference_branches

from align_ti.models.tiny import build_tiny_causal_lm
from align_ti.reference.branches import additive_mask, expanded_batch_reference
from tests.utils import assert_close


def test_structure_by_hand():
    input_ids = torch.tensor([[5, 6, 7, 8, 0]])
    attention_mask = torch.tensor([[1, 1, 1, 1, 0]])
    labels = torch.tensor([[-100, -100, 7, 8, -100]])
    steps = torch.tensor([[2, 3, -1]])
    cands = torch.tensor([[9, 10, 0]])
    out = expanded_batch_reference(input_ids, attention_mask, steps, cands, labels=labels, pad_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7, 8, 0, 9, 10, 0]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 3, 3, 2, 3, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 1, 1, 0]]
    assert out["targets"].tolist() == [[-100, 7, 8, -100, -100, -100, -100, -100]]
    allowed = out["allowed"][0].int().tolist()
    assert allowed[5] == [1, 1, 0, 0, 0, 1, 0, 0]  # candidate for step 2: keys 0, 1 and itself
    assert allowed[6] == [1, 1, 1, 0, 0, 0, 1, 0]  # candidate for step 3: keys 0..2 and itself
    assert allowed[7] == [0, 0, 0, 0, 0, 0, 0, 1]  # empty slot: itself
    assert allowed[3] == [1, 1, 1, 1, 0, 0, 0, 0]  # ground truth never sees candidates
    assert allowed[4] == [1, 1, 1, 1, 1, 0, 0, 0]  # padding query sees itself too


def test_additive_form():
    allowed = torch.tensor([[[True, False], [True, True]]])
    add = additive_mask(allowed, torch.float16)
    assert add.shape == (1, 1, 2, 2)
    assert add[0, 0, 0, 0] == 0 and add[0, 0, 0, 1] == torch.finfo(torch.float16).min


def test_the_oracle_is_a_leaf():
    """It imports only torch (DESIGN.md): no align_ti module, so it shares no code with the fast
    path it checks. It checks no argument either: tests/ops/test_branches.py gives the builder
    its bad input."""
    tree = ast.parse(open(reference_branches.__file__).read())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported <= {"__future__", "torch"}, imported


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_candidate_logits_equal_separate_forwards(attn):
    model = build_tiny_causal_lm("student", "qwen2", attn_implementation=attn).eval()
    lengths = [9, 6]
    length = max(lengths)
    input_ids = torch.randint(1, 64, (2, length))
    attention_mask = torch.zeros(2, length, dtype=torch.long)
    for b, n in enumerate(lengths):
        attention_mask[b, :n] = 1
        input_ids[b, n:] = 0
    steps = torch.tensor([[3, 3, 8, 5], [1, 4, -1, -1]])
    cands = torch.tensor([[11, 12, 13, 14], [21, 22, 0, 0]])
    ex = expanded_batch_reference(input_ids, attention_mask, steps, cands)
    mask4d = ex["allowed"].unsqueeze(1) if attn == "sdpa" else additive_mask(ex["allowed"], torch.float32)
    with torch.no_grad():
        out = model(input_ids=ex["input_ids"], attention_mask=mask4d, position_ids=ex["position_ids"]).logits
        for b, n in enumerate(lengths):
            plain = model(input_ids=input_ids[b : b + 1, :n]).logits[0]
            assert_close(out[b, :n], plain, atol=1e-5, name=f"ground truth rows of sample {b}")
            for c in range(steps.shape[1]):
                t = int(steps[b, c])
                if t < 0:
                    continue
                seq = torch.cat([input_ids[b, :t], cands[b, c : c + 1]]).unsqueeze(0)
                alone = model(input_ids=seq).logits[0, -1]
                assert_close(out[b, length + c], alone, atol=1e-5, name=f"candidate {c} of sample {b}")
