"""SMOTE through imbalanced-learn: the interpolation, the data-module option's order and indices, errors."""

import sys

import lightning.pytorch as pl
import pytest
import torch

from lit_tricks import ELR, Classifier
from lit_tricks.core.sample_table import index_range
from lit_tricks.data import ArrayDataModule
from lit_tricks.data.smote import smote_features
from lit_tricks.nets import MLP

pytest.importorskip("imblearn")  # the [imbalance] extra


def _distance_to_segment(p, a, b):
    t = ((p - a) @ (b - a) / ((b - a) @ (b - a))).clamp(0, 1)
    return (p - (a + t * (b - a))).norm()


def test_synthetic_samples_lie_on_segments_between_same_class_neighbours():
    # class 1: a triangle; with k_neighbors=2 every pair is a neighbour pair, so each new point lies on an edge
    head = torch.randn(10, 2, generator=torch.Generator().manual_seed(0)) - 5.0
    tail = torch.tensor([[0.0, 0.0], [4.0, 0.0], [0.0, 3.0]])
    x, y = torch.cat([head, tail]), torch.tensor([0] * 10 + [1] * 3)
    x_new, y_new = smote_features(x, y, k_neighbors=2, seed=0)
    assert torch.equal(x_new[:13], x) and torch.equal(y_new[:13], y)  # the real samples first, unchanged
    assert y_new.bincount().tolist() == [10, 10]  # "auto": the minority up to the majority's count
    assert torch.equal(y_new[13:], torch.ones(7, dtype=torch.long))
    edges = [(0, 1), (0, 2), (1, 2)]
    for p in x_new[13:]:
        assert min(float(_distance_to_segment(p, tail[i], tail[j])) for i, j in edges) < 1e-5
    # strictly inside the triangle's edges (lambda in [0, 1)), not copies of one vertex
    assert not any(torch.equal(p, v) for p in x_new[13:] for v in tail)


def test_seeded_any_shape_and_a_dict_strategy():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(14, 2, 3, generator=g), torch.tensor([0] * 8 + [1] * 4 + [2] * 2)
    a, ya = smote_features(x, y, k_neighbors=1, seed=3)
    b, _ = smote_features(x, y, k_neighbors=1, seed=3)
    c, _ = smote_features(x, y, k_neighbors=1, seed=4)
    assert a.shape == (24, 2, 3) and a.dtype == x.dtype and ya.bincount().tolist() == [8, 8, 8]
    assert torch.equal(a, b) and not torch.equal(a, c)
    d, yd = smote_features(x, y, k_neighbors=1, sampling_strategy={2: 5})
    assert yd.bincount().tolist() == [8, 4, 5] and d.shape == (17, 2, 3)


class Blocks(ArrayDataModule):
    """40 samples per class of 3 classes in 2-D, a test split of 10 per class."""

    num_classes = 3

    def load_arrays(self):
        g = torch.Generator().manual_seed(0)
        y, y_test = torch.arange(3).repeat(40), torch.arange(3).repeat(10)
        return torch.randn(120, 2, generator=g) + 3 * y[:, None], y, torch.randn(30, 2, generator=g), y_test


def test_datamodule_oversamples_the_cut_noisy_training_split_after_the_real_samples():
    plain = Blocks(imbalance_ratio=4, label_noise=0.2, seed=5)
    dm = Blocks(imbalance_ratio=4, label_noise=0.2, seed=5, smote={"k_neighbors": 2})
    plain.setup(), dm.setup()
    n = len(plain.train_set)
    # after the cut and the noise: the real part is exactly the split without SMOTE, at the same indices
    assert torch.equal(dm.train_set.inputs[:n], plain.train_set.inputs)
    assert torch.equal(dm.train_set.targets[:n], plain.train_set.targets)
    assert torch.equal(dm.train_set.extras["clean_targets"][:n], plain.train_set.extras["clean_targets"])
    observed = plain.train_set.targets.bincount(minlength=3)
    assert dm.train_set.targets.bincount().tolist() == [int(observed.max())] * 3  # balanced by observed labels
    synthetic = slice(n, None)
    assert torch.equal(dm.train_set.extras["clean_targets"][synthetic], dm.train_set.targets[synthetic])
    assert torch.equal(dm.train_class_counts, plain.train_class_counts)  # the real counts
    assert torch.equal(dm.val_set.inputs, plain.val_set.inputs) and torch.equal(
        dm.test_set.inputs, plain.test_set.inputs
    )
    # indices number the synthetic samples after the real ones; per-sample tables size to the whole set
    assert dm.train_set[len(dm.train_set) - 1]["index"] == len(dm.train_set) - 1
    assert index_range(dm.train_dataloader().dataset) == len(dm.train_set) > n
    assert Blocks(smote=True).smote == Blocks(smote={}).smote == {} and Blocks(smote=False).smote is None


def test_fit_with_a_per_sample_table_over_the_synthetic_samples(quiet_trainer_kwargs):
    dm = Blocks(batch_size=16, imbalance_ratio=4, smote={"k_neighbors": 3})
    elr = ELR()
    model = Classifier(MLP(in_features=2, num_classes=3, hidden=(16,)), num_classes=3)
    trainer = pl.Trainer(max_epochs=2, callbacks=[elr], **quiet_trainer_kwargs)
    trainer.fit(model, dm)
    assert elr.targets.values.shape == (len(dm.train_set), 3)
    assert bool(elr.targets.seen.all())  # every index, real and synthetic, was visited and written
    assert torch.isfinite(trainer.callback_metrics["val/acc"])


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"smote": "yes"}, TypeError, "smote must be True, a dict"),
        ({"smote": {"k": 3}}, ValueError, r"smote options must be among \['k_neighbors', 'sampling_strategy'\]"),
        ({"smote": {"k_neighbors": 0}}, ValueError, "smote k_neighbors must be an integer in"),
        ({"smote": {"sampling_strategy": 0.5}}, TypeError, "smote sampling_strategy must be a string"),
        ({"smote": True, "prune_scores": "s.pt"}, ValueError, "smote and prune_scores cannot be combined"),
    ],
)
def test_datamodule_rejects_bad_smote_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        Blocks(**kwargs)


def test_setup_errors_name_the_fix():
    with pytest.raises(ValueError, match=r"k_neighbors=5 .* class 2 has 2: pass k_neighbors <= 1"):
        Blocks(imbalance_ratio=15, smote=True).setup()  # counts [35, 9, 2]
    with pytest.raises(ValueError, match="smote sampling_strategy: .*bogus"):
        Blocks(smote={"sampling_strategy": "bogus"}).setup()
    with pytest.raises(TypeError, match="features must be floating point"):
        smote_features(torch.arange(6).reshape(6, 1), torch.tensor([0, 0, 0, 0, 1, 1]), k_neighbors=1)
    with pytest.raises(ValueError, match="at least 2 classes"):
        smote_features(torch.zeros(3, 1), torch.zeros(3, dtype=torch.long))


def test_missing_extra_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "imblearn", None)
    with pytest.raises(ImportError, match=r"pip install lit_tricks\[imbalance\]"):
        smote_features(torch.zeros(4, 1), torch.tensor([0, 0, 0, 1]), k_neighbors=1)
