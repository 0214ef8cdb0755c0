import random

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from lit_tricks.data import (
    ArrayDataset,
    ContinualDataModule,
    DigitsDataModule,
    EpochRandomSampler,
    IndexedDataset,
    LabelNoise,
    MNIST1DDataModule,
    ResumableDataLoader,
    RS2Sampler,
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


# ---------------------------------------------------------------- mid-epoch resume
def _indices(batches) -> list[list[int]]:
    return [batch["index"].tolist() for batch in batches]


def _lightning_loader(sampler, world: int = 1, rank: int = 0, distributed_wrapper: bool = False, **kwargs):
    """A ResumableDataLoader as Lightning prepares it: built while Lightning records the init arguments and, for
    world > 1, rebuilt with the distributed sampler Lightning would inject."""
    from lightning.fabric.utilities.data import _replace_dunder_methods
    from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
    from lightning.pytorch.utilities.data import _update_dataloader
    from torch.utils.data import DataLoader, DistributedSampler

    with _replace_dunder_methods(DataLoader, "dataset"):
        loader = ResumableDataLoader(sampler.data_source, batch_size=3, sampler=sampler, **kwargs)
    if world > 1:
        options = {"num_replicas": world, "rank": rank, "shuffle": True, "seed": 5}
        if distributed_wrapper:  # what Lightning does with a sampler of its own kind (RS2Sampler)
            loader = _update_dataloader(loader, DistributedSamplerWrapper(sampler, **options))
        else:  # a RandomSampler (EpochRandomSampler) is replaced
            loader = _update_dataloader(loader, DistributedSampler(loader.dataset, **options))
    return loader


DATA = ArrayDataset(torch.arange(20.0), torch.zeros(20, dtype=torch.long))


@pytest.mark.parametrize(
    ("make_sampler", "world", "wrapper"),
    [
        (lambda: EpochRandomSampler(DATA, seed=1), 1, False),
        (lambda: RS2Sampler(DATA, fraction=0.6, seed=1), 1, False),
        (lambda: EpochRandomSampler(DATA, seed=1), 2, False),
        (lambda: RS2Sampler(DATA, fraction=0.6, seed=1), 2, True),
    ],
    ids=["random", "rs2", "random-ddp", "rs2-ddp"],
)
def test_resumable_loader_continues_the_epoch_after_the_served_batches(make_sampler, world, wrapper):
    from lightning.fabric.utilities.data import _set_sampler_epoch
    from lightning.fabric.utilities.types import _Stateful

    for rank in range(world):
        loader = _lightning_loader(make_sampler(), world, rank, wrapper)
        assert isinstance(loader, (ResumableDataLoader, _Stateful))
        _set_sampler_epoch(loader, 1)
        uninterrupted = _indices(loader)
        served = iter(loader)
        _indices([next(served), next(served)])
        state = loader.state_dict()
        assert state == {"epoch": 1, "batches": 2}

        resumed = _lightning_loader(make_sampler(), world, rank, wrapper)  # a fresh process
        resumed.load_state_dict(state)
        assert resumed.state_dict() == state  # loaded, not yet iterated
        batches = iter(resumed)  # Lightning creates the iterator before it sets the epoch
        _set_sampler_epoch(resumed, 1)
        assert _indices(batches) == uninterrupted[2:]
        assert resumed.state_dict() == {"epoch": 1, "batches": len(uninterrupted)}
        _set_sampler_epoch(resumed, 2)
        assert len(_indices(resumed)) == len(uninterrupted)  # the next epoch is whole

        after_epoch = _lightning_loader(make_sampler(), world, rank, wrapper)  # an end-of-epoch checkpoint
        after_epoch.load_state_dict(state)
        _set_sampler_epoch(after_epoch, 2)
        epoch_2 = _indices(after_epoch)
        assert len(epoch_2) == len(uninterrupted) and epoch_2 != uninterrupted


def test_resumable_loader_with_workers_draws_the_resumed_epoch():
    """The iterator starts at the first batch, so workers see the epoch Lightning sets after creating it."""
    loader = _lightning_loader(EpochRandomSampler(DATA, seed=1), num_workers=1)
    loader.sampler.set_epoch(3)
    expected = _indices(loader)
    resumed = _lightning_loader(EpochRandomSampler(DATA, seed=1), num_workers=1)
    resumed.load_state_dict({"epoch": 3, "batches": 4})
    batches = iter(resumed)
    resumed.sampler.set_epoch(3)
    assert _indices(batches) == expected[4:]


def test_resumable_loader_rejects_bad_states_and_restarts_without_an_epoch():
    loader = ResumableDataLoader(DATA, batch_size=4)
    with pytest.raises(ValueError, match="epoch.*batches"):
        loader.load_state_dict({"batches": 2})
    # a SequentialSampler (what overfit_batches installs) has no epoch: nothing is skipped, as in a plain DataLoader
    loader.load_state_dict({"epoch": 0, "batches": 2})
    assert _indices(loader)[0] == [0, 1, 2, 3] and loader.state_dict() == {"epoch": None, "batches": 5}


def test_continual_stream_keeps_its_order_on_every_rank():
    """Without DDP the stream is served in order; under DDP rank r serves positions r, r + W, ... (Lightning keeps a
    DistributedSampler as it is, instead of shuffling the stream)."""
    from types import SimpleNamespace

    stream = ContinualDataModule(DigitsDataModule(batch_size=8, val_fraction=0.0), num_tasks=5)
    stream.setup()
    assert torch.equal(next(iter(stream.train_dataloader()))["index"], torch.arange(8))
    stream.trainer = SimpleNamespace(world_size=2, global_rank=1)
    loader = stream.train_dataloader()
    assert torch.equal(next(iter(loader))["index"], torch.arange(1, 16, 2))
    assert isinstance(loader, ResumableDataLoader)


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
