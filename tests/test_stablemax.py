"""StableMax cross-entropy and the perpendicular gradient (Grokking at the Edge of Numerical Stability)."""

import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lit_tricks import Classifier
from lit_tricks.callbacks.perp_grad import PerpendicularGradient, perpendicular_grad_
from lit_tricks.data import DigitsDataModule
from lit_tricks.functional.stablemax import log_stablemax, stablemax, stablemax_cross_entropy, stablemax_s
from lit_tricks.nets import MLP

# s(-1, 0, 1, 3) = (1/2, 1, 2, 4), sum 15/2 -> p = (1, 2, 4, 8) / 15
LOGITS = torch.tensor([[-1.0, 0.0, 1.0, 3.0]])
PROBS64 = torch.tensor([[1.0, 2.0, 4.0, 8.0]], dtype=torch.float64) / 15
PROBS = PROBS64.float()


def test_stablemax_by_hand():
    assert torch.equal(stablemax_s(LOGITS), torch.tensor([[0.5, 1.0, 2.0, 4.0]]))
    p = stablemax(LOGITS)
    assert p.dtype == torch.float32
    torch.testing.assert_close(p, PROBS, rtol=0, atol=1e-7)
    torch.testing.assert_close(log_stablemax(LOGITS), PROBS64.log(), rtol=0, atol=1e-12)
    assert log_stablemax(LOGITS).dtype == torch.float64  # the authors' float64 arithmetic
    torch.testing.assert_close(stablemax(LOGITS.t(), dim=0), PROBS.t(), rtol=0, atol=1e-7)


def test_stablemax_cross_entropy_by_hand():
    logits = LOGITS.repeat(2, 1)
    loss = stablemax_cross_entropy(logits, torch.tensor([3, 0]))
    assert loss.dtype == torch.float32 and loss.shape == (2,)
    torch.testing.assert_close(loss, torch.tensor([math.log(15 / 8), math.log(15)]), rtol=0, atol=1e-6)
    soft = torch.tensor([[0.0, 0.0, 0.5, 0.5], [1.0, 0.0, 0.0, 0.0]])
    expected = torch.tensor([0.5 * math.log(15 / 4) + 0.5 * math.log(15 / 8), math.log(15)])
    torch.testing.assert_close(stablemax_cross_entropy(logits, soft), expected, rtol=0, atol=1e-6)
    in_float32 = stablemax_cross_entropy(logits, torch.tensor([3, 0]), compute_dtype=None)
    torch.testing.assert_close(in_float32, loss, rtol=0, atol=1e-6)


def test_stablemax_gradient_is_finite_where_the_unused_branch_would_divide_by_zero():
    logits = torch.tensor([[1.0, -2.0, 0.0]], requires_grad=True)
    stablemax_cross_entropy(logits, torch.tensor([0])).sum().backward()
    # d/dx of -log s(x_0) + log sum s = -1/2 + 1/(2 + 1/3 + 1); x_1: s' = 1/9; x_2: s' = 1
    sum_s = 2 + 1 / 3 + 1
    expected = torch.tensor([[-1 / 2 + 1 / sum_s, (1 / 9) / sum_s, 1 / sum_s]])
    torch.testing.assert_close(logits.grad, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("logits", "targets", "error", "match"),
    [
        (torch.tensor([[1, 2]]), torch.tensor([0]), TypeError, "floating-point"),
        (torch.zeros(2, 3, 4), torch.tensor([0, 1]), ValueError, r"\[N, C\]"),
        (torch.zeros(2, 3), torch.tensor([0.0, 1.0]), ValueError, "integer tensor"),
        (torch.zeros(2, 3), torch.tensor([0, 1, 2]), ValueError, "integer tensor"),
        (torch.zeros(2, 3), torch.zeros(2, 4), ValueError, "probabilities"),
    ],
)
def test_stablemax_cross_entropy_bad_input(logits, targets, error, match):
    with pytest.raises(error, match=match):
        stablemax_cross_entropy(logits, targets)


