"""Continual evaluation: metric formulas on hand-made histories, the streams, ExperienceReplay, the callback."""

import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from lit_tricks import Classifier, ContinualEvaluation, ExperienceReplay, Trick
from lit_tricks.callbacks.experience_replay import reservoir_slots
from lit_tricks.data import ContinualDataModule, DigitsDataModule, split_classes, task_stream
from lit_tricks.functional import continual as cm
from lit_tricks.nets import MLP

nan = math.nan
# Two tasks, 6 evaluations: task 0 is learned during evaluations 0-2, task 1 during 3-5.
ACC = torch.tensor(
    [
        [0.1, nan],
        [0.8, nan],
        [0.9, nan],  # end of task 0
        [0.4, 0.2],  # the stability gap: task 0 drops right after the switch
        [0.7, 0.6],
        [0.8, 0.9],  # end of task 1
    ],
    dtype=torch.float64,
)
CURRENT = torch.tensor([0, 0, 0, 1, 1, 1])


def test_min_acc_and_wc_acc_by_hand():
    # task 0 after it was learned: evaluations 3-5 -> min 0.4 (the task-end 0.9 is excluded)
    assert cm.min_acc(ACC, CURRENT) == pytest.approx(0.4)
    # k = 2 tasks: 1/2 * 0.9 (current task now) + 1/2 * 0.4
    assert cm.wc_acc(ACC, CURRENT) == pytest.approx(0.65)
    assert math.isnan(cm.min_acc(ACC[:3], CURRENT[:3]))
    assert cm.wc_acc(ACC[:3], CURRENT[:3]) == pytest.approx(0.9)


def test_windowed_forgetting_and_plasticity_by_hand():
    # task 0: 0.1 .8 .9 .4 .7 .8; within 2 consecutive evaluations the largest drop is .9 -> .4 = .5;
    # task 1: .2 .6 .9 never drops -> 0; mean .25
    assert cm.windowed_forgetting(ACC, 2) == pytest.approx(0.25)
    # within 3: task 0's .8 -> .4 = .4 is smaller than .9 -> .4, still .5
    assert cm.windowed_forgetting(ACC, 3) == pytest.approx(0.25)
    # rises: task 0 within 2: .1 -> .8 = .7; task 1: .6 -> .9 = .3 (and .2 -> .6 = .4) -> .4; mean .55
    assert cm.windowed_plasticity(ACC, 2) == pytest.approx(0.55)
    # within 3 (pairs up to 2 apart): task 0 .1 -> .9 = .8, task 1 .2 -> .9 = .7
    assert cm.windowed_plasticity(ACC, 3) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="window"):
        cm.windowed_forgetting(ACC, 1)


def test_acc_forgetting_bwt_and_lca_by_hand():
    assert cm.final_accuracy(ACC) == pytest.approx(0.85)
    ends = cm.task_end_matrix(ACC, CURRENT)
    assert ends.tolist()[0][0] == pytest.approx(0.9) and ends.tolist()[1] == pytest.approx([0.8, 0.9])
    assert cm.forgetting(ACC, CURRENT) == pytest.approx(0.1)  # 0.9 at its end, 0.8 at the last
    assert cm.backward_transfer(ACC, CURRENT) == pytest.approx(-0.1)
    # first 2 accuracies of each task while learned: (.1 + .8)/2 and (.2 + .6)/2
    assert cm.learning_curve_area(ACC, CURRENT, beta=2) == pytest.approx((0.45 + 0.4) / 2)


def test_split_classes_and_stream():
    assert split_classes(10, 5).tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert split_classes(4, 2, class_order=[3, 2, 1, 0]).tolist() == [1, 1, 0, 0]
    with pytest.raises(ValueError, match="num_tasks must divide"):
        split_classes(10, 3)
    with pytest.raises(ValueError, match="class_order"):
        split_classes(4, 2, class_order=[0, 0, 1, 2])
    tasks = torch.tensor([0, 1, 0, 1, 0, 1, 2, 2, 2])
    stream = task_stream(tasks, 2, 0.0, torch.Generator().manual_seed(0))
    assert tasks[stream].tolist() == [0] * 6 + [1] * 6 + [2] * 6  # sharp boundaries, each task twice
    assert sorted(stream[:3].tolist()) == [0, 2, 4]
    four = torch.arange(400) // 100
    blurred = four[task_stream(four, 1, 0.2, torch.Generator().manual_seed(0))]
    assert (blurred[:60] == 0).all() and not (blurred[80:120] == blurred[80]).all()  # mixed near the switch


