import math

import lightning.pytorch as pl
import pytest
import torch

from lit_tricks import Classifier
from lit_tricks.callbacks.ldr import LDRLoss
from lit_tricks.data import DigitsDataModule
from lit_tricks.functional.ldr import aldr_kl_loss, aldr_lambdas, aldr_penalty, ldr_kl_loss, ldr_logits
from lit_tricks.nets import MLP


def test_ldr_kl_by_hand():
    # label 0, margin 0.1: d = [0, 0.1 + 1 - 0]; loss = lam * log(mean(exp(d / lam)))
    z = torch.tensor([[0.0, 1.0]])
    assert ldr_kl_loss(z, torch.tensor([0]), 1.0, 0.1).item() == pytest.approx(math.log((1 + math.exp(1.1)) / 2))
    assert ldr_kl_loss(z, torch.tensor([0]), 2.0, 0.0).item() == pytest.approx(2 * math.log((1 + math.exp(0.5)) / 2))
    # label 1: d = [0.1 + 0 - 1, 0]
    assert ldr_kl_loss(z, torch.tensor([1]), 1.0, 0.1).item() == pytest.approx(math.log((math.exp(-0.9) + 1) / 2))
    # a one-hot probability target is the class id; a per-sample lambda [N] acts row by row
    z2 = torch.tensor([[0.0, 1.0], [0.5, -0.5]])
    ids, onehot = torch.tensor([0, 1]), torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    torch.testing.assert_close(ldr_kl_loss(z2, ids, 1.0), ldr_kl_loss(z2, onehot, 1.0))
    per_row = ldr_kl_loss(z2, ids, torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(per_row[1], ldr_kl_loss(z2[1:], ids[1:], 2.0)[0])


def test_ldr_kl_is_stable_and_tends_to_the_hinge():
    # exp(500) overflows float32; the shifted log-sum-exp matches the float64 value
    z, y, lam = torch.tensor([[50.0, 0.0, 10.0]]), torch.tensor([1]), 0.1
    d = torch.tensor([0.1 + 50.0, 0.0, 0.1 + 10.0], dtype=torch.float64)
    exact = lam * (torch.log(torch.exp(d / lam).mean()))
    assert ldr_kl_loss(z, y, lam).item() == pytest.approx(exact.item(), rel=1e-6)
    # lambda -> 0: the largest margin violation minus lam log C (Crammer-Singer hinge)
    assert ldr_kl_loss(z, y, 1e-3).item() == pytest.approx(50.1 - 1e-3 * math.log(3), rel=1e-6)
    # lambda large: the mean violation plus its variance / (2 lambda) (the cumulant expansion)
    d = torch.tensor([50.1, 0.0, 10.1])
    assert ldr_kl_loss(z, y, 1e3).item() == pytest.approx(d.mean() + d.var(unbiased=False) / 2e3, abs=1e-2)


def test_softplus_and_normalisation_by_hand():
    x = torch.tensor([[0.0, math.log(math.e - 1)]])  # softplus -> [log 2, 1]
    sp = torch.tensor([[math.log(2.0), 1.0]])
    torch.testing.assert_close(ldr_logits(x, softplus=True, normalise=False), sp)
    torch.testing.assert_close(ldr_logits(x, softplus=True, normalise=True), sp / sp.mean())
    # without softplus the scale is the mean absolute value (the authors' L1 norm / C)
    torch.testing.assert_close(ldr_logits(torch.tensor([[-1.0, 3.0]]), False, True), torch.tensor([[-0.5, 1.5]]))
    torch.testing.assert_close(ldr_logits(torch.zeros(1, 3), False, True), torch.zeros(1, 3))  # no 0/0


def test_aldr_lambda_update_by_hand():
    # uniform prediction: KL 0, lambda stays lambda_0
    torch.testing.assert_close(aldr_lambdas(torch.ones(1, 4), torch.tensor([0.7]), 2.0, 2.0), torch.tensor([2.0]))
    # a confident two-class prediction: p = (1 + 1e-5, 1e-5) / (1 + 2e-5), KL = sum p log(2p)
    p = [(1 + 1e-5) / (1 + 2e-5), 1e-5 / (1 + 2e-5)]
    kl = sum(q * math.log(2 * q) for q in p)
    lam = aldr_lambdas(torch.tensor([[100.0, 0.0]]), torch.tensor([1.0]), 1.0, 2.0)
    assert lam.item() == pytest.approx(1.0 - kl / (2.0 * math.log(2)), rel=1e-5)
    assert 0.5 < lam.item() < 0.51  # just above lambda_0 (1 - 1/alpha)
    # the previous lambda tempers the softmax: softmax([1, 0] / 0.5) = softmax([2, 0])
    q = torch.tensor([2.0, 0.0]).softmax(0) + 1e-5
    q = q / q.sum()
    kl = float((q * torch.log(2 * q)).sum())
    lam = aldr_lambdas(torch.tensor([[1.0, 0.0]]), torch.tensor([0.5]), 1.0, 4.0)
    assert lam.item() == pytest.approx(1.0 - kl / (4.0 * math.log(2)), rel=1e-5)


def test_aldr_penalty_is_a_constant():
    lambdas = torch.tensor([0.5, 1.0], requires_grad=True)
    penalty = aldr_penalty(lambdas, 1.0, 2.0, 4)
    torch.testing.assert_close(penalty, torch.tensor([-0.5 * 2 * math.log(4) * 0.25, 0.0]))
    assert not penalty.requires_grad
    z = torch.tensor([[0.0, 1.0]])
    expected = ldr_kl_loss(z, torch.tensor([0]), 0.5) - 0.5 * 2.0 * math.log(2) / 1.0 * 0.25
    torch.testing.assert_close(aldr_kl_loss(z, torch.tensor([0]), torch.tensor([0.5]), 1.0, 2.0), expected)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"lam": 0.0}, ValueError),
        ({"margin": -0.1}, ValueError),
        ({"alpha": 1.0}, ValueError),
        ({"adaptive": 1}, TypeError),
        ({"softplus": "yes"}, TypeError),
        ({"table_dtype": "float64"}, ValueError),
    ],
)
def test_bad_arguments_are_clear_errors(kwargs, error):
    with pytest.raises(error, match=next(iter(kwargs))):
        LDRLoss(**kwargs)