# ---------------------------------------------------------------- perpendicular gradient
def test_perpendicular_grad_by_hand():
    # w = (3, 4), g = (1, 0): <w, g> / |w|^2 = 3/25 -> g_perp = (0.64, -0.48), |g_perp| = 0.8
    w = torch.tensor([3.0, 4.0], requires_grad=True)
    zero = torch.zeros(2, requires_grad=True)  # w = 0: nothing to remove, g kept
    no_grad = torch.ones(3, requires_grad=True)
    w.grad, zero.grad = torch.tensor([1.0, 0.0]), torch.tensor([1.0, 2.0])
    perpendicular_grad_([w, zero, no_grad], rescale=False)
    torch.testing.assert_close(w.grad, torch.tensor([0.64, -0.48]), rtol=0, atol=1e-7)
    assert torch.equal(zero.grad, torch.tensor([1.0, 2.0])) and no_grad.grad is None
    w.grad = torch.tensor([1.0, 0.0])
    perpendicular_grad_([w])  # rescaled to |g| = 1 (the authors' code)
    torch.testing.assert_close(w.grad, torch.tensor([0.8, -0.6]), rtol=0, atol=1e-7)


def test_perpendicular_grad_is_orthogonal_per_tensor_and_keeps_the_norm():
    torch.manual_seed(0)
    params = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in [(5, 3), (7,), (2, 3, 4)]]
    for p in params:
        p.grad = torch.randn_like(p)
    norms = [p.grad.norm() for p in params]
    perpendicular_grad_(params)
    for p, n in zip(params, norms, strict=True):
        assert abs(torch.dot(p.detach().flatten(), p.grad.flatten())) < 1e-12
        torch.testing.assert_close(p.grad.norm(), n, rtol=1e-12, atol=0)


def test_perpendicular_gradient_bad_input():
    with pytest.raises(TypeError, match="rescale"):
        PerpendicularGradient(rescale="yes")
    with pytest.raises(ValueError, match="eps"):
        PerpendicularGradient(eps=-1.0)


class _CosineProbe(Callback):
    """Records the largest |cos(w, g)| the optimizer sees (runs after PerpendicularGradient)."""

    def __init__(self):
        self.worst, self.calls = 0.0, 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.calls += 1
        for p in pl_module.parameters():
            cos = torch.dot(p.detach().flatten(), p.grad.flatten()) / (p.detach().norm() * p.grad.norm())
            self.worst = max(self.worst, cos.abs().item())


def test_fit_a_classifier_with_perpendicular_gradient(quiet_trainer_kwargs):
    pl.seed_everything(0, verbose=False)
    probe = _CosineProbe()
    model = Classifier(MLP(64, 10, hidden=(16,)), num_classes=10)
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=4, limit_val_batches=0,
                         callbacks=[PerpendicularGradient(), probe], **quiet_trainer_kwargs)  # fmt: skip
    trainer.fit(model, DigitsDataModule(batch_size=32))
    assert trainer.global_step == 4 and probe.calls == 4 and probe.worst < 1e-5


class _LossProbe(Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].detach())


class _StableMaxClassifier(Classifier):
    def per_sample_loss(self, logits, targets):
        return stablemax_cross_entropy(logits, targets)


def test_fit_with_stablemax_loss_and_perpendicular_gradient(quiet_trainer_kwargs):
    pl.seed_everything(0, verbose=False)
    model = _StableMaxClassifier(MLP(64, 10, hidden=(16,)), num_classes=10)
    probe = _LossProbe()
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=4, limit_val_batches=0,
                         callbacks=[PerpendicularGradient(), probe], **quiet_trainer_kwargs)  # fmt: skip
    trainer.fit(model, DigitsDataModule(batch_size=32))
    assert len(probe.losses) == 4
    assert all(torch.isfinite(loss) and loss.dtype == torch.float32 for loss in probe.losses)


def test_perpendicular_gradient_options_are_checked():
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="eps must be a finite number"):
            PerpendicularGradient(eps=bad)
        with pytest.raises(ValueError, match="eps must be a finite number"):
            perpendicular_grad_([], eps=bad)
    with pytest.raises(TypeError, match="rescale must be a bool"):
        PerpendicularGradient(rescale="yes")
