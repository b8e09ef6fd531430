"""sample_candidates' refusal when d exceeds the tokens a candidate may be (issue #17)."""
import pytest
import torch

from align_ti.ops.branches import sample_candidates


def test_tpa_candidate_pool_message_without_a_limit():
    """No vocab_limit given: the message counts the head's rows, never a negative number."""
    hidden, weight = torch.randn(1, 4, 8), torch.randn(1, 8)
    ids, steps = torch.zeros(1, 4, dtype=torch.long), torch.tensor([[2]])
    with pytest.raises(ValueError) as e:
        sample_candidates(hidden, weight, ids, steps, num_candidates=2, forbidden_ids=[0])
    assert str(e.value) == ("num_candidates = 2 exceeds the 0 tokens a candidate may be (student_weight's 1 rows, "
                            "less 1 forbidden_ids and the ground truth)")
    with pytest.raises(ValueError, match=r"the 1 tokens .*\(vocab_limit = 1\)$"):
        sample_candidates(hidden, torch.randn(3, 8), ids, steps, num_candidates=2, vocab_limit=1,
                          exclude_ground_truth=False)
