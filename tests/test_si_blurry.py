"""Si-Blurry: the stream against the authors' sampler and its statistics, the data-module mode, the online metrics."""

import math

import lightning.pytorch as pl
import pytest
import torch

from lit_tricks import Classifier, ContinualEvaluation
from lit_tricks.data import ContinualDataModule, DigitsDataModule
from lit_tricks.data.si_blurry import si_blurry_classes, si_blurry_split
from lit_tricks.functional import continual as cm
from lit_tricks.nets import MLP

# The authors' OnlineSampler (KHU-AGI/Si-Blurry @c90d6d7, utils/online_sampler.py, varing_NM=True) on 60 samples
# with target i % 10, 5 tasks, N=50, M=50, rnd_seed=1: classes per task and each task's sample order.
GOLD_DISJOINT = [[5], [6], [1], [2], [0]]
GOLD_BLURRY = [[], [8, 9], [3], [], [7, 4]]
GOLD_TASKS = [
    [25, 35, 55, 45, 5, 15],
    [34, 38, 26, 19, 18, 49, 16, 9, 46, 58, 59, 56, 6, 39, 36, 28, 29, 48],
    [1, 27, 51, 33, 13, 41, 21, 31, 11, 43, 53, 23],
    [32, 42, 2, 22, 4, 12, 24, 14, 52, 37],
    [20, 54, 0, 17, 44, 40, 57, 47, 10, 30, 8, 3, 7, 50],
]


@pytest.fixture(scope="module")
def digits_targets():
    data = DigitsDataModule(val_fraction=0.0)
    data.setup()
    return data.train_set.targets


def test_stream_equals_the_authors_sampler():
    split = si_blurry_split(torch.arange(10).repeat(6), 10, num_tasks=5, disjoint_percent=50, blurry_percent=50, seed=1)
    assert split.disjoint_classes == GOLD_DISJOINT and split.blurry_classes == GOLD_BLURRY
    assert [split.stream[split.stream_task == k].tolist() for k in range(5)] == GOLD_TASKS
    assert split.task_sizes() == [6, 18, 12, 10, 14]


def test_class_split_by_hand():
    # N=50 of 10 classes over 5 tasks: the first 5 of the random order are disjoint, cut at 4 sorted draws in 0..4
    generator = torch.Generator().manual_seed(7)
    order = torch.randperm(10, generator=generator).tolist()
    cuts = [0, *torch.randint(0, 5, (4,), generator=generator).sort().values.tolist(), 5]
    blurry_cuts = [0, *torch.randint(0, 5, (4,), generator=generator).sort().values.tolist(), 5]
    disjoint, blurry = si_blurry_classes(10, 5, 50, torch.Generator().manual_seed(7))
    assert disjoint == [order[cuts[k] : cuts[k + 1]] for k in range(5)]
    assert blurry == [order[5:][blurry_cuts[k] : blurry_cuts[k + 1]] for k in range(5)]
    # 30% of 10 classes over 4 tasks: 3 -> 0 disjoint (rounded down to a multiple of 4), all 10 blurry
    disjoint, blurry = si_blurry_classes(10, 4, 30, torch.Generator().manual_seed(0))
    assert disjoint == [[]] * 4 and sorted(sum(blurry, [])) == list(range(10))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stream_statistics(digits_targets, seed):
    targets = digits_targets
    split = si_blurry_split(targets, 10, num_tasks=5, disjoint_percent=50, blurry_percent=10, seed=seed)
    # every training sample exactly once; tasks in order
    assert sorted(split.stream.tolist()) == list(range(len(targets)))
    assert torch.equal(split.stream_task, split.stream_task.sort().values)
    stream_targets, home = targets[split.stream], split.task_of_class[targets[split.stream]]
    # 5 disjoint classes, each seen only in its own task
    disjoint = sum(split.disjoint_classes, [])
    assert len(disjoint) == 5 and sorted(disjoint + sum(split.blurry_classes, [])) == list(range(10))
    for c in disjoint:
        assert set(split.stream_task[stream_targets == c].tolist()) == {int(split.task_of_class[c])}
    # blurry classes: at most floor(10% of their samples) outside their home task, and some do leak
    blurry_rows = ~torch.isin(stream_targets, torch.tensor(disjoint))
    away = (split.stream_task != home) & blurry_rows
    assert 0 < int(away.sum()) <= int(blurry_rows.sum()) * 10 // 100
    assert not ((split.stream_task != home) & ~blurry_rows).any()
    # tasks of random size
    assert len(set(split.task_sizes())) > 1


