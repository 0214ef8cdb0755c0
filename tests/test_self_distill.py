import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from conftest import PlainModule
from torch.utils.data import DataLoader, TensorDataset

from lit_tricks import Classifier, EMATeacher, SelfDistill, Trick
from lit_tricks.data import DigitsDataModule
from lit_tricks.functional import distillation_kl, pskd_alpha, pskd_targets, sigmoid_rampup
from lit_tricks.nets import MLP


# ---------------------------------------------------------------- the math
def test_pskd_schedule_and_targets_by_hand():
    assert pskd_alpha(0, 10, 0.8) == pytest.approx(0.08)
    assert pskd_alpha(4, 10, 0.8) == pytest.approx(0.4)
    assert pskd_alpha(9, 10, 0.8) == pytest.approx(0.8)
    assert pskd_alpha(14, 10, 0.8) == pytest.approx(0.8)  # training past total_epochs holds alpha_T
    onehot, past = torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[0.5, 0.3, 0.2]])
    torch.testing.assert_close(pskd_targets(onehot, past, 0.4), torch.tensor([[0.8, 0.12, 0.08]]))


def test_distillation_kl_by_hand():
    student = torch.tensor([[math.log(3.0), 0.0]])  # softmax [0.75, 0.25]
    teacher = torch.tensor([[0.0, 0.0]])  # softmax [0.5, 0.5]
    expected = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert distillation_kl(student, teacher).item() == pytest.approx(expected)
    # at temperature T the logits are divided by T and the result scaled by T^2
    scaled = distillation_kl(2 * student, 2 * teacher, temperature=2.0)
    assert scaled.item() == pytest.approx(4 * expected)
    assert distillation_kl(teacher, teacher).item() == 0.0


def test_sigmoid_rampup_by_hand():
    assert sigmoid_rampup(0, 10) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(5, 10) == pytest.approx(math.exp(-1.25))
    assert sigmoid_rampup(20, 10) == 1.0 and sigmoid_rampup(0, 0) == 1.0


# ---------------------------------------------------------------- in a real fit
class Spy(Trick):
    """Sees the batch after SelfDistill's before_forward and the output after its after_loss."""

    order = 5

    def __init__(self, self_distill):
        self.self_distill, self.records = self_distill, []

    def before_forward(self, trainer, module, batch):
        table = self.self_distill.table
        record = {"epoch": trainer.current_epoch, "targets": batch.targets.clone(), "index": batch.index.clone()}
        if table.values is not None:
            record["past"] = table.values[batch.index].clone()
            record["seen"] = table.seen[batch.index].clone()
        record["labels"] = batch.extras["clean_targets"]
        self.records.append(record)
        return batch

    def after_loss(self, trainer, module, batch, out):
        self.records[-1]["logits"] = out.logits.detach().clone()
        self.records[-1]["inputs"] = batch.inputs
        self.records[-1]["aux"] = {k: v.detach() for k, v in out.aux_losses.items()}
        return out


def _fit(tricks, quiet_trainer_kwargs, **trainer_kwargs):
    pl.seed_everything(0, verbose=False)
    model = Classifier(MLP(64, 10, hidden=(32,)), num_classes=10)
    trainer_kwargs.setdefault("max_epochs", 3)
    trainer = pl.Trainer(
        limit_train_batches=4, limit_val_batches=0, callbacks=tricks, **quiet_trainer_kwargs, **trainer_kwargs
    )
    trainer.fit(model, DigitsDataModule(batch_size=16))
    return trainer, model


def test_pskd_targets_in_a_real_fit(quiet_trainer_kwargs):
    pskd = SelfDistill("past_predictions", alpha_T=0.8)
    spy = Spy(pskd)
    _fit([pskd, spy], quiet_trainer_kwargs)
    assert len(spy.records) == 12
    for record in spy.records:
        onehot = F.one_hot(record["labels"], 10).float()
        if record["epoch"] == 0:
            assert torch.equal(record["targets"], record["labels"])  # epoch 0: the labels, left as class ids
            continue
        alpha = 0.8 * (record["epoch"] + 1) / 3
        past = torch.where(record["seen"][:, None], record["past"].float(), onehot)
        torch.testing.assert_close(record["targets"], (1 - alpha) * onehot + alpha * past)
    # batches are reshuffled each epoch, so later epochs meet both remembered and new samples
    assert any(r["seen"].any() for r in spy.records if r["epoch"] > 0)
    # each row holds the softmax of the step that last saw the sample
    last = spy.records[-1]
    torch.testing.assert_close(pskd.table.values[last["index"]], last["logits"].softmax(dim=-1))
    assert pskd.table.seen.sum() == len(torch.unique(torch.cat([r["index"] for r in spy.records])))


