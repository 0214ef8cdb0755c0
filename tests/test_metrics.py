import math

import pytest
import torch

from lit_tricks.metrics import NegativeLogLikelihood, classification_metrics


def test_nll_by_hand():
    metric = NegativeLogLikelihood()
    metric.update(torch.tensor([[0.5, 0.5], [0.25, 0.75]]), torch.tensor([0, 1]))
    metric.update(torch.tensor([[0.1, 0.9]]), torch.tensor([0]))
    expected = -(math.log(0.5) + math.log(0.75) + math.log(0.1)) / 3
    assert metric.compute().item() == pytest.approx(expected, rel=1e-6)


def test_nll_is_finite_for_zero_probability():
    metric = NegativeLogLikelihood()
    metric.update(torch.tensor([[1.0, 0.0]]), torch.tensor([1]))
    assert math.isfinite(metric.compute().item()) and metric.compute().item() > 80


def test_accuracy_and_ece_by_hand():
    metrics = classification_metrics(num_classes=2, prefix="val/", ece_bins=10)
    # confidences 0.9 (right), 0.9 (wrong), 0.6 (right), 0.6 (right): bins 0.9 -> acc 0.5, 0.6 -> acc 1.0
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.4, 0.6]])
    target = torch.tensor([0, 1, 1, 1])
    metrics.update(probs, target)
    out = metrics.compute()
    assert set(out) == {"val/acc", "val/nll", "val/ece"}
    assert out["val/acc"].item() == pytest.approx(0.75)
    # ECE = 2/4 * |0.5 - 0.9| + 2/4 * |1.0 - 0.6| = 0.4
    assert out["val/ece"].item() == pytest.approx(0.4, abs=1e-6)
