"""Long-tailed data: the exponential profile and cut, the class-balanced samplers, balanced / shot-group metrics."""

from itertools import islice

import lightning.pytorch as pl
import pytest
import torch
from lightning.fabric.utilities.data import _set_sampler_epoch
from torch.utils.data import DataLoader

from lit_tricks import Classifier
from lit_tricks.data import ArrayDataModule, ArrayDataset, DigitsDataModule, ResumableDataLoader
from lit_tricks.data.balanced_sampler import ClassBalancedSampler, class_balanced_indices
from lit_tricks.data.long_tail import long_tail_counts, long_tail_indices
from lit_tricks.metrics.long_tail import ClassGroupAccuracy, long_tail_metrics, shot_groups
from lit_tricks.nets import MLP


# ---------------------------------------------------------------- profile and cut
def test_profile_matches_the_cifar_lt_counts_of_the_authors_code():
    # LDAM-DRW's get_img_num_per_cls: int(5000 * 0.01 ** (c / 9)); CIFAR-10-LT has 12,406 (rho=100) and
    # 20,431 (rho=10) training images
    rho_100 = long_tail_counts([5000] * 10, 100)
    assert rho_100.tolist() == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert int(long_tail_counts([5000] * 10, 10).sum()) == 20431
    assert long_tail_counts([100] * 5, 16).tolist() == [100, 50, 25, 12, 6]  # 100 / 2^c, floored
    assert long_tail_counts([7, 9, 8], 1).tolist() == [7, 7, 7]  # n_max is the smallest class


def test_profile_rejects_bad_input():
    with pytest.raises(ValueError, match="rho.*>= 1"):
        long_tail_counts([10, 10], 0.5)
    with pytest.raises(ValueError, match="tail class with no sample"):
        long_tail_counts([10, 10], 20)
    with pytest.raises(ValueError, match="at least 2 classes"):
        long_tail_counts([10], 2)


def test_cut_keeps_profile_sized_seeded_subsets_of_each_class():
    labels = torch.arange(3).repeat(8)  # 8 per class
    kept = long_tail_indices(labels, rho=4, num_classes=3, seed=1)
    assert labels[kept].bincount().tolist() == [8, 4, 2]
    assert kept.unique().numel() == len(kept)
    assert torch.equal(kept, long_tail_indices(labels, rho=4, num_classes=3, seed=1))
    assert not torch.equal(kept, long_tail_indices(labels, rho=4, num_classes=3, seed=2))
    with pytest.raises(ValueError, match=r"labels must be class ids \[N\] in \[0, 3\)"):
        long_tail_indices(torch.tensor([0, 3]), rho=2, num_classes=3)


class Blocks(ArrayDataModule):
    """40 samples per class of 3 classes (input = the sample id), a test split of 10 per class."""

    num_classes = 3

    def load_arrays(self):
        y, y_test = torch.arange(3).repeat(40), torch.arange(3).repeat(10)
        return torch.arange(120.0).unsqueeze(1), y, torch.zeros(30, 1), y_test


def test_datamodule_cuts_the_training_split_only_then_adds_noise():
    dm = Blocks(val_fraction=0.25, imbalance_ratio=9, label_noise=0.5)
    dm.setup()
    clean = dm.train_set.extras["clean_targets"]
    uncut = Blocks(val_fraction=0.25)  # the same seed carves the same validation split
    uncut.setup()
    profile = long_tail_counts(uncut.train_set.targets.bincount(), 9)
    assert dm.long_tailed and torch.equal(clean.bincount(), profile) and torch.equal(dm.train_class_counts, profile)
    # noise after the cut: exactly half of the cut split is flipped
    assert int((dm.train_set.targets != clean).sum()) == round(0.5 * int(profile.sum()))
    assert len(dm.val_set) == 30 and dm.test_set.targets.bincount().tolist() == [10, 10, 10]
    assert not set(dm.val_set.inputs.flatten().tolist()) & set(dm.train_set.inputs.flatten().tolist())
    balanced = Blocks(imbalance_ratio=1.0)
    balanced.setup()
    assert not balanced.long_tailed and balanced.train_class_counts is None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"imbalance_ratio": 0.5}, "imbalance_ratio must be >= 1"),
        ({"balance": "oversample"}, "balance must be 'over', 'under' or None"),
        ({"balance": "over", "rs2_fraction": 0.5}, "set only one"),
    ],
)
def test_datamodule_rejects_bad_long_tail_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Blocks(**kwargs)