def test_task_sizes_and_classes_vary_with_the_seed(digits_targets):
    splits = [si_blurry_split(digits_targets, 10, seed=s) for s in range(4)]
    assert len({tuple(s.task_sizes()) for s in splits}) == 4
    assert len({str(s.disjoint_classes) for s in splits}) > 1
    same = si_blurry_split(digits_targets, 10, seed=2)
    assert torch.equal(same.stream, splits[2].stream)  # reproducible


def test_no_leak_without_blurry_samples(digits_targets):
    split = si_blurry_split(digits_targets, 10, disjoint_percent=0, blurry_percent=0, seed=3)
    assert torch.equal(split.stream_task, split.task_of_class[digits_targets[split.stream]])


def test_data_module_mode():
    stream = ContinualDataModule(DigitsDataModule(val_fraction=0.0), scenario="si_blurry", seed=1)
    homes = stream.task_of_class.clone()
    stream.setup()
    assert torch.equal(homes, stream.si_blurry.task_of_class)
    train = stream.train_set
    assert torch.equal(train.extras["task"], stream.si_blurry.stream_task)  # the stream's task, not the class's
    assert train.targets.tolist() == stream.dataset.train_set.targets[stream.si_blurry.stream].tolist()
    eval_sets = stream.task_eval_sets()
    assert sum(len(e) for e in eval_sets) == len(stream.test_set)
    for k, data in enumerate(eval_sets):
        assert set(data.targets.tolist()) <= set(
            stream.si_blurry.disjoint_classes[k] + stream.si_blurry.blurry_classes[k]
        )


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"epochs_per_task": 2}, ValueError, "online"),
        ({"blur": 0.2}, ValueError, "blur=0"),
        ({"class_order": list(range(10))}, ValueError, "class_order=None"),
        ({"disjoint_percent": 150}, ValueError, "disjoint_percent"),
        ({"blurry_percent": -1}, ValueError, "blurry_percent"),
        ({"blurry_percent": 0.5}, TypeError, "blurry_percent"),
        ({"num_tasks": 11}, ValueError, "num_tasks"),
    ],
)
def test_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        ContinualDataModule(DigitsDataModule(val_fraction=0.0), scenario="si_blurry", **kwargs)
    with pytest.raises(ValueError, match="eval_period"):
        ContinualEvaluation(eval_period=0)


