import math

import lightning.pytorch as pl
import pytest
import torch

from lit_tricks import Classifier, SampleReweighting, Trick
from lit_tricks.data import DigitsDataModule
from lit_tricks.functional import normalize_losses, reweighting_weights, strategy_scores
from lit_tricks.nets import MLP


def test_strategies_by_hand():
    x = normalize_losses(torch.tensor([1.0, 2.0, 3.0]))
    assert x.tolist() == [-1.0, 0.0, 1.0]
    assert strategy_scores(x, "linupper").tolist() == [0.0, 1.0, 1.0]
    assert strategy_scores(x, "quadratic").tolist() == [0.0, 1.0, 0.0]
    assert strategy_scores(x, "extremes").tolist() == [1.0, 0.0, 1.0]
    e = math.e
    expected = [3 / (1 + 2 * e), 3 * e / (1 + 2 * e), 3 * e / (1 + 2 * e)]  # N * softmax([0, 1, 1])
    torch.testing.assert_close(reweighting_weights(torch.tensor([1.0, 2.0, 3.0]), "linupper"), torch.tensor(expected))
    # temperature 2 halves the scores; equal losses give uniform weights
    torch.testing.assert_close(
        reweighting_weights(torch.tensor([1.0, 3.0]), "extremes", temperature=2.0), torch.tensor([1.0, 1.0])
    )
    torch.testing.assert_close(reweighting_weights(torch.full((4,), 0.7), "quadratic"), torch.ones(4))
    assert normalize_losses(torch.tensor([2.0, 4.0]), delta=0.5).tolist() == [-0.5, 0.5]


class After(Trick):
    order = 5

    def __init__(self):
        self.seen = []

    def after_loss(self, trainer, module, batch, out):
        self.seen.append((out.per_sample_loss.detach().clone(), None if batch.weight is None else batch.weight.clone()))
        return out

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen[-1] = (*self.seen[-1], outputs["loss"].detach())


@pytest.mark.parametrize("strategy", ["linupper", "quadratic", "extremes"])
def test_weights_and_loss_in_a_real_fit(strategy, quiet_trainer_kwargs):
    spy = After()
    trainer = pl.Trainer(
        max_steps=4,
        limit_val_batches=0,
        callbacks=[SampleReweighting(strategy, 0.5, warmup_steps=2), spy],
        **quiet_trainer_kwargs,
    )
    trainer.fit(Classifier(MLP(64, 10, hidden=(16,)), num_classes=10), DigitsDataModule(batch_size=16))
    for step, (losses, weights, loss) in enumerate(spy.seen):
        if step < 2:
            assert weights is None  # warm-up: uniform
            torch.testing.assert_close(loss, losses.mean())
            continue
        torch.testing.assert_close(weights, reweighting_weights(losses, strategy, 0.5))
        torch.testing.assert_close(weights.mean(), torch.tensor(1.0))
        torch.testing.assert_close(loss, (weights * losses).mean())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"strategy": "hardest"}, "strategy must be"),
        ({"temperature": 0.0}, r"temperature must be a finite number in \(0.0, inf\)"),
        ({"temperature": float("nan")}, "temperature must be a finite number"),
        ({"delta": -1.0}, "delta must be a finite number"),
        ({"delta": float("inf")}, "delta must be a finite number"),
        ({"warmup_steps": -1}, "warmup_steps"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SampleReweighting(**kwargs)
