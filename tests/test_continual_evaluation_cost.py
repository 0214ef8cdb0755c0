"""ContinualEvaluation's lean evaluation loop gives exactly the accuracies of the previous loop (issue #20)."""

import math

import lightning.pytorch as pl
import pytest
import torch

from lit_tricks import Classifier, ContinualEvaluation
from lit_tricks.core.eval_mode import eval_mode
from lit_tricks.data import ContinualDataModule, DigitsDataModule
from lit_tricks.nets import MLP


def _reference(callback: ContinualEvaluation, module: pl.LightningModule) -> list[float]:
    """The evaluation loop before issue #20: a per-sample hit buffer, its copy, correct and total counted with two
    ``index_add_`` calls, the task-incremental masks gathered per batch."""
    seen, end = callback.task + 1, callback._ends[callback.task]
    masks = None if callback._class_masks is None else callback._class_masks.to(module.device)
    with torch.inference_mode(), eval_mode(module):
        hits = torch.zeros(end)
        for start in range(0, end, callback.batch_size):
            rows = slice(start, min(start + callback.batch_size, end))
            logits = module(callback._inputs[rows])
            if masks is not None:
                logits = logits.masked_fill(~masks[callback._task_ids[rows]], -math.inf)
            hits[rows] = (logits.argmax(dim=-1) == callback._targets[rows]).float()
    hits = hits.clone()
    correct = torch.zeros(2, seen)
    correct[0].index_add_(0, callback._task_ids[:end], hits)
    correct[1].index_add_(0, callback._task_ids[:end], torch.ones_like(hits))
    return (correct[0] / correct[1]).tolist()


class _Checked(ContinualEvaluation):
    """Runs the reference loop on the same model right after every evaluation."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.pairs: list[tuple[list[float], list[float]]] = []

    def evaluate(self, trainer, pl_module, record=True):
        point = super().evaluate(trainer, pl_module, record)
        self.pairs.append((point[2][: self.task + 1], _reference(self, pl_module)))
        return point


@pytest.mark.parametrize("task_incremental", [False, True])
def test_lean_loop_gives_the_reference_accuracies(quiet_trainer_kwargs, task_incremental):
    pl.seed_everything(0, verbose=False)
    # batch_size 37 does not divide the subsets, so batches straddle task boundaries
    evaluation = _Checked(every_n_steps=1, batch_size=37, task_incremental=task_incremental)
    stream = ContinualDataModule(DigitsDataModule(val_fraction=0.0, batch_size=64), num_tasks=5)
    model = Classifier(MLP(64, 10, hidden=(32,), dropout=0.2), num_classes=10)
    trainer = pl.Trainer(max_epochs=1, callbacks=[evaluation], **quiet_trainer_kwargs)
    trainer.fit(model, stream)
    assert len(evaluation.pairs) == len(evaluation.history()[0]) > 10
    assert {len(new) for new, _ in evaluation.pairs} == {1, 2, 3, 4, 5}  # every prefix of tasks was evaluated
    for new, old in evaluation.pairs:
        assert new == old  # bit for bit
    # the accuracies moved (not a trivial constant history), and task-incremental ones are higher
    accuracies = [a for new, _ in evaluation.pairs for a in new]
    assert len(set(accuracies)) > 10
    if task_incremental:
        assert evaluation.summary()["acc"] > 0.5  # within a task's 2 classes fine-tuning keeps old tasks apart


def test_one_forward_per_batch_of_the_seen_prefix(quiet_trainer_kwargs):
    calls = []
    model = Classifier(MLP(64, 10, hidden=(16,)), num_classes=10)
    model.backbone.register_forward_hook(lambda module, inputs, output: calls.append(len(inputs[0])))
    evaluation = ContinualEvaluation(every_n_steps=1000, subset_size=50, batch_size=64)
    stream = ContinualDataModule(DigitsDataModule(val_fraction=0.0, batch_size=64), num_tasks=5)
    pl.Trainer(max_epochs=1, callbacks=[evaluation], **quiet_trainer_kwargs).fit(model, stream)
    model.eval()
    calls.clear()
    evaluation.task = 2  # three tasks seen: 150 samples, in batches of 64, 64, 22
    trainer = model.trainer
    evaluation.evaluate(trainer, model, record=False)
    assert calls == [64, 64, 22]


def test_stratified_subset_keeps_the_class_mix_and_the_default_is_unchanged():
    targets = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)  # proportions .5 .3 .2
    inputs = torch.arange(100.0).unsqueeze(1)
    x, y = ContinualEvaluation(subset_size=10, stratified=True)._subset(0, inputs, targets)
    assert torch.bincount(y).tolist() == [5, 3, 2]
    assert torch.equal(targets[x.flatten().long()], y) and len(x.unique()) == 10  # real rows, no repeats
    # 7 of 100: quotas 3.5, 2.1, 1.4 -> floors 3, 2, 1 and the one left goes to the largest remainder (class 0)
    assert torch.bincount(
        ContinualEvaluation(subset_size=7, stratified=True)._subset(0, inputs, targets)[1]
    ).tolist() == [4, 2, 1]
    # stratified=False: the uniform draw of before, from the task's private generator
    rows = torch.randperm(100, generator=torch.Generator().manual_seed(3 * 1000 + 2))[:10]
    x, y = ContinualEvaluation(subset_size=10, seed=3)._subset(2, inputs, targets)
    assert torch.equal(x, inputs[rows]) and torch.equal(y, targets[rows])
    with pytest.raises(ValueError, match="stratified=True needs class ids"):
        ContinualEvaluation(subset_size=10, stratified=True)._subset(0, inputs, torch.rand(100, 3))


def test_stratified_subset_in_a_fit(quiet_trainer_kwargs):
    pl.seed_everything(0, verbose=False)
    evaluation = ContinualEvaluation(every_n_steps=5, subset_size=20, stratified=True)
    stream = ContinualDataModule(DigitsDataModule(val_fraction=0.0, batch_size=64), num_tasks=5)
    model = Classifier(MLP(64, 10, hidden=(16,)), num_classes=10)
    pl.Trainer(max_epochs=1, callbacks=[evaluation], **quiet_trainer_kwargs).fit(model, stream)
    for (_, y), members in zip(evaluation._subsets, stream.task_classes(), strict=True):
        assert len(y) == 20 and set(y.tolist()) == set(members)
        assert torch.bincount(y, minlength=10)[members].tolist() in ([10, 10], [11, 9], [9, 11])
    assert not evaluation.history()[2][-1].isnan().any()
