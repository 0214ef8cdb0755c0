import math

import pytest
import torch

from lit_tricks import StepOutput, TrickBatch


def test_from_dict_keeps_extras():
    batch = {"inputs": torch.zeros(2, 3), "targets": torch.tensor([0, 1]), "index": torch.tensor([5, 6]), "task": 1}
    tb = TrickBatch.from_batch(batch)
    assert tb.index.tolist() == [5, 6] and tb.weight is None and tb.extras == {"task": 1} and len(tb) == 2


@pytest.mark.parametrize("container", [tuple, list])
def test_from_sequences(container):
    x, y, i = torch.zeros(2, 3), torch.tensor([0, 1]), torch.tensor([3, 4])
    assert TrickBatch.from_batch(container([x, y])).index is None
    assert TrickBatch.from_batch(container([x, y, i])).index is i


def test_hard_targets_of_probabilities():
    tb = TrickBatch(torch.zeros(2, 1), torch.tensor([[0.2, 0.8], [0.7, 0.3]]))
    assert tb.hard_targets.tolist() == [1, 0]


@pytest.mark.parametrize(
    ("batch", "error", "match"),
    [
        ({"x": torch.zeros(1), "y": torch.zeros(1)}, ValueError, "needs the keys 'inputs' and 'targets'"),
        (torch.zeros(3), TypeError, "Cannot read a batch"),
        ((torch.zeros(1),), TypeError, "Cannot read a batch"),
    ],
)
def test_unreadable_batches(batch, error, match):
    with pytest.raises(error, match=match):
        TrickBatch.from_batch(batch)


@pytest.mark.parametrize(
    ("targets", "match"),
    [
        (torch.tensor([0, 3]), r"class ids in \[0, 3\] but num_classes=3"),
        (torch.tensor([-1, 0]), "class ids"),
        (torch.tensor([0.0, 1.0]), "1-D float tensor"),
        (torch.full((2, 4), 0.25), "4 columns but num_classes=3"),
        (torch.tensor([[0.5, 0.5, 0.5], [1.0, 0.0, 0.0]]), "sum to 1"),
        (torch.tensor([[1.5, -0.5, 0.0], [1.0, 0.0, 0.0]]), "non-negative"),
        (torch.zeros(2, 3, 1), "shape"),
    ],
)
def test_check_rejects_bad_targets(targets, match):
    with pytest.raises(ValueError, match=match):
        TrickBatch(torch.zeros(2, 5), targets).check(num_classes=3)


def test_check_accepts_good_targets():
    TrickBatch(torch.zeros(2, 5), torch.tensor([0, 2])).check(3)
    TrickBatch(torch.zeros(2, 5), torch.tensor([[0.2, 0.3, 0.5], [0, 0, 1.0]]), torch.tensor([0, 1])).check(3)


def test_step_output_probabilities_are_computed_once_and_follow_replaced_logits():
    logits = torch.tensor([[0.0, math.log(3.0)]], requires_grad=True)
    out = StepOutput(logits, None, torch.zeros(1))
    first = out.probabilities()
    torch.testing.assert_close(first, torch.tensor([[0.25, 0.75]]))
    assert out.probabilities() is first and first.requires_grad  # one softmax per step, in the graph
    out.logits = logits * 0.0  # a trick replaced the logits: the next ask sees them
    torch.testing.assert_close(out.probabilities(), torch.tensor([[0.5, 0.5]]))