def test_continual_datamodule_scenarios():
    stream = ContinualDataModule(DigitsDataModule(val_fraction=0.0), num_tasks=5)
    stream.setup()
    batch = next(iter(stream.train_dataloader()))
    assert set(batch) >= {"inputs", "targets", "index", "task"} and (batch["task"] == 0).all()
    assert set(batch["targets"].tolist()) <= {0, 1}
    eval_sets = stream.task_eval_sets()
    assert [sorted(set(s.targets.tolist())) for s in eval_sets] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]

    domain = ContinualDataModule(DigitsDataModule(val_fraction=0.0), scenario="domain", num_tasks=5)
    domain.setup()
    assert domain.num_classes == 2
    assert all(sorted(set(s.targets.tolist())) == [0, 1] for s in domain.task_eval_sets())
    assert domain.task_classes() == [[0, 1]] * 5
    assert ContinualDataModule(DigitsDataModule(), scenario="task").task_classes()[1] == [2, 3]
    with pytest.raises(ValueError, match="scenario"):
        ContinualDataModule(DigitsDataModule(), scenario="online")
    with pytest.raises(ValueError, match="blur"):
        ContinualDataModule(DigitsDataModule(), blur=2.0)


def test_reservoir_keeps_a_uniform_sample():
    capacity, counts = 10, torch.zeros(100)
    for trial in range(300):
        generator, memory, seen = torch.Generator().manual_seed(trial), torch.full((capacity,), -1), 0
        for start in range(0, 100, 7):  # batches of 7 samples with ids start..start+6
            ids = torch.arange(start, min(start + 7, 100))
            rows, slots = reservoir_slots(seen, len(ids), capacity, generator)
            memory[slots] = ids[rows]
            seen += len(ids)
        counts[memory] += 1
    assert (memory >= 0).all() and memory.unique().numel() == capacity
    # each of the 100 samples is kept with probability 10/100: 30 times in 300 trials on average
    assert counts.mean() == pytest.approx(30) and counts.min() > 10 and counts.max() < 55
    assert abs(counts[:50].sum() - counts[50:].sum()) < 0.15 * counts.sum()  # no bias to early or late samples


def test_reservoir_fills_in_order_then_the_later_duplicate_wins():
    rows, slots = reservoir_slots(0, 4, 10, torch.Generator())
    assert rows.tolist() == [0, 1, 2, 3] and slots.tolist() == [0, 1, 2, 3]


def _fit(callbacks, quiet, stream=None, model=None, **kwargs):
    pl.seed_everything(0, verbose=False)
    model = model or Classifier(MLP(64, 10, hidden=(32,), dropout=0.2), num_classes=10)
    stream = stream or ContinualDataModule(DigitsDataModule(val_fraction=0.0, batch_size=32), num_tasks=5)
    trainer = pl.Trainer(max_epochs=1, callbacks=callbacks, **{**quiet, **kwargs})
    trainer.fit(model, stream)
    return trainer, model


def test_experience_replay_weights_and_memory(quiet_trainer_kwargs):
    seen = []

    class Spy(Trick):  # runs after the replay
        order = 0

        def before_forward(self, trainer, module, batch):
            seen.append((len(batch), batch.weight, batch.extras["task"].clone()))
            return batch

    replay = ExperienceReplay(memory_size=50, replay_batch_size=16, new_weight=0.3)
    _fit([replay, Spy()], quiet_trainer_kwargs)
    assert seen[0][0] == 32 and seen[0][1] is None  # empty memory: the plain batch
    size, weight, tasks = seen[-2]  # (the last batch is partial)
    assert size == 32 + 16
    torch.testing.assert_close(weight[:32], torch.full((32,), 0.3 * 48 / 32))
    torch.testing.assert_close(weight[32:], torch.full((16,), 0.7 * 48 / 16))
    assert (weight[:32] * 1).mean() * 32 / 48 + weight[32:].mean() * 16 / 48 == pytest.approx(1.0)
    assert tasks[:32].max() == 4 and tasks[32:].min() < 4  # old tasks replayed during the last one
    assert replay.seen == 1438 and replay.memory["task"].unique().numel() == 5


def test_experience_replay_errors():
    with pytest.raises(ValueError, match="memory_size"):
        ExperienceReplay(memory_size=0)
    with pytest.raises(ValueError, match="new_weight"):
        ExperienceReplay(new_weight=0.0)


