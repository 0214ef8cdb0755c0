import copy
import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lit_tricks import Classifier, Trick
from lit_tricks.callbacks.sbcl import SBCL
from lit_tricks.data import DigitsDataModule
from lit_tricks.functional.sbcl import class_temperatures, cluster_subclasses, kmeans, sbcl_loss, subclass_counts
from lit_tricks.nets import MLP


def _direct_sbcl(z1, z2, labels, subclasses, tau, tau_class, tau_base, gamma):
    """The loss written out anchor by anchor, pair by pair, from the paper's two sums."""
    z, y, s = torch.cat([z1, z2]), labels.repeat(2), subclasses.repeat(2)
    n2, n = len(z), len(z1)
    per_anchor = []
    for i in range(n2):
        partner = (i + n) % n2
        denominator = sum(math.exp(float(z[i] @ z[a]) / tau) for a in range(n2) if a != i)
        same = [p for p in range(n2) if p != i and s[p] == s[i]]
        sub = -sum(float(z[i] @ z[p]) / tau - math.log(denominator) for p in same) / len(same)
        t = float(tau_class[y[i]])
        outside = [a for a in range(n2) if s[a] != s[i]]
        denominator = sum(math.exp(float(z[i] @ z[a]) / t) for a in [*outside, partner])
        positives = [p for p in outside if y[p] == y[i]] + [partner]
        cls = -sum(float(z[i] @ z[p]) / t - math.log(denominator) for p in positives) / len(positives)
        per_anchor.append(tau / tau_base * sub + gamma * cls)
    return torch.tensor([(per_anchor[i] + per_anchor[i + n]) / 2 for i in range(n)])


def test_sbcl_loss_against_a_direct_computation():
    angles = torch.tensor([0.0, 0.3, 1.2, 1.5, 2.8])
    z1 = torch.stack([angles.cos(), angles.sin()], dim=1)
    z2 = torch.stack([(angles + 0.2).cos(), (angles + 0.2).sin()], dim=1)
    labels = torch.tensor([0, 0, 0, 0, 1])
    subclasses = torch.tensor([0, 0, 1, 1, 2])  # class 0 in two subclasses
    tau_class = torch.tensor([0.08, 0.1])
    got = sbcl_loss(z1, z2, labels, subclasses, 0.1, tau_class, 0.07, 0.25)
    expected = _direct_sbcl(z1, z2, labels, subclasses, 0.1, tau_class, 0.07, 0.25)
    torch.testing.assert_close(got, expected.float(), rtol=1e-5, atol=1e-5)
    # a scalar class temperature is the same as a constant per-class one
    torch.testing.assert_close(
        sbcl_loss(z1, z2, labels, subclasses, 0.1, 0.1, 0.07, 0.25),
        sbcl_loss(z1, z2, labels, subclasses, 0.1, torch.tensor([0.1, 0.1]), 0.07, 0.25),
    )


def test_sbcl_loss_closed_form():
    # two orthogonal samples, each view equal to the other: every anchor has its partner at similarity 1 and the
    # two rows of the other sample at 0, in both terms, so l = (tau/tau_b + gamma) log(1 + 2 e^{-1/tau})
    z = torch.eye(2)
    got = sbcl_loss(z, z, torch.tensor([0, 1]), torch.tensor([0, 1]), 0.5, 0.5, 0.07, 0.25)
    expected = (0.5 / 0.07 + 0.25) * math.log(1 + 2 * math.exp(-2))
    torch.testing.assert_close(got, torch.full((2,), expected), rtol=1e-5, atol=0)
    # the warm-up form is SupCon: tau_b = tau and no class term
    warm = sbcl_loss(z, z, torch.tensor([0, 1]), torch.tensor([0, 1]), 0.5, base_temperature=0.5, class_weight=0)
    torch.testing.assert_close(warm, torch.full((2,), math.log(1 + 2 * math.exp(-2))), rtol=1e-5, atol=0)


def test_sbcl_loss_gradient_pulls_the_subclass_together():
    z1 = F.normalize(torch.randn(6, 4, generator=torch.Generator().manual_seed(0)), dim=1).requires_grad_(True)
    z2 = F.normalize(z1.detach() + 0.1, dim=1)
    labels, subclasses = torch.tensor([0, 0, 0, 0, 1, 1]), torch.tensor([0, 0, 1, 1, 2, 2])
    sbcl_loss(z1, z2, labels, subclasses).mean().backward()
    step = F.normalize(z1.detach() - 0.05 * z1.grad, dim=1)
    assert float(step[0] @ step[1]) > float(z1[0].detach() @ z1[1].detach())  # same subclass: closer


