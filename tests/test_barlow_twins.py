"""Barlow Twins and MixBT: the loss and the MixBT targets by hand, the references' formulas, the module's step
against a recomputation, the probe kept off the encoder, a real fit, the generators' state, bad input."""

from __future__ import annotations

import copy
import math

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lit_tricks.data import DigitsDataModule
from lit_tricks.functional.barlow_twins import (
    barlow_twins_loss,
    cross_correlation,
    mixbt_loss,
    mixbt_targets,
    standardise,
)
from lit_tricks.functional.mixing import sample_mixing
from lit_tricks.modules.barlow_twins import BarlowTwins
from lit_tricks.nets import MLP

A = torch.tensor([1.0, 1.0, -1.0, -1.0])  # three orthogonal +-1 columns: mean 0, biased variance 1
B = torch.tensor([1.0, -1.0, 1.0, -1.0])
C = torch.tensor([1.0, -1.0, -1.0, 1.0])


def _trainer(**kwargs) -> pl.Trainer:
    defaults = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    return pl.Trainer(**(defaults | kwargs))


def test_barlow_twins_loss_by_hand_on_a_4x3_pair():
    z1 = 3.0 * torch.stack([A, B, C], dim=1) + 2.0  # scale and shift: standardised back to [A, B, C]
    z2 = torch.stack(
        [A, B, torch.tensor([2.0, 0.0, 0.0, -2.0])], dim=1
    )  # third column standardises to sqrt2*(1,0,0,-1)
    # C = z1^T z2 / 4 = [[1, 0, sqrt2/2], [0, 1, sqrt2/2], [0, 0, 0]]
    r = math.sqrt(2) / 2
    expected_c = torch.tensor([[1.0, 0.0, r], [0.0, 1.0, r], [0.0, 0.0, 0.0]])
    c = cross_correlation(standardise(z1, eps=0.0), standardise(z2, eps=0.0))
    torch.testing.assert_close(c, expected_c, atol=1e-6, rtol=0)
    # on-diagonal: 0 + 0 + (1 - 0)^2 = 1; off-diagonal: r^2 + r^2 = 1
    assert barlow_twins_loss(z1, z2, lambd=0.25, eps=0.0).item() == pytest.approx(1.0 + 0.25 * 1.0, abs=1e-6)
    assert barlow_twins_loss(z1, z2, lambd=0.25).item() == pytest.approx(1.25, abs=1e-4)  # eps=1e-5 barely moves it


def test_barlow_twins_loss_matches_the_reference_formula():
    # facebookresearch/barlowtwins main.py: c = bn(z1).T @ bn(z2) / N with BatchNorm1d(affine=False) in training mode,
    # on_diag = sum (diag(c) - 1)^2, off_diag = sum of the off-diagonal (flatten/view trick) squared
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(16, 5, generator=g) * 3 + 1, torch.randn(16, 5, generator=g)
    bn = lambda z: F.batch_norm(z, None, None, training=True, eps=1e-5)  # noqa: E731
    c = bn(z1).T @ bn(z2) / 16
    off = c.flatten()[:-1].view(4, 6)[:, 1:].flatten()
    expected = (torch.diagonal(c) - 1).pow(2).sum() + 0.0051 * off.pow(2).sum()
    torch.testing.assert_close(barlow_twins_loss(z1, z2, 0.0051), expected, atol=1e-6, rtol=1e-6)


def test_mixbt_targets_and_loss_by_hand():
    za, zb = torch.stack([A, B], dim=1), torch.stack([B, A], dim=1)  # already standardised
    perm = torch.tensor([1, 0, 3, 2])  # zb[perm] = [-B, A]
    c_ma, c_mb = mixbt_targets(za, zb, zb[perm], 0.25)
    # mixture M = [0.25 A - 0.75 B, 0.25 B + 0.75 A]; C^MA_gt = M^T za / 4, C^MB_gt = M^T zb / 4
    torch.testing.assert_close(c_ma, torch.tensor([[0.25, -0.75], [0.75, 0.25]]))
    torch.testing.assert_close(c_mb, torch.tensor([[-0.75, 0.25], [0.25, 0.75]]))
    # with zm = za: C^MA = I, C^MB = [[0, 1], [1, 0]]; each difference has four entries of +-0.75 -> 2 * 4 * 0.5625
    assert mixbt_loss(za, za, zb, zb[perm], 0.25).item() == pytest.approx(4.5, abs=1e-4)


def test_mixbt_matches_the_authors_formula():
    # wgcban/mix-bt main.py (CIFAR): cc_m_1_gt = a z1^T z1 / N + (1-a) z2[idx]^T z1 / N,
    # cc_m_2_gt = a z1^T z2 / N + (1-a) z2[idx]^T z2 / N, sum of squared differences (with our biased standardisation)
    g = torch.Generator().manual_seed(1)
    z1, z2, zm = (standardise(torch.randn(12, 4, generator=g)) for _ in range(3))
    idx, a, n = torch.randperm(12, generator=g), 0.3, 12
    gt1 = a * z1.T @ z1 / n + (1 - a) * z2[idx].T @ z1 / n
    gt2 = a * z1.T @ z2 / n + (1 - a) * z2[idx].T @ z2 / n
    expected = (zm.T @ z1 / n - gt1).pow(2).sum() + (zm.T @ z2 / n - gt2).pow(2).sum()
    torch.testing.assert_close(mixbt_loss(zm, z1, z2, z2[idx], a), expected, atol=1e-5, rtol=1e-5)