def test_continual_evaluation_in_a_fit(quiet_trainer_kwargs, tmp_path):
    evaluation = ContinualEvaluation(every_n_steps=3, windows=(5, 20))
    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer, model = _fit([evaluation], {**quiet_trainer_kwargs, "logger": logger})
    steps, current, acc = evaluation.history()
    assert steps[0] == 0 and steps[-1] == trainer.global_step
    assert current.unique().tolist() == [0, 1, 2, 3, 4]
    assert acc.shape[1] == 5 and acc[0, 1:].isnan().all() and not acc[-1].isnan().any()
    # every switch evaluated right before the new task's first step
    switches = [int(steps[e]) for e in range(1, len(current)) if current[e] != current[e - 1]]
    assert len(switches) == 4
    # the accuracies are the model's: the last row equals a direct evaluation of the trained model
    stream = trainer.datamodule
    model.eval()
    direct = [(model(s.inputs).argmax(-1) == s.targets).double().mean().item() for s in stream.task_eval_sets()]
    torch.testing.assert_close(acc[-1], torch.tensor(direct, dtype=torch.float64))
    summary = evaluation.summary()
    assert {"acc", "min_acc", "wc_acc", "wf5", "wf20", "wp5", "forgetting", "bwt", "lca10"} <= set(summary)
    assert summary["acc"] < 0.5  # fine-tuning forgets: about 1/T
    assert summary["min_acc"] <= evaluation.summary(end_of_task_only=True)["min_acc"]
    event_files = list((tmp_path / "tb").rglob("events.out.tfevents.*"))
    assert event_files and event_files[0].stat().st_size > 10_000  # per-step scalars and the figure


def test_continual_evaluation_does_not_change_training(quiet_trainer_kwargs):
    _, with_eval = _fit([ContinualEvaluation(every_n_steps=1), ExperienceReplay(100)], quiet_trainer_kwargs)
    _, without = _fit([ExperienceReplay(100)], quiet_trainer_kwargs)
    for (name, a), b in zip(with_eval.state_dict().items(), without.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_replay_beats_fine_tuning_and_shows_a_gap(quiet_trainer_kwargs):
    def run(callbacks):
        evaluation = ContinualEvaluation(every_n_steps=1)
        stream = ContinualDataModule(DigitsDataModule(val_fraction=0.0, batch_size=32), epochs_per_task=10)
        sgd = lambda params: torch.optim.SGD(params, lr=0.05)  # noqa: E731
        model = Classifier(MLP(64, 10, hidden=(200, 200)), 10, optimizer=sgd)
        _fit([*callbacks, evaluation], quiet_trainer_kwargs, stream, model)
        return evaluation.summary(), evaluation.summary(end_of_task_only=True)

    finetune, _ = run([])
    replay, replay_coarse = run([ExperienceReplay(memory_size=200)])
    assert finetune["acc"] < 0.25 and finetune["min_acc"] < 0.05  # fine-tuning ends near 1/T
    assert replay["acc"] > 0.8
    assert replay["min_acc"] < replay_coarse["min_acc"] - 0.1  # per-step evaluation sees the gap


def test_continual_evaluation_errors(quiet_trainer_kwargs):
    with pytest.raises(ValueError, match="every_n_steps"):
        ContinualEvaluation(every_n_steps=0)
    with pytest.raises(ValueError, match="windows"):
        ContinualEvaluation(windows=(1,))
    with pytest.raises(ValueError, match="subset_size=5000"):
        _fit([ContinualEvaluation(subset_size=5000)], quiet_trainer_kwargs)
    with pytest.raises(ValueError, match="one evaluation set per task"):
        _fit([ContinualEvaluation()], quiet_trainer_kwargs, stream=DigitsDataModule())
    stream = ContinualDataModule(DigitsDataModule(val_fraction=0.0), num_tasks=5)
    stream.setup()
    no_task = DigitsDataModule()
    no_task.task_eval_sets = stream.task_eval_sets
    with pytest.raises(ValueError, match="batch\\['task'\\]"):
        _fit([ContinualEvaluation()], quiet_trainer_kwargs, stream=no_task)
    with pytest.raises(ValueError, match="No evaluation"):
        ContinualEvaluation().summary()


def test_batch_task_reads_the_largest_id_or_names_the_reader():
    from types import SimpleNamespace

    from lit_tricks.core.tasks import batch_task

    trainer = SimpleNamespace(world_size=1)
    batch = {"inputs": torch.zeros(3, 2), "targets": torch.zeros(3, dtype=torch.long), "task": torch.tensor([1, 2, 1])}
    assert batch_task(trainer, None, batch, reader="X") == 2
    plain = {"inputs": torch.zeros(3, 2), "targets": torch.zeros(3, dtype=torch.long)}
    assert batch_task(trainer, None, plain, reader=None) is None
    with pytest.raises(ValueError, match=r"Y reads the current task from batch\['task'\].*ContinualDataModule"):
        batch_task(trainer, None, plain, reader="Y")
