"""Consistency models: iCT formulas by hand, the latent-CT options, sampling, sample-quality metrics, a real fit."""

import math

import lightning.pytorch as pl
import pytest
import torch

from lit_tricks import ConsistencyModel
from lit_tricks.data import DigitsDataModule, Toy2DDataModule, toy_2d
from lit_tricks.functional import consistency as ct
from lit_tricks.metrics import (
    EnergyDistance,
    FrechetDistance,
    KernelInceptionDistance,
    MaximumMeanDiscrepancy,
    SlicedWasserstein,
    digits_features,
)
from lit_tricks.modules import EDMDiffusion
from lit_tricks.nets import NonScalingLayerNorm, TimeCNN, TimeMLP


# ---------------------------------------------------------------- formulas
def test_boundary_scalings_by_hand():
    c_skip, c_out, c_in = ct.boundary_scalings(torch.tensor([0.002, 1.0]), 0.5, 0.002)
    assert c_skip[0] == 1.0 and c_out[0] == 0.0  # f(x, sigma_min) = x exactly
    torch.testing.assert_close(c_skip[1], torch.tensor(0.25 / (0.998**2 + 0.25)))
    torch.testing.assert_close(c_out[1], torch.tensor(0.5 * 0.998 / math.sqrt(1.25)))
    torch.testing.assert_close(c_in[1], torch.tensor(1 / math.sqrt(1.25)))


def test_karras_grid_matches_the_reference_values():
    expected = [0.002, 0.0167, 0.0851, 0.3183, 0.9654, 2.5152, 5.8389, 12.3816, 24.4083, 45.3137, 80.0]
    torch.testing.assert_close(ct.karras_sigmas(11, 0.002, 80.0), torch.tensor(expected, dtype=torch.float64),
                               atol=1e-4, rtol=1e-4)  # fmt: skip


def test_curriculum_stages():
    # K = 400k: 8 stages of 50k steps: 11, 21, ..., 1281
    assert [ct.discretisation_steps(k, 400_000) for k in (0, 49_999, 50_000, 150_000, 399_999)] == [
        11, 11, 21, 81, 1281,
    ]  # fmt: skip
    assert ct.discretisation_steps(2_500, 20_000) == 21  # relative to K
    assert ct.discretisation_steps(3, 5) == 1281  # too short for a stage per level: s1 throughout
    assert [ct.discretisation_steps(k, 30, s0=10, s1=40) for k in (0, 9, 10, 20, 29)] == [11, 11, 21, 41, 41]


def test_lognormal_probabilities_sum_to_one_over_n_minus_one_pairs():
    probs = ct.lognormal_index_probabilities(ct.karras_sigmas(11, 0.002, 80.0))
    assert probs.shape == (10,) and probs.sum().item() == pytest.approx(1.0)
    expected = [0.063, 0.182, 0.246, 0.214, 0.142, 0.081, 0.041, 0.020, 0.009, 0.004]
    torch.testing.assert_close(probs.float(), torch.tensor(expected), atol=1.5e-3, rtol=0)


def test_loss_weights_of_the_grid():
    sigmas = ct.karras_sigmas(11, 0.002, 80.0)
    weights = 1 / (sigmas[1:] - sigmas[:-1])
    assert weights.max().item() == pytest.approx(67.9, abs=0.3) and weights.argmax() == 0


def test_pseudo_huber_cauchy_and_c_by_hand():
    x, y = torch.tensor([[3.0, 4.0]]), torch.zeros(1, 2)
    assert ct.pseudo_huber(x, y, 1.0).item() == pytest.approx(math.sqrt(26) - 1)
    elementwise = (math.sqrt(10) - 1 + math.sqrt(17) - 1) / 2
    assert ct.pseudo_huber(x, y, 1.0, "elementwise").item() == pytest.approx(elementwise)
    assert ct.cauchy(torch.ones(1, 2), torch.zeros(1, 2), 1.0).item() == pytest.approx(math.log(1.5))
    assert ct.huber_c(2) == pytest.approx(7.6e-4, abs=1e-5) and ct.huber_c(64) == pytest.approx(4.32e-3)
    assert ct.adaptive_c(11, 64) == ct.huber_c(64)
    assert ct.adaptive_c(21, 64) == pytest.approx(0.0136, abs=1e-4)
    assert ct.adaptive_c(1281, 64) == pytest.approx(0.00011, abs=1e-5)
    with pytest.raises(ValueError, match="reduction"):
        ct.pseudo_huber(x, y, 1.0, "rms")


def test_ot_pairing_is_the_cheapest_permutation():
    x = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    z = torch.tensor([[0.1, 9.9], [0.2, 0.1], [9.8, 0.3]])
    perm = ct.ot_pairing(x, z)
    assert perm.tolist() == [1, 2, 0]
    assert (x - z[perm]).pow(2).sum() < (x - z).pow(2).sum()