def test_pskd_float16_table(quiet_trainer_kwargs):
    pskd = SelfDistill("past_predictions", table_dtype="float16")
    _fit([pskd], quiet_trainer_kwargs, max_epochs=2)
    assert pskd.table.values.dtype == torch.float16 and pskd.table.values.shape == (1438 - 144, 10)


def test_ema_distillation_loss_in_a_real_fit(quiet_trainer_kwargs):
    ema = EMATeacher(decay=0.9)
    kd = SelfDistill("ema", temperature=2.0, weight=0.5, rampup_steps=6)
    spy = Spy(kd)
    trainer, model = _fit([ema, kd, spy], quiet_trainer_kwargs, max_epochs=1)
    last = spy.records[-1]
    teacher = ema.teacher(last["inputs"])  # cached: the same tensor the step used
    expected = 0.5 * sigmoid_rampup(3, 6) * distillation_kl(last["logits"], teacher, 2.0).mean()
    torch.testing.assert_close(last["aux"]["distill"], expected)
    assert "train/distill" in trainer.callback_metrics and "train/task_loss" in trainer.callback_metrics


# ---------------------------------------------------------------- bad input
def test_pskd_without_index(quiet_trainer_kwargs):
    loader = DataLoader(TensorDataset(torch.randn(32, 64), torch.randint(0, 10, (32,))), batch_size=8)
    trainer = pl.Trainer(max_epochs=1, callbacks=[SelfDistill()], **quiet_trainer_kwargs)
    with pytest.raises(ValueError, match="SelfDistill keep per-sample memories and need dataset indices"):
        trainer.fit(Classifier(MLP(64, 10), num_classes=10), loader)


def test_ema_teacher_missing(quiet_trainer_kwargs):
    with pytest.raises(ValueError, match="add lit_tricks.EMATeacher"):
        _fit([SelfDistill("ema")], quiet_trainer_kwargs)


def test_pskd_needs_a_number_of_epochs(quiet_trainer_kwargs):
    with pytest.raises(ValueError, match="needs the number of epochs"):
        _fit([SelfDistill()], quiet_trainer_kwargs, max_epochs=-1, max_steps=3)
    trainer, _ = _fit([SelfDistill(total_epochs=4)], quiet_trainer_kwargs, max_epochs=-1, max_steps=5)
    assert trainer.global_step == 5


def test_on_a_plain_lightning_module(quiet_trainer_kwargs):
    with pytest.raises(TypeError, match="SelfDistill shapes the training step.*TrickModule"):
        pl.Trainer(max_epochs=1, callbacks=[SelfDistill()], **quiet_trainer_kwargs).fit(
            PlainModule(), DigitsDataModule()
        )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"teacher": "self"}, "teacher must be"),
        ({"alpha_T": 1.5}, r"alpha_T must be a finite number in \[0.0, 1.0\]"),
        ({"temperature": float("nan")}, "temperature must be a finite number"),
        ({"weight": float("inf")}, "weight must be a finite number"),
        ({"total_epochs": 2.5}, "total_epochs must be an integer"),
        ({"total_epochs": 0}, "total_epochs"),
        ({"table_dtype": "int8"}, "table_dtype"),
        ({"temperature": 0.0}, "temperature"),
        ({"weight": -1.0}, "weight"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        SelfDistill(**kwargs)


def test_pskd_targets_are_mixed_consistently_by_mixup(quiet_trainer_kwargs):
    import numpy as np
    from lightning.pytorch.callbacks import Callback

    from lit_tricks import Mixup

    class Snapshot(Callback):
        def __init__(self):
            self.batches = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.batches.append({"inputs": batch["inputs"].clone(), "targets": batch["targets"].clone()})

    pskd = SelfDistill("past_predictions", alpha_T=0.8)
    snapshot, spy = Snapshot(), Spy(pskd)
    # callbacks listed in the "wrong" order: SelfDistill's order (-10) still runs it before Mixup (0)
    _fit([snapshot, Mixup(alpha=0.4, seed=1), pskd, spy], quiet_trainer_kwargs, max_epochs=2)
    rng = np.random.default_rng(1)
    for original, record in zip(snapshot.batches, spy.records, strict=True):
        rng.random()
        perm, lam = torch.as_tensor(rng.permutation(16)), float(rng.beta(0.4, 0.4))
        onehot = F.one_hot(original["targets"], 10).float()
        alpha = 0.0 if record["epoch"] == 0 else 0.8 * (record["epoch"] + 1) / 2
        past = torch.where(record["seen"][:, None], record["past"].float(), onehot)
        pskd_target = (1 - alpha) * onehot + alpha * past
        torch.testing.assert_close(record["targets"], lam * pskd_target + (1 - lam) * pskd_target[perm])
    assert any(r["seen"].any() for r in spy.records if r["epoch"] == 1)