# ---------------------------------------------------------------- samplers
LABELS = torch.tensor([0] * 6 + [1] * 3 + [2] * 1)


def test_over_sampling_lifts_every_class_to_the_largest_keeping_all_samples():
    epoch = class_balanced_indices(LABELS, "over", epoch=0, seed=1)
    assert LABELS[epoch].bincount().tolist() == [6, 6, 6]
    assert set(epoch.tolist()) == set(range(10))  # every sample at least once, the head exactly once
    assert epoch[LABELS[epoch] == 0].sort().values.tolist() == list(range(6))


def test_under_sampling_cuts_every_class_to_the_smallest_without_repeats():
    epoch = class_balanced_indices(LABELS, "under", epoch=0, seed=1)
    assert LABELS[epoch].bincount().tolist() == [1, 1, 1] and epoch.unique().numel() == 3
    assert {tuple(class_balanced_indices(LABELS, "under", e).sort().values.tolist()) for e in range(20)} != {
        tuple(epoch.sort().values.tolist())
    }  # the majority classes are drawn afresh each epoch


def test_sampler_is_a_function_of_seed_and_epoch_with_the_right_length():
    sampler = ClassBalancedSampler(LABELS, "over", seed=3)
    assert len(sampler) == 18 and len(ClassBalancedSampler(LABELS, "under")) == 3
    sampler.set_epoch(2)
    first = list(sampler)
    assert len(first) == 18 and first == list(sampler)
    assert first == class_balanced_indices(LABELS, "over", 2, seed=3).tolist()
    sampler.set_epoch(3)
    assert list(sampler) != first
    with pytest.raises(ValueError, match="mode must be 'over' or 'under'"):
        ClassBalancedSampler(LABELS, "both")
    with pytest.raises(ValueError, match="labels must be"):
        ClassBalancedSampler(torch.rand(4))


def _loader(world: int = 1, rank: int = 0) -> DataLoader:
    """The training loader as Lightning prepares it; under DDP with the DistributedSamplerWrapper it injects."""
    from lightning.fabric.utilities.data import _replace_dunder_methods
    from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
    from lightning.pytorch.utilities.data import _update_dataloader

    data = ArrayDataset(torch.arange(10.0), LABELS)
    with _replace_dunder_methods(DataLoader, "dataset"):
        loader = ResumableDataLoader(data, batch_size=2, sampler=ClassBalancedSampler(LABELS, "over", seed=4))
    if world > 1:
        wrapper = DistributedSamplerWrapper(loader.sampler, num_replicas=world, rank=rank, shuffle=True, seed=0)
        loader = _update_dataloader(loader, wrapper)
    return loader


def _served(loader, epoch: int, batches: int | None = None) -> list[int]:
    """The indices the loader serves in ``epoch`` (its first ``batches`` batches, or all), set up as Lightning
    does: the iterator is created before the epoch is set."""
    served = iter(loader)
    _set_sampler_epoch(loader, epoch)
    return [i for batch in islice(served, batches) for i in batch["index"].tolist()]


def test_ddp_shards_are_rank_disjoint_equal_slices_of_one_balanced_epoch():
    shards = [_served(_loader(world=3, rank=rank), epoch=1) for rank in range(3)]
    assert [len(s) for s in shards] == [6, 6, 6]  # 18 = 3 x 6: no padding
    whole = sorted(i for shard in shards for i in shard)
    assert whole == sorted(class_balanced_indices(LABELS, "over", 1, seed=4).tolist())  # same epoch list
    assert LABELS[whole].bincount().tolist() == [6, 6, 6]


