import math

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lit_tricks import ELR, Classifier, Trick
from lit_tricks.data import DigitsDataModule
from lit_tricks.functional import elr_penalty, elr_probabilities, elr_targets
from lit_tricks.nets import MLP


def test_elr_math_by_hand():
    probs = torch.tensor([[0.75, 0.25]])
    torch.testing.assert_close(elr_targets(torch.zeros(1, 2), probs, 0.7), torch.tensor([[0.225, 0.075]]))
    torch.testing.assert_close(elr_targets(torch.tensor([[1.0, 0.0]]), probs, 0.5), torch.tensor([[0.875, 0.125]]))
    targets = torch.tensor([[0.5, 0.5]], requires_grad=True)
    p = probs.clone().requires_grad_(True)
    penalty = elr_penalty(p, targets)
    assert penalty.item() == pytest.approx(math.log(0.5))
    penalty.sum().backward()
    assert targets.grad is None and p.grad is not None  # the gradient flows through p only
    clamped = elr_probabilities(torch.tensor([[100.0, -100.0]]).softmax(dim=-1))
    torch.testing.assert_close(clamped, torch.tensor([[1 - 1e-4, 1e-4]]))


class Before(Trick):
    """Runs its after_loss before ELR's and keeps what ELR will read."""

    order = -5

    def __init__(self, elr):
        self.elr, self.seen = elr, None

    def after_loss(self, trainer, module, batch, out):
        self.seen = (batch.index.clone(), self.elr.targets.values[batch.index].clone(), out.logits.detach().clone())
        return out


def test_elr_in_a_real_fit(quiet_trainer_kwargs):
    pl.seed_everything(0, verbose=False)
    elr = ELR(beta=0.7, lam=3.0)
    before = Before(elr)
    trainer = pl.Trainer(
        max_epochs=2, limit_train_batches=3, limit_val_batches=0, callbacks=[elr, before], **quiet_trainer_kwargs
    )
    trainer.fit(Classifier(MLP(64, 10, hidden=(16,)), num_classes=10), DigitsDataModule(batch_size=16, label_noise=0.4))
    index, previous, logits = before.seen
    p = elr_probabilities(logits.softmax(dim=-1))
    expected_targets = 0.7 * previous + 0.3 * p / p.sum(dim=1, keepdim=True)
    torch.testing.assert_close(elr.targets.values[index], expected_targets)
    expected_term = 3.0 * torch.log(1 - (expected_targets * p).sum(dim=1)).mean()
    torch.testing.assert_close(trainer.callback_metrics["train/elr_log_regulariser"], expected_term)


def test_elr_needs_index_and_good_arguments(quiet_trainer_kwargs):
    loader = DataLoader(TensorDataset(torch.randn(32, 64), torch.randint(0, 10, (32,))), batch_size=8)
    with pytest.raises(ValueError, match="ELR keep per-sample memories and need dataset indices"):
        pl.Trainer(max_steps=1, callbacks=[ELR()], **quiet_trainer_kwargs).fit(Classifier(MLP(64, 10), 10), loader)
    with pytest.raises(ValueError, match=r"beta must be a finite number in \[0.0, 1.0\)"):
        ELR(beta=1.0)
    with pytest.raises(ValueError, match=r"lam must be a finite number in \[0.0, inf\)"):
        ELR(lam=-1.0)
    with pytest.raises(ValueError, match="lam must be a finite number"):
        ELR(lam=float("nan"))
