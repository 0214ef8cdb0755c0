import math
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch

from lit_tricks import Classifier, TrickBatch
from lit_tricks.callbacks.bias_loss import BiasLoss
from lit_tricks.core.batch import StepOutput
from lit_tricks.data import DigitsDataModule
from lit_tricks.functional.bias_loss import bias_weights, feature_variance, normalise_variance
from lit_tricks.nets import MLP

TRAINER = SimpleNamespace(
    world_size=1,
    fast_dev_run=False,
    _logger_connector=SimpleNamespace(should_update_logs=False),
    state=SimpleNamespace(stage=None),  # logging_due then asks _logger_connector
)


def _step(trick, features):
    n = features.shape[0]
    out = StepOutput(torch.zeros(n, 3), features, torch.ones(n))
    batch = TrickBatch(torch.zeros(n, 1), torch.zeros(n, dtype=torch.long))
    return trick.after_loss(TRAINER, None, batch, out).per_sample_loss


def test_weights_from_known_variances():
    features = torch.tensor([[1.0, 3.0], [2.0, 2.0], [0.0, 4.0]])  # unbiased variances 2, 0, 8
    torch.testing.assert_close(feature_variance(features), torch.tensor([2.0, 0.0, 8.0]))
    v = feature_variance(features)
    normalised = normalise_variance(v, v.min(), v.min(), v.max())
    torch.testing.assert_close(normalised, torch.tensor([0.25, 0.0, 1.0]))
    torch.testing.assert_close(bias_weights(normalised, 0.3, 0.3), torch.exp(0.3 * normalised) - 0.3)
    # feature maps [N, C, H, W] are flattened per sample
    maps = torch.arange(8.0).reshape(1, 2, 2, 2)
    torch.testing.assert_close(feature_variance(maps), torch.arange(8.0).var().reshape(1))


def test_global_mode_keeps_the_running_minimum():
    trick = BiasLoss(alpha=0.3, beta=0.3)
    first = _step(trick, torch.tensor([[1.0, 3.0], [2.0, 2.0], [0.0, 4.0]]))  # variances 2, 0, 8
    torch.testing.assert_close(first, torch.exp(0.3 * torch.tensor([0.25, 0.0, 1.0])) - 0.3)
    assert trick.global_min.item() == 0.0
    # variances 4 and 6: the batch range is 2 but the minimum is the running one, 0, so v = 2 and 3
    variances_4_and_6 = torch.tensor([[0.0, 2.0 * math.sqrt(2.0)], [0.0, 2.0 * math.sqrt(3.0)]])
    second = _step(trick, variances_4_and_6)
    torch.testing.assert_close(second, torch.exp(0.3 * torch.tensor([2.0, 3.0])) - 0.3)
    # the local mode uses the batch minimum: v = 0 and 1
    local = _step(BiasLoss(normalisation="local"), variances_4_and_6)
    torch.testing.assert_close(local, torch.exp(0.3 * torch.tensor([0.0, 1.0])) - 0.3)


def test_equal_variances_give_the_smallest_weight_and_state_round_trips():
    trick = BiasLoss(beta=0.2)
    torch.testing.assert_close(_step(trick, torch.tensor([[1.0, 3.0]])), torch.tensor([0.8]))  # one sample
    restored = BiasLoss()
    restored.load_state_dict(trick.state_dict())
    assert restored.global_min.item() == 2.0


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [({"alpha": -1.0}, ValueError), ({"beta": 1.0}, ValueError), ({"normalisation": "glob"}, ValueError)],
)
def test_bad_arguments_are_clear_errors(kwargs, error):
    with pytest.raises(error, match=next(iter(kwargs))):
        BiasLoss(**kwargs)


def test_bias_loss_trains_on_digits():
    pl.seed_everything(0, verbose=False)
    trick = BiasLoss()
    trainer = pl.Trainer(
        max_steps=4,
        limit_val_batches=1,
        callbacks=[trick],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    trainer.fit(Classifier(MLP(64, 10), num_classes=10), DigitsDataModule(batch_size=32))
    assert trainer.global_step == 4 and trainer.callback_metrics["train/loss"].isfinite()
    assert 0.7 <= float(trainer.callback_metrics["tricks/BiasLoss/weight"]) <= math.exp(0.3) - 0.3
    assert math.isfinite(trick.global_min.item()) and trick.global_min.item() >= 0.0
