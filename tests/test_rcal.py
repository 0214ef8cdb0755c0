import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lit_tricks import Classifier
from lit_tricks.callbacks.rcal import RCAL
from lit_tricks.core.batch import StepOutput, TrickBatch
from lit_tricks.data import DigitsDataModule
from lit_tricks.functional.rcal import (
    calibrate_tail,
    class_statistics,
    gaussian_factors,
    lof_inliers,
    representation_distance,
    sample_features,
)
from lit_tricks.nets import MLP


def test_class_statistics_by_hand():
    z = torch.tensor([[0.0, 0.0], [2.0, 2.0], [1.0, 3.0], [4.0, 0.0], [1.0, 1.0]])
    labels = torch.tensor([0, 0, 1, 0, 3])
    means, covs, counts = class_statistics(z, labels, 4)
    assert counts.tolist() == [3, 1, 0, 1]
    # class 0: mean (2, 2/3); deviations (-2, -2/3), (0, 4/3), (2, -2/3); unbiased: / 2
    torch.testing.assert_close(means[0], torch.tensor([2.0, 2 / 3], dtype=torch.float64))
    expected = torch.tensor([[8.0, 0.0], [0.0, 24 / 9]], dtype=torch.float64) / 2
    torch.testing.assert_close(covs[0], expected)
    torch.testing.assert_close(covs[0], torch.cov(z[labels == 0].T.double()))
    torch.testing.assert_close(means[1], torch.tensor([1.0, 3.0], dtype=torch.float64))
    assert covs[1].abs().sum() == 0 and means[2].abs().sum() == 0 and covs[2].abs().sum() == 0  # 1 sample; none


def test_tail_calibration_by_hand():
    # heads: classes 0, 1, 2 (>= 0.5 * 100); tails: 3 (nearest heads 2 then 1) and 4; class 5 has no sample
    means = torch.tensor([[0.0, 0.0], [10.0, 0.0], [4.0, 0.0], [6.0, 0.0], [-1.0, 0.0], [0.0, 0.0]])
    covs = torch.stack([torch.eye(2) * v for v in (1.0, 2.0, 3.0, 4.0, 0.0, 0.0)])
    counts = torch.tensor([100, 60, 50, 10, 1, 0])
    m, c, valid = calibrate_tail(means, covs, counts, q=2, alpha=0.5, head_ratio=0.5)
    torch.testing.assert_close(m[:3], means[:3])  # heads unchanged
    torch.testing.assert_close(c[:3], covs[:3])
    torch.testing.assert_close(m[3], torch.tensor([(6.0 + 4.0 + 10.0) / 3, 0.0]))
    torch.testing.assert_close(c[3], torch.eye(2) * (4.0 + 3.0 + 2.0) / 3 + 0.5)  # alpha on every entry
    torch.testing.assert_close(m[4], torch.tensor([(-1.0 + 0.0 + 4.0) / 3, 0.0]))  # nearest heads 0, 2
    torch.testing.assert_close(c[4], torch.eye(2) * (0.0 + 1.0 + 3.0) / 3 + 0.5)
    assert valid.tolist() == [True] * 5 + [False]
    torch.testing.assert_close(m[5], means[5])
    # q larger than the number of heads: all heads, divided by (heads + 1)
    m, c, _ = calibrate_tail(means[:4], covs[:4], torch.tensor([100, 10, 10, 10]), q=5, alpha=0.0, head_ratio=0.5)
    torch.testing.assert_close(m[1], (means[1] + means[0]) / 2)
    torch.testing.assert_close(c[3], (covs[3] + covs[0]) / 2)
    # q = 0 or a balanced set: nothing changes
    for q, cnt in ((0, counts), (2, torch.tensor([5, 5, 5, 5, 5, 5]))):
        m, c, _ = calibrate_tail(means, covs, cnt, q=q, alpha=1.0, head_ratio=0.5)
        assert torch.equal(m, means) and torch.equal(c, covs)


