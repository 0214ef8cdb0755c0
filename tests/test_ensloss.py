import math

import lightning.pytorch as pl
import pytest
import torch
import yaml
from conftest import ROOT
from jsonargparse import ArgumentParser

from lit_tricks import Classifier, Trick
from lit_tricks.callbacks.ensloss import EnsLoss
from lit_tricks.data import DigitsDataModule
from lit_tricks.functional.ensloss import box_cox_inverse, ensloss_derivatives, ensloss_loss, ensloss_margins
from lit_tricks.nets import MLP

EPS = 1e-6


def test_derivatives_by_hand():
    # draws exp(0)=1, exp(-ln 2)=1/2, exp(-ln 4)=1/4: the largest goes to the smallest margin (-1), the smallest
    # to the largest (2), which is past 1 and so divided by it
    margins = torch.tensor([2.0, -1.0, 0.5])
    noise = torch.tensor([-math.log(4.0), 0.0, -math.log(2.0)])
    expected = torch.tensor([-0.25 / 2.0, -1.0, -0.5]) - EPS
    torch.testing.assert_close(ensloss_derivatives(margins, noise), expected)
    # a draw above 1 (exp(1)) is clipped to 1; two margins past 1 are both divided
    g = ensloss_derivatives(torch.tensor([4.0, 3.0]), torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(g, torch.tensor([-1.0 / 4.0, -1.0 / 3.0]) - EPS)


def test_box_cox_inverse_by_hand():
    z = torch.tensor([-2.0, 0.0, 1.0])
    torch.testing.assert_close(box_cox_inverse(z, 0.0), z.exp())
    torch.testing.assert_close(box_cox_inverse(z, 0.5), torch.tensor([0.0, 1.0, 2.25]))  # max(1 + z/2, 0)^2
    torch.testing.assert_close(box_cox_inverse(z, -1.0), torch.tensor([1.0 / 3.0, 1.0, math.inf]))  # 1/(1 - z)
    # a magnitude of 0 (lambda 0.5, z = -2) still gives a negative derivative: the shift keeps phi'(0) < 0
    g = ensloss_derivatives(torch.tensor([0.0, 0.3]), torch.tensor([-2.0, 0.0]), lam=0.5)
    torch.testing.assert_close(g, torch.tensor([-1.0 - EPS, -EPS]))


@pytest.mark.parametrize("lam", [0.0, 0.5, -0.5, 1.0, -1.0])
def test_every_sampled_loss_is_convex_and_calibrated(lam):
    generator = torch.Generator().manual_seed(3)
    for _ in range(20):
        margins = 3.0 * torch.randn(64, 5, generator=generator)
        g = ensloss_derivatives(margins, torch.randn(64, 5, generator=generator), lam)
        assert bool((g < 0).all()) and bool((g >= -1.0 - EPS).all())  # calibrated: phi' < 0 everywhere
        order = margins.argsort(dim=0)
        assert bool((g.gather(0, order).diff(dim=0) >= 0).all())  # convex: phi' does not decrease with the margin


def test_margins_binary_and_one_vs_rest():
    logits = torch.tensor([[1.0, 3.0], [0.5, -1.5]])
    assert ensloss_margins(logits, torch.tensor([1, 1]))[1] is None
    torch.testing.assert_close(ensloss_margins(logits, torch.tensor([1, 1]))[0], torch.tensor([2.0, -2.0]))
    torch.testing.assert_close(ensloss_margins(logits, torch.tensor([0, 0]))[0], torch.tensor([-2.0, 2.0]))
    logits = torch.tensor([[1.0, -2.0, 0.5]])
    torch.testing.assert_close(ensloss_margins(logits, torch.tensor([1]))[0], torch.tensor([[-1.0, -2.0, -0.5]]))


def test_probability_targets_use_the_expected_loss():
    # p phi(z) + (1 - p) phi(-z) per class column; margins z over -z, weights p over 1 - p
    logits = torch.tensor([[2.0, -1.0, 0.0]], requires_grad=True)
    targets = torch.tensor([[0.75, 0.25, 0.0]])
    margins, weights = ensloss_margins(logits, targets)
    torch.testing.assert_close(margins, torch.tensor([[2.0, -1.0, 0.0], [-2.0, 1.0, -0.0]]))
    torch.testing.assert_close(weights, torch.tensor([[0.75, 0.25, 0.0], [0.25, 0.75, 1.0]]))
    loss = ensloss_loss(margins, torch.zeros(2, 3), weights=weights)  # magnitudes 1: g = -1, or -1/s past 1
    g = torch.tensor([[-0.5, -1.0, -1.0], [-1.0, -1.0, -1.0]]) - EPS
    torch.testing.assert_close(loss, (weights * g * margins).sum().reshape(1))
    loss.sum().backward()
    torch.testing.assert_close(logits.grad, (weights[0] * g[0] - weights[1] * g[1])[None])
    # two classes: the score is z1 - z0 and p the probability of class 1
    margins, weights = ensloss_margins(torch.tensor([[0.0, 3.0]]), torch.tensor([[0.2, 0.8]]))
    torch.testing.assert_close(margins, torch.tensor([3.0, -3.0]))
    torch.testing.assert_close(weights, torch.tensor([0.8, 0.2]))


def test_loss_value_and_gradient_follow_the_formula():
    logits = torch.tensor([[2.0, -1.0, 0.5], [-0.5, 3.0, 1.0]], requires_grad=True)
    targets = torch.tensor([0, 2])
    noise = torch.zeros(2, 3)  # every magnitude 1: g = -1 where s <= 1, -1/s where s > 1, minus the shift
    loss = ensloss_loss(ensloss_margins(logits, targets)[0], noise)
    # margins [[2, 1, -0.5], [0.5, -3, 1]] -> g [[-1/2, -1, -1], [-1, -1, -1]] (minus EPS)
    g = torch.tensor([[-0.5, -1.0, -1.0], [-1.0, -1.0, -1.0]]) - EPS
    s = torch.tensor([[2.0, 1.0, -0.5], [0.5, -3.0, 1.0]])
    torch.testing.assert_close(loss, (g * s).sum(dim=1))
    loss.sum().backward()
    signs = torch.tensor([[1.0, -1.0, -1.0], [-1.0, -1.0, 1.0]])
    torch.testing.assert_close(logits.grad, g * signs)  # d l / d z_k = g_k y_k


def test_binary_gradient_is_on_the_logit_difference():
    logits = torch.tensor([[0.0, 3.0], [1.0, 0.0]], requires_grad=True)
    loss = ensloss_loss(ensloss_margins(logits, torch.tensor([1, 1]))[0], torch.zeros(2))
    loss.sum().backward()
    g = torch.tensor([-1.0 / 3.0, -1.0]) - EPS  # margins 3 and -1
    torch.testing.assert_close(logits.grad, torch.stack([-g, g], dim=1))


class Record(Trick):
    """Runs after EnsLoss and keeps what it produced."""

    def __init__(self):
        self.seen = []

    def after_loss(self, trainer, module, batch, out):
        self.seen.append((out.logits.detach().clone(), batch.targets.clone(), out.per_sample_loss.detach().clone()))
        return out


def _fit(quiet_trainer_kwargs, trick, steps=3):
    pl.seed_everything(0, verbose=False)
    record = Record()
    trainer = pl.Trainer(max_steps=steps, limit_val_batches=0, callbacks=[record, trick], **quiet_trainer_kwargs)
    trainer.fit(Classifier(MLP(64, 10, hidden=(16,)), num_classes=10), DigitsDataModule(batch_size=16, label_noise=0.4))
    return trainer, record.seen


def test_in_a_real_fit_the_draws_come_from_the_seeded_generator(quiet_trainer_kwargs):
    _, seen = _fit(quiet_trainer_kwargs, EnsLoss(seed=5))
    generator = torch.Generator().manual_seed(5)
    for logits, targets, loss in seen:
        margins, _ = ensloss_margins(logits, targets)
        expected = ensloss_loss(margins, torch.randn(margins.shape, generator=generator))
        torch.testing.assert_close(loss, expected)
    # the same seed reproduces the run; another seed draws other losses
    _, again = _fit(quiet_trainer_kwargs, EnsLoss(seed=5))
    _, other = _fit(quiet_trainer_kwargs, EnsLoss(seed=6))
    assert all(torch.equal(a[2], b[2]) for a, b in zip(seen, again, strict=True))
    assert not torch.equal(seen[0][2], other[0][2])


def test_state_dict_continues_the_draws():
    first = EnsLoss(seed=1)
    torch.randn(7, generator=first._generator)
    second = EnsLoss(seed=2)
    second.load_state_dict(first.state_dict())
    assert torch.equal(torch.randn(4, generator=first._generator), torch.randn(4, generator=second._generator))


def test_yaml_snippet_builds_the_trick():
    entry = yaml.safe_load((ROOT / "configs/tricks/ensloss.yaml").read_text())["trainer"]["callbacks+"][0]
    assert entry["class_path"] == "lit_tricks.EnsLoss"
    parser = ArgumentParser()
    parser.add_class_arguments(EnsLoss, "trick")
    config = parser.parse_object({"trick": entry["init_args"]})
    trick = parser.instantiate_classes(config)["trick"]
    assert isinstance(trick, EnsLoss) and trick.boxcox_lambda == 0.0


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match=r"boxcox_lambda must be a finite number in \[-1.0, 1.0\]"):
        EnsLoss(boxcox_lambda=2.0)
    with pytest.raises(ValueError, match="boxcox_lambda must be a finite number"):
        EnsLoss(boxcox_lambda=float("nan"))
    with pytest.raises(TypeError, match="seed must be an integer"):
        EnsLoss(seed=1.5)
    with pytest.raises(ValueError, match="probability targets must have the logits' shape"):
        ensloss_margins(torch.zeros(2, 3), torch.full((2, 4), 1 / 4))
    with pytest.raises(ValueError, match="integer class ids"):
        ensloss_margins(torch.zeros(2, 3), torch.zeros(2))
    with pytest.raises(ValueError, match=r"C >= 2"):
        ensloss_margins(torch.zeros(2, 1), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="noise must have the shape of margins"):
        ensloss_derivatives(torch.zeros(3), torch.zeros(4))