def _noise(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return x + 0.1 * torch.randn(x.shape, generator=generator)


def test_module_step_equals_a_recomputation():
    # noisy views from the module's generator: the logged BT and MixBT terms after one step equal the formulas on the
    # initial weights with the same draws (view A mixed with the permuted view B, scaled by mixbt * lambd)
    pl.seed_everything(0)
    model = BarlowTwins(
        MLP(64, 16, hidden=(16,)), 16, projector_dims=(8, 8), lambd=0.01, mixbt=3.0, augment=_noise, seed=5
    )
    start = copy.deepcopy(model)
    x = torch.randn(32, 64)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.zeros(32, dtype=torch.long)), 32)
    trainer = _trainer(max_steps=1, log_every_n_steps=1)
    trainer.fit(model, loader)
    g = torch.Generator().manual_seed(5)
    view_a, view_b = _noise(x, g), _noise(x, g)
    perm, lam = sample_mixing(np.random.default_rng(5), 32, 1.0, False, x.device)
    lam = lam.float()
    with torch.no_grad():
        z_a, z_b = start.projector(start(view_a)), start.projector(start(view_b))
        z_m = start.projector(start(lam * view_a + (1 - lam) * view_b[perm]))
        bt = barlow_twins_loss(z_a, z_b, 0.01)
        hat_a, hat_b = standardise(z_a), standardise(z_b)
        mix = 3.0 * 0.01 * mixbt_loss(z_m, hat_a, hat_b, hat_b[perm], lam)
    metrics = trainer.callback_metrics
    assert metrics["train/bt_loss"].item() == pytest.approx(bt.item(), rel=1e-5)
    assert metrics["train/mixbt_loss"].item() == pytest.approx(mix.item(), rel=1e-5)
    assert mix.item() > 0 and metrics["train/mixbt_lam"].item() == pytest.approx(lam.item(), rel=1e-6)


def test_probe_does_not_shape_the_encoder():
    weights = []
    for num_classes in (None, 10):
        pl.seed_everything(0)
        model = BarlowTwins(MLP(64, 16, hidden=(16,)), 16, projector_dims=(16, 16), mixbt=1.0, num_classes=num_classes)
        pl.seed_everything(1)
        _trainer(max_steps=4, limit_val_batches=0).fit(model, DigitsDataModule(batch_size=32))
        weights.append(torch.cat([p.detach().flatten() for p in model.backbone.parameters()]))
    torch.testing.assert_close(weights[0], weights[1], atol=0, rtol=0)


def test_real_fit_learns_features_a_probe_can_read():
    pl.seed_everything(0)
    model = BarlowTwins(MLP(64, 32, hidden=(64,)), 32, projector_dims=(64, 64), mixbt=4.0, num_classes=10)
    trainer = _trainer(max_epochs=3, log_every_n_steps=5)
    trainer.fit(model, DigitsDataModule(batch_size=64))
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"]) and metrics["train/mixbt_loss"] > 0
    assert metrics["val/probe_acc"] > 0.3  # chance is 0.1
    assert model.predict_step(torch.randn(3, 64), 0).shape == (3, 32)


def test_generator_states_round_trip_through_the_checkpoint():
    model = BarlowTwins(MLP(64, 16, hidden=(8,)), 16, projector_dims=(8,), mixbt=1.0, seed=3)
    model.augment(torch.randn(4, 64), model._views)  # advance both generators
    model._rng.random()
    checkpoint: dict = {}
    model.on_save_checkpoint(checkpoint)
    first = (torch.rand(3, generator=model._views), model._rng.random())
    fresh = BarlowTwins(MLP(64, 16, hidden=(8,)), 16, projector_dims=(8,), mixbt=1.0, seed=3)
    fresh.on_load_checkpoint(checkpoint)
    assert torch.equal(torch.rand(3, generator=fresh._views), first[0]) and fresh._rng.random() == first[1]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(backbone="mlp"), TypeError, "backbone"),
        (dict(feature_dim=0), ValueError, "feature_dim"),
        (dict(feature_dim=2.5), TypeError, "feature_dim"),
        (dict(projector_dims=()), ValueError, "projector_dims"),
        (dict(projector_dims=(8, 0)), ValueError, "projector_dims"),
        (dict(lambd=-0.1), ValueError, "lambd"),
        (dict(mixbt=float("nan")), ValueError, "mixbt"),
        (dict(mixbt_alpha=0.0), ValueError, "mixbt_alpha"),
        (dict(augment="flip"), TypeError, "augment"),
        (dict(num_classes=1), ValueError, "num_classes"),
        (dict(probe_lr=0.0), ValueError, "probe_lr"),
    ],
)
def test_bad_input(kwargs, error, match):
    args = dict(backbone=MLP(64, 16, hidden=(8,)), feature_dim=16) | kwargs
    with pytest.raises(error, match=match):
        BarlowTwins(**args)


def test_a_batch_of_one_is_refused():
    model = BarlowTwins(MLP(64, 16, hidden=(8,)), 16, projector_dims=(8,), augment=lambda x, g: x)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.randn(1, 64), torch.zeros(1, dtype=torch.long)), 1
    )
    with pytest.raises(ValueError, match="at least 2 samples"):
        _trainer(max_steps=1).fit(model, loader)
