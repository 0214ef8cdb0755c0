import math

import pytest
import torch
import torch.nn.functional as F

from lit_tricks.functional import soft_target_cross_entropy, to_probabilities, weighted_mean


def test_soft_target_cross_entropy_by_hand():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    # softmax rows: [1/2, 1/2] and [3/4, 1/4]
    targets = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    expected = torch.tensor([math.log(2.0), -(0.5 * math.log(0.75) + 0.5 * math.log(0.25))])
    torch.testing.assert_close(soft_target_cross_entropy(logits, targets), expected)


def test_class_ids_equal_one_hot_probabilities():
    logits = torch.randn(7, 4)
    ids = torch.tensor([0, 3, 1, 1, 2, 0, 3])
    by_ids = soft_target_cross_entropy(logits, ids)
    torch.testing.assert_close(by_ids, soft_target_cross_entropy(logits, to_probabilities(ids, 4)))
    torch.testing.assert_close(by_ids, F.cross_entropy(logits, ids, reduction="none"))


def test_to_probabilities_passes_probabilities_through():
    probs = torch.full((2, 3), 1 / 3)
    assert to_probabilities(probs, 3) is probs
    assert to_probabilities(torch.tensor([2, 0]), 3).tolist() == [[0, 0, 1], [1, 0, 0]]


@pytest.mark.parametrize(
    ("weight", "expected"),
    [(None, 2.0), (torch.tensor([1.0, 1.0, 1.0]), 2.0), (torch.tensor([0.0, 0.0, 3.0]), 3.0)],
)
def test_weighted_mean_divides_by_batch_size(weight, expected):
    # (1*0 + 2*0 + 3*3) / 3 = 3 for the last case
    assert weighted_mean(torch.tensor([1.0, 2.0, 3.0]), weight).item() == pytest.approx(expected)
