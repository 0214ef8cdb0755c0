from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from conftest import PlainModule
from torch import nn

from lit_tricks import Classifier
from lit_tricks.callbacks.adversarial_training import AdversarialTraining
from lit_tricks.core.batch import StepOutput, TrickBatch
from lit_tricks.data import DigitsDataModule
from lit_tricks.functional.pgd import class_balanced_weights, pgd_attack
from lit_tricks.nets import MLP


def _linear_two_class():
    torch.manual_seed(0)
    model = nn.Linear(5, 2)
    x, y = torch.randn(8, 5), torch.tensor([0, 1, 0, 1, 1, 0, 1, 0])
    return model, x, y


def test_pgd_reaches_the_closed_form_optimum_of_a_linear_model():
    # two classes: the cross-entropy grows with the margin (w_other - w_y) . x, whose gradient has the same sign
    # at every x, so the worst L-inf perturbation is x + eps * sign(w_other - w_y), the corner of the ball
    model, x, y = _linear_two_class()
    eps = 0.3
    w = model.weight.detach()
    optimum = x + eps * (w[1 - y] - w[y]).sign()
    # one signed step of size eps from x (FGSM) and PGD from a random start with 3 steps of eps both reach it
    torch.testing.assert_close(pgd_attack(model, x, y, eps, eps, 1, random_start=False), optimum)
    gen = torch.Generator().manual_seed(3)
    torch.testing.assert_close(pgd_attack(model, x, y, eps, eps, 3, generator=gen), optimum)
    # too few steps from the random start stay inside: not yet optimal
    short = pgd_attack(model, x, y, eps, eps / 10, 2, generator=torch.Generator().manual_seed(3))
    assert (short - optimum).abs().max() > 0.1


def test_pgd_stays_in_the_ball_and_the_range_and_leaks_no_gradients():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))
    x, y = torch.rand(32, 6), torch.randint(0, 4, (32,))
    x_adv = pgd_attack(model, x, y, 0.2, 0.1, 5, generator=torch.Generator(), clamp_min=0.0, clamp_max=1.0)
    assert (x_adv - x).abs().max() <= 0.2 + 1e-6 and x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    assert not x_adv.requires_grad and all(p.grad is None for p in model.parameters())
    loss = nn.functional.cross_entropy
    assert loss(model(x_adv), y) > loss(model(x), y) + 0.05  # the attack raises the loss
    # unbounded by default; the same generator state gives the same attack
    a = pgd_attack(model, x, y, 0.5, 0.2, 3, generator=torch.Generator().manual_seed(1))
    b = pgd_attack(model, x, y, 0.5, 0.2, 3, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b)
    assert a.min() < 0.0 or a.max() > 1.0


def test_class_balanced_weights_by_hand():
    # beta = 1: inverse frequency, mean 1 over the samples: [1/30, 1/10] * 40 / 2
    torch.testing.assert_close(class_balanced_weights(torch.tensor([30, 10]), 1.0), torch.tensor([2 / 3, 2.0]))
    torch.testing.assert_close(class_balanced_weights(torch.tensor([30, 10]), 0.0), torch.ones(2))
    # beta = 0.5, counts [1, 2]: raw (0.5 / 0.5, 0.5 / 0.75) = (1, 2/3); sum n * raw = 7/3, so times 3 / (7/3)
    torch.testing.assert_close(class_balanced_weights(torch.tensor([1, 2]), 0.5), torch.tensor([9 / 7, 6 / 7]))


def _fake_trainer(epoch=0, log=False):
    return SimpleNamespace(
        current_epoch=epoch,
        fast_dev_run=False,
        _logger_connector=SimpleNamespace(should_update_logs=log),
        state=SimpleNamespace(stage=None),
    )


class _BNModule(Classifier):
    """A classifier with batch norm and dropout, to check the attack leaves both alone."""

    def __init__(self):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3))
        super().__init__(net, num_classes=3)