def test_subclass_count_rule():
    assert subclass_counts(torch.tensor([100, 40, 12, 5]), min_size=10).tolist() == [10, 4, 1, 1]
    assert subclass_counts(torch.tensor([100, 40, 12, 5]), min_size=3).tolist() == [20, 8, 2, 1]  # tail size 5
    assert subclass_counts(torch.tensor([30, 0, 15]), min_size=1).tolist() == [2, 1, 1]  # empty classes ignored
    with pytest.raises(ValueError, match="class_counts"):
        subclass_counts(torch.tensor([0, 0]))


def test_kmeans_separates_separable_points():
    generator = torch.Generator().manual_seed(0)
    directions = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    x = directions.repeat_interleave(8, 0) + 0.05 * torch.randn(24, 3, generator=generator)
    truth = torch.arange(3).repeat_interleave(8)
    for seed in range(5):
        labels, centres = kmeans(x, 3, generator=torch.Generator().manual_seed(seed))
        # the same partition up to the cluster numbering, and each centre the plain mean of its points
        assert len({(int(a), int(b)) for a, b in zip(labels, truth, strict=True)}) == 3
        for j in range(3):
            torch.testing.assert_close(centres[j], x[labels == j].mean(dim=0))
    again = kmeans(x, 3, generator=torch.Generator().manual_seed(4))[0]
    assert torch.equal(again, labels)  # seeded: repeatable
    with pytest.raises(ValueError, match="1 <= k"):
        kmeans(x[:2], 3)


def test_cluster_subclasses_numbers_subclasses_by_class_and_temperatures_by_hand():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [0.1, 1.0], [-1.0, 0.0], [-1.0, 0.1]])
    labels = torch.tensor([1, 1, 1, 1, 0, 0])
    ids, centres = cluster_subclasses(x, labels, torch.tensor([1, 2]), generator=torch.Generator().manual_seed(0))
    assert ids[4] == ids[5] == 0  # class 0: one subclass, id 0
    assert ids[0] == ids[2] and ids[1] == ids[3] and {int(ids[0]), int(ids[1])} == {1, 2}
    torch.testing.assert_close(centres[0], x[4:].mean(dim=0))
    # d_0 = 1/log 12 and d_1 = 0; clipped to the 20%/80% quantiles [0.0805, 0.3219] and scaled by their mean
    z = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    d0 = 1 / math.log(12)
    low, high = 0.2 * d0, 0.8 * d0
    got = class_temperatures(z, torch.tensor([0, 0, 1, 1]), torch.tensor([2, 2]), 0.1)
    torch.testing.assert_close(got, torch.tensor([0.1 * high / ((low + high) / 2), 0.1 * low / ((low + high) / 2)]))
    one = class_temperatures(z, torch.tensor([0, 0, 1, 1]), torch.tensor([2, 1]), 0.1)  # one subclass: tau
    torch.testing.assert_close(one, torch.tensor([got[0].item(), 0.1]))


class SnapshotAtClustering(Callback):
    """After SBCL's epoch start: keeps a copy of the weights the clustering used."""

    def __init__(self):
        self.weights = None

    def on_train_epoch_start(self, trainer, pl_module):
        self.weights = copy.deepcopy(pl_module.state_dict())


class CheckLoss(Trick):
    """Runs after SBCL and recomputes its term from the public functions, the stored labels and the second view."""

    order = 1

    def __init__(self, sbcl):
        self.sbcl, self.views, self.pairs = sbcl, [], []

    def augment(self, x):
        self.views.append(x + 0.01)
        return self.views[-1]

    def after_loss(self, trainer, module, batch, out):
        with torch.no_grad():
            z1, z2 = self.sbcl.project(out.features), self.sbcl.project(module.forward_features(self.views[-1])[1])
            if self.sbcl.clustered_epoch < 0:
                expected = sbcl_loss(z1, z2, batch.targets, batch.targets, 0.1, base_temperature=0.1, class_weight=0)
            else:
                subclasses = self.sbcl.subclasses[batch.index]
                expected = sbcl_loss(z1, z2, batch.targets, subclasses, 0.1, self.sbcl.class_temperatures, 0.07, 0.25)
        self.pairs.append((out.aux_losses["sbcl"].detach(), 0.5 * expected.mean()))
        return out