@pytest.mark.parametrize("world", [1, 2])
def test_resumes_mid_epoch_with_the_next_batch(world):
    for rank in range(world):
        uninterrupted = _served(_loader(world, rank), epoch=5)
        loader = _loader(world, rank)
        assert _served(loader, epoch=5, batches=2) == uninterrupted[:4]
        assert loader.state_dict() == {"epoch": 5, "batches": 2}
        resumed = _loader(world, rank)  # a fresh process
        resumed.load_state_dict(loader.state_dict())
        assert _served(resumed, epoch=5) == uninterrupted[4:]


# ---------------------------------------------------------------- metrics
def test_group_accuracy_is_the_mean_per_class_recall():
    # recalls: class 0 1/4, class 1 2/2, class 2 0/1, class 3 has no samples
    target = torch.tensor([0, 0, 0, 0, 1, 1, 2])
    preds = torch.eye(4)[torch.tensor([0, 1, 1, 2, 1, 1, 0])]
    metric = ClassGroupAccuracy(4)
    metric.update(preds, target)
    assert metric.compute().item() == pytest.approx((0.25 + 1.0 + 0.0) / 3)
    head = ClassGroupAccuracy(4, classes=[0, 1])
    head.update(preds, target)
    assert head.compute().item() == pytest.approx(0.625)
    empty = ClassGroupAccuracy(4, classes=[3])
    empty.update(preds, target)
    assert torch.isnan(empty.compute())
    # DDP: the per-class counts of two ranks are summed, giving the value of the whole set
    ranks = [ClassGroupAccuracy(4), ClassGroupAccuracy(4)]
    ranks[0].update(preds[:3], target[:3])
    ranks[1].update(preds[3:], target[3:])
    ranks[0].merge_state(ranks[1])
    assert ranks[0].compute().item() == pytest.approx(metric.compute().item())
    with pytest.raises(ValueError, match=r"class ids in \[0, 4\)"):
        ClassGroupAccuracy(4, classes=[4])


def test_shot_groups_by_thresholds_or_thirds():
    groups = shot_groups([347, 208, 124, 74, 44, 26, 16, 9, 5, 3])  # MNIST-1D at rho=100
    assert {k: v.tolist() for k, v in groups.items()} == {"many": [0, 1, 2], "medium": [3, 4, 5], "few": [6, 7, 8, 9]}
    thirds = shot_groups([40, 90, 120, 60, 50, 30, 200])  # no class under 20: thirds by count (3, 2, 2)
    assert {k: v.tolist() for k, v in thirds.items()} == {"many": [1, 2, 6], "medium": [3, 4], "few": [0, 5]}
    assert shot_groups([5, 15, 25], many=20, few=10)["medium"].tolist() == [1]
    with pytest.raises(ValueError, match="few <= many"):
        shot_groups([5, 15, 25], many=10, few=20)
    assert set(long_tail_metrics(3, [30, 20, 10])) == {"balanced_acc", "many_acc", "medium_acc", "few_acc"}


# ---------------------------------------------------------------- a real fit
def test_long_tailed_fit_with_over_sampling_logs_the_long_tail_metrics(quiet_trainer_kwargs):
    pl.seed_everything(0)
    dm = DigitsDataModule(batch_size=64, imbalance_ratio=10, balance="over")
    model = Classifier(MLP(64, 10, hidden=(32,)), num_classes=10, optimizer=lambda p: torch.optim.Adam(p, 0.01))
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=6, **quiet_trainer_kwargs)
    trainer.fit(model, dm)
    assert isinstance(trainer.train_dataloader.sampler, ClassBalancedSampler)
    metrics = trainer.callback_metrics
    assert {"val/acc", "val/ece", "val/balanced_acc", "val/many_acc", "val/medium_acc", "val/few_acc"} <= set(metrics)
    assert 0.0 <= float(metrics["val/few_acc"]) <= 1.0
    tested = trainer.test(model, dm, verbose=False)[0]
    assert tested["test/balanced_acc"] == pytest.approx(tested["test/acc"], abs=0.05)  # a near-balanced test split
    with pytest.raises(ValueError, match="few_shot <= many_shot"):
        Classifier(MLP(64, 10), num_classes=10, many_shot=5, few_shot=10)
