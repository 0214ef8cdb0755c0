import random

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from lit_tricks.data import (
    DigitsDataModule,
    EpochRandomSampler,
    IndexedDataset,
    LabelNoise,
    MNIST1DDataModule,
    flip_labels,
    generate_mnist1d,
)


# ---------------------------------------------------------------- label noise
def test_symmetric_noise_flips_exactly_the_rate_to_other_classes():
    labels = torch.arange(1000) % 10
    noisy = flip_labels(labels, rate=0.2, num_classes=10, seed=3)
    assert (noisy != labels).sum() == 200
    assert noisy.min() >= 0 and noisy.max() < 10
    # every flipped sample moved to another class, spread over all of them
    flipped = noisy[noisy != labels]
    assert len(torch.unique(flipped)) == 10
    assert torch.equal(noisy, flip_labels(labels, 0.2, 10, seed=3))
    assert not torch.equal(noisy, flip_labels(labels, 0.2, 10, seed=4))


def test_asymmetric_noise_follows_the_mapping_per_class():
    labels = torch.tensor([0] * 10 + [1] * 10 + [2] * 10)
    noisy = flip_labels(labels, 0.3, 3, kind="asymmetric", mapping={0: 2, 1: 1}, seed=0)
    assert (noisy[:10] == 2).sum() == 3 and (noisy[:10] == 0).sum() == 7  # 0 -> 2 for 30% of class 0
    assert torch.equal(noisy[10:], labels[10:])  # 1 maps to itself; 2 has no mapping
    default = flip_labels(labels, 0.5, 3, kind="asymmetric", seed=0)  # pair flip c -> c + 1
    assert ((default != labels) & (default != (labels + 1) % 3)).sum() == 0
    assert (default != labels).sum() == 15


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rate": 1.5}, r"rate must be in \[0, 1\]"),
        ({"rate": 0.1, "kind": "pairwise"}, "symmetric' or 'asymmetric"),
        ({"rate": 0.1, "num_classes": 2}, r"labels must lie in \[0, 2\)"),
        ({"rate": 0.1, "kind": "asymmetric", "mapping": {0: 9}}, "leaves the classes"),
    ],
)
def test_flip_labels_rejects_bad_input(kwargs, match):
    args = {"labels": torch.tensor([0, 1, 2]), "num_classes": 3, **kwargs}
    with pytest.raises(ValueError, match=match):
        flip_labels(**args)


def test_label_noise_dataset_keeps_clean_labels():
    base = TensorDataset(torch.randn(100, 2), torch.arange(100) % 5)
    noisy = LabelNoise(IndexedDataset(base), rate=0.4, num_classes=5, seed=1)
    assert noisy.is_noisy.sum() == 40
    item = noisy[int(noisy.is_noisy.nonzero()[0])]
    assert item["targets"] != item["clean_targets"] and "index" in item


# ---------------------------------------------------------------- datasets and samplers
def test_indexed_dataset_wraps_tuples_and_dicts():
    tuples = IndexedDataset(TensorDataset(torch.zeros(4, 2), torch.tensor([0, 1, 2, 3])))
    assert tuples[2]["index"] == 2 and int(tuples[2]["targets"]) == 2
    dicts = IndexedDataset([{"inputs": torch.zeros(2), "targets": 1, "task": 0}])
    assert dicts[0] == {"inputs": dicts[0]["inputs"], "targets": 1, "task": 0, "index": 0}
    with pytest.raises(TypeError, match="map-style"):
        IndexedDataset(iter([]))
    with pytest.raises(ValueError, match="'inputs' and 'targets'"):
        IndexedDataset([{"x": 1}])[0]


def test_epoch_sampler_depends_only_on_seed_and_epoch():
    sampler = EpochRandomSampler(range(50), seed=7)
    first = list(sampler)
    assert sorted(first) == list(range(50)) and list(sampler) == first
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != first
    torch.manual_seed(0)  # the global RNG plays no part
    assert list(EpochRandomSampler(range(50), seed=7)) == first


# ---------------------------------------------------------------- data modules
def test_digits_datamodule_splits_and_noise():
    dm = DigitsDataModule(val_fraction=0.1, label_noise=0.2, seed=0)
    dm.setup()
    n_train, n_val, n_test = len(dm.train_set), len(dm.val_set), len(dm.test_set)
    assert n_train + n_val + n_test == 1797 and n_test == round(0.2 * 1797)
    assert (dm.train_set.targets != dm.train_set.extras["clean_targets"]).sum() == round(0.2 * n_train)
    batch = next(iter(dm.train_dataloader()))
    assert batch["inputs"].shape == (64, 64) and batch["inputs"].max() <= 1.0
    assert batch["index"].dtype == torch.long and batch["targets"].dtype == torch.long
    # the same test split whatever the seed
    other = DigitsDataModule(seed=5)
    other.setup()
    assert torch.equal(other.test_set.inputs, dm.test_set.inputs)


def test_mnist1d_matches_the_package_and_spares_global_rng():
    np.random.seed(1)
    random.seed(1)
    state_np, state_py = np.random.get_state()[1].copy(), random.getstate()
    data = generate_mnist1d(num_samples=200)
    assert np.array_equal(np.random.get_state()[1], state_np) and random.getstate() == state_py
    assert data["x"].shape == (160, 40) and data["x_test"].shape == (40, 40)
    dm = MNIST1DDataModule(num_samples=200, val_fraction=0.25)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (120, 40, 40)
    assert dm.train_set.inputs.dtype == torch.float32 and set(dm.test_set.targets.tolist()) <= set(range(10))


@pytest.mark.parametrize(
    ("cls", "kwargs", "match"),
    [
        (DigitsDataModule, {"batch_size": 0}, "batch_size"),
        (DigitsDataModule, {"val_fraction": 1.0}, "val_fraction"),
        (DigitsDataModule, {"label_noise": -0.1}, "label_noise"),
        (DigitsDataModule, {"noise_kind": "pair"}, "noise_kind"),
        (DigitsDataModule, {"test_fraction": 0.0}, "test_fraction"),
        (DigitsDataModule, {"num_workers": -1}, "num_workers"),
        (MNIST1DDataModule, {"num_samples": 10}, "num_samples"),
    ],
)
def test_datamodules_reject_bad_arguments(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


def test_no_validation_split():
    dm = DigitsDataModule(val_fraction=0.0)
    dm.setup()
    assert dm.val_set is None and dm.val_dataloader() == []