def test_the_attack_runs_in_eval_mode_and_resumes_from_the_generator_state():
    module = _BNModule()
    module.backbone[3].eval()  # a layer the user keeps in eval mode keeps it
    batch = TrickBatch(torch.randn(16, 6), torch.randint(0, 3, (16,)))
    bn = module.backbone[1]
    stats = (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
    trick = AdversarialTraining(eps=0.5, steps=3, seed=4)
    state = trick.state_dict()
    first = trick.before_forward(_fake_trainer(), module, TrickBatch(batch.inputs, batch.targets)).inputs
    assert module.training and module.backbone[1].training and not module.backbone[3].training
    for before, after in zip(stats, (bn.running_mean, bn.running_var, bn.num_batches_tracked), strict=True):
        torch.testing.assert_close(before, after)
    assert all(p.grad is None for p in module.parameters())
    assert not torch.equal(first, batch.inputs) and (first - batch.inputs).abs().max() <= 0.5 + 1e-6
    # a fresh trick loaded with the saved state draws the same start, hence the same adversarial batch
    again = AdversarialTraining(eps=0.5, steps=3, seed=99)
    again.load_state_dict(state)
    torch.testing.assert_close(
        again.before_forward(_fake_trainer(), module, TrickBatch(batch.inputs, batch.targets)).inputs, first
    )
    second = trick.before_forward(_fake_trainer(), module, TrickBatch(batch.inputs, batch.targets)).inputs
    assert not torch.equal(second, first)  # the generator moved on


def test_reweighting_starts_at_its_epoch_and_multiplies_existing_weights():
    module = _BNModule()
    trick = AdversarialTraining(steps=1, reweight_beta=1.0, reweight_from_epoch=2, class_counts=[30, 10, 40])
    trick.setup(SimpleNamespace(datamodule=None), module, "fit")
    targets = torch.tensor([0, 1, 2, 1])
    out = StepOutput(torch.zeros(4, 3), None, torch.ones(4))
    early = TrickBatch(torch.zeros(4, 6), targets)
    trick.after_loss(_fake_trainer(epoch=1), module, early, out)
    assert early.weight is None
    late = TrickBatch(torch.zeros(4, 6), targets, weight=torch.tensor([1.0, 2.0, 1.0, 1.0]))
    trick.after_loss(_fake_trainer(epoch=2), module, late, out)
    # inverse frequency with mean 1 over the 80 samples: w_c = 80 / (3 n_c)
    w = torch.tensor([80 / 90, 80 / 30, 80 / 120])
    torch.testing.assert_close(late.weight, w[targets] * torch.tensor([1.0, 2.0, 1.0, 1.0]))


def test_fit_on_long_tailed_digits_logs_the_attack(quiet_trainer_kwargs):
    pl.seed_everything(0, verbose=False)
    trick = AdversarialTraining(eps=0.1, steps=3, clamp_min=0.0, clamp_max=1.0, reweight_beta=0.9999)
    trainer = pl.Trainer(max_steps=6, log_every_n_steps=2, callbacks=[trick], **quiet_trainer_kwargs)
    datamodule = DigitsDataModule(batch_size=32, imbalance_ratio=10)
    trainer.fit(Classifier(MLP(64, 10, hidden=(32,)), num_classes=10), datamodule)
    metrics = trainer.callback_metrics
    assert 0.0 <= metrics["tricks/AdversarialTraining/success_rate"] <= 1.0
    assert 0.0 <= metrics["tricks/AdversarialTraining/adv_acc"] <= 1.0
    assert metrics["tricks/AdversarialTraining/adv_loss"].isfinite()
    counts = datamodule.train_class_counts
    torch.testing.assert_close(trick._class_weights, class_balanced_weights(counts, 0.9999))
    assert trick._class_weights[-1] > 5 * trick._class_weights[0]  # the tail class (rho = 10) is upweighted


def test_adversarial_training_raises_pgd_accuracy(quiet_trainer_kwargs):
    def pgd_accuracy(tricks):
        pl.seed_everything(0, verbose=False)
        model = Classifier(MLP(64, 10, hidden=(64,)), num_classes=10)
        datamodule = DigitsDataModule(batch_size=64, val_fraction=0.0)
        pl.Trainer(max_epochs=10, callbacks=tricks, **quiet_trainer_kwargs).fit(model, datamodule)
        x, y = datamodule.test_set.inputs, datamodule.test_set.targets
        model.eval()
        x_adv = pgd_attack(model, x, y, 0.1, 0.025, 10, generator=torch.Generator(), clamp_min=0.0, clamp_max=1.0)
        with torch.no_grad():
            return (model(x_adv).argmax(-1) == y).float().mean().item()

    plain = pgd_accuracy([])
    robust = pgd_accuracy([AdversarialTraining(eps=0.1, step_size=0.025, steps=5, clamp_min=0.0, clamp_max=1.0)])
    assert robust > plain + 0.08  # measured: 0.585 -> 0.708


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"eps": -0.1}, ValueError, "eps"),
        ({"steps": 0}, ValueError, "steps"),
        ({"step_size": float("nan")}, ValueError, "step_size"),
        ({"random_start": "yes"}, TypeError, "random_start"),
        ({"clamp_min": 1.0, "clamp_max": 0.0}, ValueError, "clamp_min"),
        ({"reweight_beta": 1.5}, ValueError, "reweight_beta"),
        ({"reweight_from_epoch": -1}, ValueError, "reweight_from_epoch"),
        ({"class_counts": [10, 0, 5]}, ValueError, "class_counts"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        AdversarialTraining(**kwargs)


def test_setup_errors(quiet_trainer_kwargs):
    # reweighting without class counts: a balanced data module has none
    trainer = pl.Trainer(max_steps=1, callbacks=[AdversarialTraining(reweight_beta=0.9999)], **quiet_trainer_kwargs)
    with pytest.raises(ValueError, match="class_counts"):
        trainer.fit(Classifier(MLP(64, 10), num_classes=10), DigitsDataModule())
    trick = AdversarialTraining(reweight_beta=1.0, class_counts=[5, 5, 5])
    trainer = pl.Trainer(max_steps=1, callbacks=[trick], **quiet_trainer_kwargs)
    with pytest.raises(ValueError, match="num_classes=10"):
        trainer.fit(Classifier(MLP(64, 10), num_classes=10), DigitsDataModule())
    trainer = pl.Trainer(max_steps=1, callbacks=[AdversarialTraining()], **quiet_trainer_kwargs)
    with pytest.raises(TypeError, match="TrickModule"):
        trainer.fit(PlainModule(), DigitsDataModule())