def test_authors_defaults_per_variant():
    assert LDRLoss().softplus and not LDRLoss(adaptive=True).softplus and LDRLoss(adaptive=True, softplus=True).softplus
    assert not LDRLoss().needs_index and LDRLoss(adaptive=True).needs_index


def _fit(trick, steps=4):
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
    trainer.fit(Classifier(MLP(64, 10), num_classes=10), DigitsDataModule(batch_size=32, label_noise=0.4))
    return trainer


def test_ldr_kl_trains_on_digits():
    trainer = _fit(LDRLoss(lam=1.0))
    assert trainer.global_step == 4 and trainer.callback_metrics["train/loss"].isfinite()


def test_aldr_kl_trains_and_its_table_round_trips():
    trick = LDRLoss(lam=1.0, adaptive=True, alpha=2.0)
    trainer = _fit(trick)
    table = trick.lambdas
    assert int(table.seen.sum()) == 4 * 32 and table.values.shape[1] == 1
    seen = table.values[table.seen, 0]
    assert bool((seen > 0.5).all() and (seen <= 1.0).all())  # in (lambda_0 (1 - 1/alpha), lambda_0]
    assert 0.5 < float(trainer.callback_metrics["tricks/LDRLoss/lambda"]) <= 1.0
    restored = LDRLoss(lam=1.0, adaptive=True)
    restored.load_state_dict(trick.state_dict())
    torch.testing.assert_close(restored.lambdas.values, table.values)
    assert torch.equal(restored.lambdas.seen, table.seen)
    assert LDRLoss().state_dict() == {}