# ---------------------------------------------------------------- the module
def _model(**kwargs):
    torch.manual_seed(0)
    return ConsistencyModel(TimeMLP(dim=2, hidden=64, dropout=kwargs.pop("dropout", 0.0)), data_shape=[2], **kwargs)


def test_the_consistency_function_meets_the_boundary_condition():
    model = _model()
    x = torch.randn(5, 2)
    assert torch.equal(model(x, torch.full((5,), 0.002)), x)
    assert not torch.allclose(model(x, torch.full((5,), 1.0)), x)


def test_teacher_shares_the_students_noise_and_dropout_mask():
    model = _model(dropout=0.5).train()
    x, z, sigma = torch.randn(64, 2), torch.randn(64, 2), torch.full((64,), 0.7)
    student, teacher = model.student_and_teacher(x, z, sigma, sigma)
    assert torch.equal(student.detach(), teacher) and student.requires_grad and not teacher.requires_grad
    other = model(x + 0.7 * z, sigma)  # the next draw differs: the masks were shared, not frozen
    assert not torch.equal(other, teacher)


def test_non_scaling_layernorm_keeps_its_scale():
    norm = NonScalingLayerNorm(4)
    assert not norm.weight.requires_grad and norm.bias.requires_grad and torch.equal(norm.weight, torch.ones(4))


def test_sampling_levels_and_errors():
    model = _model(sigma_max=80.0)
    assert model.sampling_sigmas(1) == [80.0] and model.sampling_sigmas(2) == [80.0, 0.821]
    three = model.sampling_sigmas(3)
    assert len(three) == 3 and three[0] == pytest.approx(80.0) and three[0] > three[1] > three[2] > 0.002
    assert model.sample(7, steps=3).shape == (7, 2)
    generator = torch.Generator().manual_seed(1)
    first = model.sample(4, steps=2, generator=generator)
    assert torch.equal(first, model.sample(4, steps=2, generator=torch.Generator().manual_seed(1)))
    with pytest.raises(ValueError, match="steps must be >= 1"):
        model.sample(4, steps=0)
    with pytest.raises(ValueError, match="decreasing"):
        model.sample(4, sigmas=[1.0, 2.0])
    with pytest.raises(ValueError, match="sigma_min, sigma_max"):
        model.sample(4, sigmas=[100.0])


def test_constructor_errors():
    with pytest.raises(ValueError, match=r"sigma_min must be a finite number in \(0.0, 0.5\)"):
        _model(sigma_min=1.0, sigma_max=0.5)
    with pytest.raises(ValueError, match="sigma_max must be a finite number"):
        _model(sigma_max=float("inf"))
    with pytest.raises(ValueError, match="s0"):
        _model(s0=20, s1=10)
    with pytest.raises(ValueError, match="loss"):
        _model(loss="l2")
    with pytest.raises(ValueError, match="clamp"):
        _model(clamp=[1.0, -1.0])
    with pytest.raises(TypeError, match="net must be"):
        ConsistencyModel("mlp", data_shape=[2])


def _trainer(quiet, **kwargs):
    return pl.Trainer(**{**quiet, "limit_val_batches": 0, **kwargs})


def test_data_and_net_mismatches_are_clear_errors(quiet_trainer_kwargs):
    model = ConsistencyModel(TimeMLP(dim=2, hidden=16), data_shape=[3])
    with pytest.raises(ValueError, match=r"data_shape=\[3\] but the batches hold samples of shape \[2\]"):
        _trainer(quiet_trainer_kwargs, max_steps=2).fit(model, Toy2DDataModule(num_samples=100))
    model = ConsistencyModel(TimeMLP(dim=3, hidden=16), data_shape=[2])
    with pytest.raises(RuntimeError):
        _trainer(quiet_trainer_kwargs, max_steps=2).fit(model, Toy2DDataModule(num_samples=100))


def test_a_short_fit_lowers_the_energy_distance_on_moons(quiet_trainer_kwargs):
    pl.seed_everything(0, verbose=False)
    data = Toy2DDataModule("moons", num_samples=4000, batch_size=128)
    data.setup()
    model = ConsistencyModel(TimeMLP(dim=2, hidden=128), data_shape=[2], s1=40, ema_decay=0.99)
    real = data.test_set.inputs

    def energy(samples):
        metric = EnergyDistance()
        metric.update(real, samples)
        return metric.compute().item()

    before = energy(model.sample(len(real), steps=1, generator=torch.Generator().manual_seed(0)))
    _trainer(quiet_trainer_kwargs, max_steps=400).fit(model, data)
    after = energy(model.sample(len(real), steps=1, generator=torch.Generator().manual_seed(0)))
    assert after < 0.2 * before and after < 0.05
    assert model.trainer.callback_metrics["consistency/num_levels"] == 41  # the curriculum reached s1 + 1


