import math

import lightning.pytorch as pl
import pytest
import torch

from lit_tricks import Classifier
from lit_tricks.callbacks.adawac import AdaWAC
from lit_tricks.data import DigitsDataModule
from lit_tricks.functional.adawac import adawac_consistency, adawac_objective, adawac_weights
from lit_tricks.nets import MLP


def test_mirror_descent_step_by_hand():
    weights = torch.tensor([[0.5, 0.5], [0.2, 0.8]])
    supervised, consistency = torch.tensor([1.0, 0.0]), torch.tensor([0.5, 1.0])
    new = adawac_weights(weights, supervised, consistency, step_size=2.0)
    # row 0: 0.5 e^2 / (0.5 e^2 + 0.5 e^1) = e / (e + 1); row 1: 0.2 / (0.2 + 0.8 e^2)
    expected0 = math.e / (math.e + 1)
    expected1 = 0.2 / (0.2 + 0.8 * math.exp(2.0))
    torch.testing.assert_close(new, torch.tensor([[expected0, 1 - expected0], [expected1, 1 - expected1]]))
    # step 0 keeps the weights; a sample with a larger supervised loss moves weight to the supervised term
    torch.testing.assert_close(adawac_weights(weights, supervised, consistency, 0.0), weights)
    # losses that overflow exp() in float32 (e^800) still give a point of the simplex
    big = adawac_weights(torch.tensor([[0.5, 0.5]]), torch.tensor([100.0]), torch.tensor([0.0]), 8.0)
    torch.testing.assert_close(big, torch.tensor([[1.0, 0.0]]))


def test_objective_and_consistency_by_hand():
    a = torch.tensor([[0.0, 2.0], [1.0, 1.0]], requires_grad=True)
    b = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    consistency = adawac_consistency(a, b)  # mean squared difference per sample: (1 + 4) / 2, 0
    torch.testing.assert_close(consistency, torch.tensor([2.5, 0.0]))
    supervised = torch.tensor([2.0, 3.0], requires_grad=True)
    weights = torch.tensor([[0.75, 0.25], [0.1, 0.9]], requires_grad=True)
    objective = adawac_objective(supervised, consistency, weights)
    torch.testing.assert_close(objective, torch.tensor([0.75 * 2.0 + 0.25 * 2.5, 0.1 * 3.0]))
    objective.sum().backward()
    torch.testing.assert_close(supervised.grad, torch.tensor([0.75, 0.1]))
    assert weights.grad is None  # the weights are constants of the model's step
    # d/da of 0.25 * mean((a - b)^2) over 2 dims = 0.25 * (a - b)
    torch.testing.assert_close(a.grad, torch.tensor([[-0.25, 0.5], [0.0, 0.0]]))
    with pytest.raises(ValueError, match="same shape"):
        adawac_consistency(torch.zeros(2, 3), torch.zeros(2, 4))


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"step_size": -1.0}, ValueError),
        ({"step_size": float("nan")}, ValueError),
        ({"consistency_weight": -0.5}, ValueError),
        ({"augment": "noise"}, TypeError),
        ({"consistency_on": "latents"}, ValueError),
        ({"augment_first_view": 1}, TypeError),
        ({"table_dtype": "float64"}, ValueError),
    ],
)
def test_bad_arguments_are_clear_errors(kwargs, error):
    with pytest.raises(error, match=next(iter(kwargs))):
        AdaWAC(**kwargs)


def _fit(trick, steps=4, model=None):
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        max_steps=steps,
        limit_val_batches=1,
        callbacks=[trick],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    model = model or Classifier(MLP(64, 10, hidden=(32,)), num_classes=10)
    trainer.fit(model, DigitsDataModule(batch_size=32, label_noise=0.4))
    return trainer


def test_fit_updates_the_weights_of_the_samples_seen_and_state_round_trips():
    trick = AdaWAC(step_size=1.0, consistency_weight=1.0)
    trainer = _fit(trick)
    table = trick.weights
    assert trainer.global_step == 4 and trainer.callback_metrics["train/loss"].isfinite()
    assert table.values.shape[1] == 2 and int(table.seen.sum()) == 4 * 32
    seen = table.values[table.seen]
    torch.testing.assert_close(seen.sum(dim=1), torch.ones(len(seen)))  # on the simplex
    assert not torch.allclose(seen[:, 0], torch.full_like(seen[:, 0], 0.5))  # moved from the start
    assert torch.equal(table.values[~table.seen], torch.zeros_like(table.values[~table.seen]))
    metrics = trainer.callback_metrics
    assert 0.0 < float(metrics["tricks/AdaWAC/supervised_weight"]) < 1.0
    assert float(metrics["tricks/AdaWAC/consistency"]) > 0.0 and float(metrics["tricks/AdaWAC/supervised"]) > 0.0
    restored = AdaWAC()
    restored.load_state_dict(trick.state_dict())
    torch.testing.assert_close(restored.weights.values, table.values)
    assert torch.equal(restored.weights.seen, table.seen)
    assert AdaWAC().state_dict() == {}


def test_identical_views_have_no_consistency_so_weight_moves_to_the_supervised_term():
    # without augmentation (and no dropout) both views give the same logits: l_AC = 0, so each seen sample's
    # supervised weight is e^(eta CE) / (e^(eta CE) + 1) > 1/2, and the objective is that weight times the CE
    trick = AdaWAC(step_size=0.5, augment=lambda x: x, consistency_on="logits")
    trainer = _fit(trick, steps=1)
    seen = trick.weights.values[trick.weights.seen]
    assert len(seen) == 32 and bool((seen[:, 0] > 0.5).all())
    assert float(trainer.callback_metrics["tricks/AdaWAC/consistency"]) == 0.0
    # the CE behind each weight, recovered from w0 = sigmoid(eta CE), matches the logged mean supervised loss
    ce = torch.logit(seen[:, 0].double()) / 0.5
    assert ce.mean().item() == pytest.approx(float(trainer.callback_metrics["tricks/AdaWAC/supervised"]), rel=1e-4)


def test_augment_of_the_wrong_shape_is_a_clear_error():
    with pytest.raises(ValueError, match="augment must return a tensor of the inputs' shape"):
        _fit(AdaWAC(augment=lambda x: x[:, :10]), steps=1)


def test_first_view_is_augmented_unless_told_otherwise():
    from lit_tricks.core.batch import TrickBatch

    x, y = torch.zeros(3, 4), torch.tensor([0, 1, 2])
    shifted = AdaWAC(augment=lambda inputs: inputs + 1.0)
    batch = shifted.before_forward(None, None, TrickBatch(x, y, torch.arange(3)))
    assert torch.equal(batch.inputs, x + 1.0) and batch.extras["adawac_inputs"] is x  # view 2 is drawn from x
    plain = AdaWAC(augment=lambda inputs: inputs + 1.0, augment_first_view=False)
    batch = plain.before_forward(None, None, TrickBatch(x, y, torch.arange(3)))
    assert batch.inputs is x and batch.extras == {}
    assert AdaWAC().needs_features and not AdaWAC(consistency_on="logits").needs_features