def test_lof_removes_a_mislabeled_point_per_class():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(40, 3, generator=g), torch.randn(40, 3, generator=g) + 20
    z = torch.cat([a, b, torch.tensor([[20.0, 20.0, 20.0]]), torch.tensor([[0.0, 0.0, 0.0], [50.0, 0.0, 0.0]])])
    labels = torch.tensor([0] * 40 + [1] * 40 + [0] + [2, 2])  # a class-1 point labelled 0; class 2 has 2 samples
    keep = lof_inliers(z, labels, 3)
    assert not keep[80] and keep[81:].all()  # the mislabeled point goes; classes below 3 samples keep all
    assert keep[:80].float().mean() > 0.9


def test_gaussian_factors_and_sample_moments_with_a_fixed_generator():
    cov = torch.tensor([[[2.0, 0.8], [0.8, 1.0]], [[1.0, 1.0], [1.0, 1.0]]])  # the second is singular (rank 1)
    factors = gaussian_factors(cov)
    torch.testing.assert_close(factors @ factors.transpose(1, 2), cov, atol=1e-6, rtol=1e-6)
    means = torch.tensor([[1.0, -2.0], [0.0, 3.0]])
    z, rows = sample_features(means, factors, 20000, torch.Generator().manual_seed(0))
    assert z.shape == (40000, 2) and torch.equal(rows, torch.tensor([0, 1]).repeat_interleave(20000))
    for k in (0, 1):
        torch.testing.assert_close(z[rows == k].mean(0), means[k], atol=0.04, rtol=0)
        torch.testing.assert_close(torch.cov(z[rows == k].T), cov[k], atol=0.06, rtol=0)
    again, _ = sample_features(means, factors, 20000, torch.Generator().manual_seed(0))
    assert torch.equal(again, z)
    torch.testing.assert_close((z[rows == 1, 0] - z[rows == 1, 1]).abs().max(), torch.tensor(3.0))  # rank 1: y = x + 3


def test_representation_distance_by_hand():
    f = torch.tensor([[1.0, 2.0], [0.0, 0.0]], requires_grad=True)
    d = representation_distance(f, torch.tensor([[0.0, 0.0], [3.0, 4.0]]))
    torch.testing.assert_close(d, torch.tensor([5.0, 25.0]))
    d.sum().backward()
    torch.testing.assert_close(f.grad, torch.tensor([[2.0, 4.0], [-6.0, -8.0]]))


def _trainer(callbacks, **kwargs):
    return pl.Trainer(
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        limit_val_batches=1,
        **kwargs,
    )


def test_real_fit_recomputes_keeps_the_encoder_frozen_and_round_trips():
    pl.seed_everything(0, verbose=False)
    model = Classifier(MLP(64, 10, hidden=(32,)), num_classes=10)
    start = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    rcal = RCAL(q=2, alpha=0.1, every_n_epochs=1)
    trainer = _trainer([rcal], max_epochs=2, limit_train_batches=3)
    trainer.fit(model, DigitsDataModule(batch_size=32, imbalance_ratio=10, label_noise=0.2))
    assert rcal.computed_epoch == 1 and rcal.means.shape == (10, 32) and rcal.factors.shape == (10, 32, 32)
    assert bool(rcal.valid.all()) and rcal.means.isfinite().all()
    for name in ("train/rcal_sampled", "train/rcal_reg", "tricks/RCAL/outlier_fraction"):
        assert trainer.callback_metrics[name].isfinite(), name
    assert 0 < float(trainer.callback_metrics["tricks/RCAL/outlier_fraction"]) < 0.5
    features, labels = rcal._training_features(trainer, model)
    counts = torch.bincount(labels[lof_inliers(features, labels, 10)], minlength=10)  # kept noisy labels
    tails = int((counts < 0.3 * counts.max()).sum())
    assert 0 < tails < 10 and trainer.callback_metrics["tricks/RCAL/tail_classes"] == tails
    for key, value in rcal._encoder.state_dict().items():  # the copy taken at the start, never trained
        assert torch.equal(value, start[key]), key
    assert not torch.equal(model.backbone.state_dict()["body.1.weight"], start["body.1.weight"])
    assert not any(p.requires_grad for p in rcal._encoder.parameters())

    state = torch.load(_saved(rcal.state_dict()), weights_only=True)  # a checkpoint loads with weights_only
    restored = RCAL(q=2, alpha=0.1, every_n_epochs=1)
    restored.load_state_dict(state)
    restored.setup(trainer, model, "fit")
    restored.on_train_start(trainer, model)
    assert restored.computed_epoch == 1
    for name in ("means", "factors", "valid"):
        assert torch.equal(getattr(restored, name), getattr(rcal, name)), name
    for key, value in restored._encoder.state_dict().items():
        assert torch.equal(value, start[key]), key