def test_latent_ct_options_run(quiet_trainer_kwargs):
    model = ConsistencyModel(TimeMLP(dim=2, hidden=32, norm="nonscaling"), data_shape=[2], s1=20, loss="cauchy",
                             adaptive_c=True, diffusion_loss_weight=5.0, ot_coupling=True)  # fmt: skip
    trainer = _trainer(quiet_trainer_kwargs, max_steps=6)
    trainer.fit(model, Toy2DDataModule(num_samples=512, batch_size=64))
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"]) and torch.isfinite(metrics["train/diffusion_loss"])
    assert model.sample(16, steps=3).isfinite().all()


def test_digits_model_validates_with_sample_quality_metrics(quiet_trainer_kwargs):
    model = ConsistencyModel(TimeCNN(width=16), data_shape=[1, 8, 8], s1=20, clamp=[-1, 1], num_eval_samples=64)
    trainer = _trainer(quiet_trainer_kwargs, max_steps=4, limit_val_batches=1, val_check_interval=4)
    trainer.fit(model, DigitsDataModule(as_image=True, symmetric=True, batch_size=32, eval_batch_size=64))
    assert {"val/energy_1step", "val/mmd_2step", "val/fd_1step", "val/fd_2step"} <= set(trainer.callback_metrics)
    samples = model.sample(5, steps=2)
    assert samples.shape == (5, 1, 8, 8) and samples.min() >= -1 and samples.max() <= 1


def test_edm_baseline_trains_and_samples(quiet_trainer_kwargs):
    model = EDMDiffusion(TimeMLP(dim=2, hidden=32), data_shape=[2])
    x = torch.randn(3, 2)
    torch.testing.assert_close(model(x, 1e-6), x, atol=1e-5, rtol=0)  # D(x, sigma -> 0) = x
    _trainer(quiet_trainer_kwargs, max_steps=5).fit(model, Toy2DDataModule(num_samples=256, batch_size=64))
    assert model.sample(8, steps=1).shape == (8, 2) and model.sample(8, steps=10).isfinite().all()


# ---------------------------------------------------------------- metrics
def test_energy_distance_by_hand():
    metric = EnergyDistance()
    metric.update(torch.tensor([[0.0], [2.0]]), torch.tensor([[1.0]]).expand(2, 1))
    assert metric.compute().item() == pytest.approx(2 * 1.0 - 1.0 - 0.0)
    metric = EnergyDistance()
    metric.update(torch.randn(50, 3), torch.randn(50, 3))
    same = EnergyDistance()
    x = torch.randn(50, 3)
    same.update(x, x)
    assert same.compute().item() == pytest.approx(0.0, abs=1e-12) and metric.compute() > 0


def test_mmd_fd_kid_swd_separate_shifted_sets():
    torch.manual_seed(0)
    x, y = torch.randn(400, 2), torch.randn(400, 2)
    shifted = y + torch.tensor([1.0, 0.0])
    # the unbiased MMD and KID are ~0 for equal distributions; the sliced W2 keeps a sampling bias
    for metric_class, factor in ((MaximumMeanDiscrepancy, 5), (KernelInceptionDistance, 5), (SlicedWasserstein, 2.5)):
        near, far = metric_class(), metric_class()
        near.update(x, y)
        far.update(x, shifted)
        assert far.compute() > factor * abs(near.compute()), metric_class.__name__
    fd = FrechetDistance()
    fd.update(x, x + torch.tensor([1.0, 0.0]))
    assert fd.compute().item() == pytest.approx(1.0)  # |mean shift|^2 with equal covariances
    centred = x - x.mean(dim=0)
    fd = FrechetDistance()
    fd.update(centred, 2 * centred)  # covariance x4: Tr(S + 4S - 2 * 2S) = Tr(S)
    assert fd.compute().item() == pytest.approx(torch.cov(centred.T.double()).trace().item(), rel=1e-6)
    swd = SlicedWasserstein(projections=2000)
    swd.update(x, x + torch.tensor([1.0, 0.0]))
    assert swd.compute().item() == pytest.approx(1 / math.sqrt(2), abs=0.05)  # sqrt(E[theta_1^2]) in 2-D


def test_digits_features_are_deterministic_and_discriminative():
    data = DigitsDataModule(as_image=True, symmetric=True, val_fraction=0.0)
    data.setup()
    first, second = digits_features(data.test_set.inputs), digits_features(data.test_set.inputs)
    assert first.shape == (len(data.test_set), 64) and torch.equal(first, second)
    fd_real, fd_noise = FrechetDistance(digits_features), FrechetDistance(digits_features)
    fd_real.update(data.train_set.inputs[:300], data.test_set.inputs[:300])
    fd_noise.update(data.train_set.inputs[:300], torch.rand(300, 1, 8, 8) * 2 - 1)
    assert fd_noise.compute() > 10 * fd_real.compute()


def test_toy_sets():
    for name in ("moons", "8gaussians", "swissroll", "checkerboard"):
        assert toy_2d(name, 100).shape == (100, 2)
    data = Toy2DDataModule("swissroll", num_samples=1000, sigma_data=0.5)
    data.setup()
    torch.testing.assert_close(data.train_set.inputs.std(dim=0), torch.full((2,), 0.5), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="name must be"):
        Toy2DDataModule("spiral")