def _fit(eval_period, model=None, every_n_steps=5):
    pl.seed_everything(0, verbose=False)
    stream = ContinualDataModule(DigitsDataModule(val_fraction=0.0, batch_size=32), scenario="si_blurry", seed=1)
    evaluation = ContinualEvaluation(every_n_steps=every_n_steps, eval_period=eval_period)
    trainer = pl.Trainer(max_epochs=1, callbacks=[evaluation], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    model = model or Classifier(MLP(64, 10, hidden=(32,)), num_classes=10)
    trainer.fit(model, stream)
    return evaluation, stream


def test_online_metrics_by_hand():
    # a model whose logits rank the classes 0 > 1 > ... and never learn (lr 0): on the seen classes it predicts the
    # smallest seen class, so each online accuracy is that class's share of the seen classes' test samples
    net = torch.nn.Linear(64, 10)
    torch.nn.init.zeros_(net.weight)
    net.bias.data = -torch.arange(10.0)
    frozen = Classifier(net, num_classes=10, optimizer=lambda p: torch.optim.SGD(p, lr=0.0))
    evaluation, stream = _fit(100, frozen, every_n_steps=1000)
    train_targets, test_targets = stream.train_set.targets, stream.test_set.targets
    assert evaluation.online_samples[:3] == [128, 224, 320]  # the first counts above 100, 200, 300 (32 per step)
    assert evaluation.next_online == 100 * (len(evaluation.online_samples) + 1)

    def accuracy(samples):
        seen = torch.unique(train_targets[:samples])
        return float((test_targets == seen.min()).sum() / torch.isin(test_targets, seen).sum())

    expected = [accuracy(n) for n in evaluation.online_samples]
    assert evaluation.online_accuracy == pytest.approx(expected)
    summary = evaluation.summary()
    assert summary["a_auc"] == pytest.approx(sum(expected) / len(expected))
    assert summary["a_last"] == pytest.approx(accuracy(len(train_targets)))
    # task ends: evaluated before the first batch whose highest task is new, on the samples before it
    batch_task = stream.train_set.extras["task"].split(32)
    switches = [b * 32 for b in range(1, len(batch_task)) if batch_task[b].max() > batch_task[b - 1].max()]
    task_ends = [accuracy(n) for n in switches]
    assert len(task_ends) == len(evaluation.online_task_end) >= 2
    assert summary["a_avg"] == pytest.approx((sum(task_ends) + summary["a_last"]) / (len(task_ends) + 1))


def test_online_metrics_add_keys_and_change_nothing_else():
    plain, _ = _fit(None)
    online, _ = _fit(200)
    before, after = plain.summary(), online.summary()
    assert set(after) - set(before) == {"a_auc", "a_last", "a_avg"}
    assert {k: after[k] for k in before} == pytest.approx(before, nan_ok=True)
    assert plain.accuracy == online.accuracy
    assert 0.0 < after["a_last"] <= 1.0 and 0.0 < after["a_auc"] <= 1.0
    state = online.state_dict()
    restored = ContinualEvaluation(eval_period=200)
    restored.load_state_dict(state)
    assert restored.online_accuracy == online.online_accuracy and restored.samples == online.samples
    assert "online" not in plain.state_dict()


def test_metrics_skip_a_task_without_evaluation_samples():
    # a Si-Blurry task can own no class (seed 2 on Digits: task 0 is 2 leaked samples), so its accuracy is NaN
    nan = float("nan")
    acc = torch.tensor(
        [[0.5, nan, nan], [0.9, nan, nan], [0.6, nan, nan], [0.7, nan, 0.3], [0.8, nan, 0.9]], dtype=torch.float64
    )
    current = torch.tensor([0, 0, 1, 2, 2])
    assert cm.min_acc(acc, current) == pytest.approx(0.6)  # task 0's minimum after it was learned; task 1 skipped
    assert cm.forgetting(acc, current) == pytest.approx(0.1)
    assert cm.backward_transfer(acc, current) == pytest.approx(-0.1)
    assert cm.learning_curve_area(acc, current, 10) == pytest.approx((0.7 + 0.6) / 2)
    assert cm.windowed_forgetting(acc[:, 1:2], 10) != cm.windowed_forgetting(acc[:, 1:2], 10)  # NaN, no error
    pl.seed_everything(2, verbose=False)
    stream = ContinualDataModule(DigitsDataModule(val_fraction=0.0, batch_size=32), scenario="si_blurry", seed=2)
    evaluation = ContinualEvaluation(every_n_steps=5, eval_period=100)
    trainer = pl.Trainer(max_epochs=1, callbacks=[evaluation], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(Classifier(MLP(64, 10, hidden=(32,)), num_classes=10), stream)
    assert stream.si_blurry.task_sizes()[0] == 2 and len(stream.task_eval_sets()[0]) == 0
    assert all(math.isfinite(v) for v in evaluation.summary().values())