def _saved(state):
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


def test_statistics_follow_the_training_set_order_and_sampled_loss_trains_only_the_head():
    pl.seed_everything(0, verbose=False)
    model = Classifier(MLP(64, 10, hidden=(16,)), num_classes=10)
    datamodule = DigitsDataModule(batch_size=64, imbalance_ratio=10)
    rcal = RCAL(lof_neighbors=0, q=0, reg_weight=0.0, batch_size=100)
    trainer = _trainer([rcal], max_steps=1)
    trainer.fit(model, datamodule)
    dataset = trainer.train_dataloader.dataset
    inputs = torch.stack([dataset[i]["inputs"] for i in range(len(dataset))])
    labels = torch.tensor([int(dataset[i]["targets"]) for i in range(len(dataset))])
    features, got_labels = rcal._training_features(trainer, model)
    with torch.no_grad():
        torch.testing.assert_close(features, model.backbone.forward_features(inputs))
    assert torch.equal(got_labels, labels)
    means, _, _ = class_statistics(features, labels, 10)
    rcal.compute(trainer, model)
    torch.testing.assert_close(rcal.means, means.float())  # q=0, no LOF: the plain class means

    batch = TrickBatch(inputs[:8], labels[:8])
    logits, feats = model.forward_features(batch.inputs)
    out = rcal.after_loss(trainer, model, batch, StepOutput(logits, feats, torch.zeros(8)))
    model.zero_grad()
    out.aux_losses["rcal_sampled"].backward()
    assert rcal.num_sampled is None  # a batch's worth, equally from the 10 classes: ceil(8 / 10) = 1 each
    assert model.backbone.head.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.backbone.body.parameters())


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"q": -1}, ValueError, "q"),
        ({"q": 1.5}, TypeError, "q"),
        ({"alpha": float("nan")}, ValueError, "alpha"),
        ({"head_ratio": 0.0}, ValueError, "head_ratio"),
        ({"lof_neighbors": -2}, ValueError, "lof_neighbors"),
        ({"num_sampled": 0}, ValueError, "num_sampled"),
        ({"reg_weight": -1.0}, ValueError, "reg_weight"),
        ({"every_n_epochs": -1}, ValueError, "every_n_epochs"),
        ({"head": 3}, TypeError, "head"),
    ],
)
def test_bad_arguments_are_clear_errors(kwargs, error, name):
    with pytest.raises(error, match=name):
        RCAL(**kwargs)


class _NoFeatures(nn.Module):  # a backbone without forward_features / forward_head
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(64, 10)

    def forward(self, x):
        return self.net(x)


def test_setup_names_the_missing_model_part():
    trainer = _trainer([], max_steps=1)
    model = Classifier(_NoFeatures(), num_classes=10)
    with pytest.raises(ValueError, match="head"):
        RCAL().setup(trainer, model, "fit")
    with pytest.raises(ValueError, match="no submodule 'backbone.fc'"):
        RCAL(head="backbone.fc").setup(trainer, model, "fit")
    with pytest.raises(ValueError, match="reg_weight=0"):  # a head is given, the frozen encoder has no features
        RCAL(head="backbone.net").setup(trainer, model, "fit")
    RCAL(head="backbone.net", reg_weight=0.0).setup(trainer, model, "fit")
    with pytest.raises(TypeError, match="TrickModule"):
        RCAL().setup(trainer, pl.LightningModule(), "fit")