def _fit(callbacks, kwargs, max_epochs, **fit_kwargs):
    pl.seed_everything(0, verbose=False)
    model = Classifier(MLP(64, 10, hidden=(32,)), num_classes=10)
    data = DigitsDataModule(batch_size=32, imbalance_ratio=10)
    trainer = pl.Trainer(
        max_epochs=max_epochs, limit_train_batches=3, limit_val_batches=0, callbacks=callbacks, **kwargs
    )
    trainer.fit(model, data, **fit_kwargs)
    return trainer, model, data


def test_sbcl_in_a_real_fit(quiet_trainer_kwargs):
    sbcl, snapshot = SBCL(weight=0.5, warmup_epochs=1, every_n_epochs=1, projection_dim=16), SnapshotAtClustering()
    check = CheckLoss(sbcl)
    sbcl.augment = check.augment
    trainer, model, data = _fit([sbcl, snapshot, check], quiet_trainer_kwargs, max_epochs=3)
    assert len(check.pairs) == 9  # warm-up steps, then steps with subclasses: the term is the loss on the two views
    for got, expected in check.pairs:
        torch.testing.assert_close(got, expected)
    assert sbcl.clustered_epoch == 2 and math.isfinite(float(trainer.callback_metrics["train/sbcl"]))
    counts = subclass_counts(data.train_class_counts, 10)
    assert torch.equal(sbcl.subclass_counts, counts) and int(counts[0]) > 1  # the head class is split
    assert trainer.callback_metrics["tricks/SBCL/subclasses"] == counts.sum()
    assert isinstance(model.sbcl_projection[0], nn.Linear) and model.sbcl_projection[0].in_features == 32
    # the stored labels are exactly a clustering of the training set's projections under the epoch's weights
    model.load_state_dict(snapshot.weights)
    model.eval()
    items = [data.train_set[i] for i in range(len(data.train_set))]
    x, y, index = (
        torch.stack([torch.as_tensor(item[key]) for item in items]) for key in ("inputs", "targets", "index")
    )
    with torch.no_grad():
        z = F.normalize(model.sbcl_projection(model.forward_features(x)[1]), dim=1)
    ids, centres = cluster_subclasses(z, y, counts, generator=torch.Generator().manual_seed(2))
    assert torch.equal(sbcl.subclasses[index], ids)
    torch.testing.assert_close(sbcl.centres, centres)
    torch.testing.assert_close(sbcl.class_temperatures, class_temperatures(z, y, counts, 0.1))
    offsets = torch.cumsum(counts, 0) - counts  # every subclass belongs to its sample's class
    assert bool(((ids >= offsets[y]) & (ids < offsets[y] + counts[y])).all())


def test_sbcl_state_is_restored(quiet_trainer_kwargs, tmp_path):
    kwargs = {**quiet_trainer_kwargs, "enable_checkpointing": True}
    first = SBCL(warmup_epochs=1, every_n_epochs=5, projection_dim=16)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    _fit([first, checkpoint], kwargs, max_epochs=2)
    resumed = SBCL(warmup_epochs=1, every_n_epochs=5, projection_dim=16)
    _fit([resumed], quiet_trainer_kwargs, max_epochs=3, ckpt_path=tmp_path / "last.ckpt")
    assert resumed.clustered_epoch == 1  # epoch 2 is no clustering epoch: the restored labels were used
    for key in ("subclasses", "centres", "class_temperatures", "subclass_counts"):
        assert torch.equal(getattr(resumed, key), getattr(first, key)), key


def test_sbcl_bad_input(quiet_trainer_kwargs):
    for bad, error in [
        ({"temperature": 0.0}, ValueError),
        ({"class_weight": -1.0}, ValueError),
        ({"every_n_epochs": 0}, ValueError),
        ({"min_subclass_size": 2.5}, TypeError),
        ({"augment": "flip"}, TypeError),
        ({"adaptive_temperature": "yes"}, TypeError),
    ]:
        name = next(iter(bad))
        with pytest.raises(error, match=name):
            SBCL(**bad)
    loader = DataLoader(TensorDataset(torch.randn(32, 64), torch.randint(0, 10, (32,))), batch_size=8)
    trainer = pl.Trainer(max_epochs=1, callbacks=[SBCL(warmup_epochs=0)], **quiet_trainer_kwargs)
    with pytest.raises(ValueError, match="SBCL keeps per-sample subclass labels and needs dataset indices"):
        trainer.fit(Classifier(MLP(64, 10), num_classes=10), loader)
    no_head = Classifier(nn.Sequential(nn.Linear(64, 20), nn.MaxPool1d(2)), num_classes=10)  # no Linear to 10
    with pytest.raises(ValueError, match="pass in_features"):
        pl.Trainer(max_steps=1, callbacks=[SBCL()], **quiet_trainer_kwargs).fit(no_head, loader)
