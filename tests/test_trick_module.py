import math

import lightning.pytorch as pl
import pytest
import torch
from conftest import PlainModule
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lit_tricks import ELR, Classifier, EMATeacher, Mixup, SelfDistill, Trick, TrickModule
from lit_tricks.core.trick import logging_due
from lit_tricks.data import DigitsDataModule, IndexedDataset
from lit_tricks.nets import MLP


def _digits_model(**kwargs):
    return Classifier(MLP(64, 10, hidden=(32,)), num_classes=10, **kwargs)


class Recorder(Trick):
    """Records the order of calls and the values the pipeline produced."""

    def __init__(self, name, calls, order=0, aux=None, needs_features=False):
        self.name, self.calls, self.order, self.aux, self.needs_features = name, calls, order, aux, needs_features
        self.seen = {}

    def before_forward(self, trainer, module, batch):
        self.calls.append(("before_forward", self.name))
        return batch

    def after_loss(self, trainer, module, batch, out):
        self.calls.append(("after_loss", self.name))
        self.seen = {"per_sample_loss": out.per_sample_loss.detach(), "features": out.features}
        if self.aux is not None:
            out.aux_losses[f"aux_{self.name}"] = torch.tensor(self.aux)
        module.log(self.tag("called"), 1.0)
        return out

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen["loss"] = outputs["loss"].detach()


def test_tricks_run_by_order_then_callback_order(quiet_trainer_kwargs):
    calls = []
    tricks = [Recorder("late", calls, order=5), Recorder("a", calls), Recorder("b", calls)]
    trainer = pl.Trainer(max_steps=1, limit_val_batches=0, callbacks=tricks, **quiet_trainer_kwargs)
    model = _digits_model()
    trainer.fit(model, DigitsDataModule())
    assert [t.name for t in model.tricks] == ["a", "b", "late"]
    names = ["a", "b", "late"]
    assert calls == [("before_forward", n) for n in names] + [("after_loss", n) for n in names]


def test_loss_is_weighted_mean_plus_aux_and_everything_is_logged(quiet_trainer_kwargs):
    class HalfWeights(Trick):
        def before_forward(self, trainer, module, batch):
            batch.weight = torch.zeros(len(batch))
            batch.weight[: len(batch) // 2] = 2.0
            return batch

    recorder = Recorder("r", [], order=1, aux=0.25)
    trainer = pl.Trainer(
        max_steps=1,
        limit_val_batches=0,
        log_every_n_steps=1,
        callbacks=[HalfWeights(), recorder],
        **quiet_trainer_kwargs,
    )
    trainer.fit(_digits_model(), DigitsDataModule(batch_size=16))
    losses = recorder.seen["per_sample_loss"]
    expected = 2.0 * losses[:8].sum() / 16 + 0.25
    torch.testing.assert_close(recorder.seen["loss"], expected)
    logged = trainer.callback_metrics
    for key in ("train/loss", "train/task_loss", "train/aux_r", "train/acc", "tricks/Recorder/called"):
        assert key in logged, key
    torch.testing.assert_close(logged["train/aux_r"], torch.tensor(0.25))


class MemoryLogger(Logger):
    """Keeps every ``log_metrics`` call as ``{step: metrics}``."""

    def __init__(self):
        super().__init__()
        self.steps = {}

    name, version = "memory", 0
    log_hyperparams = lambda self, *args, **kwargs: None  # noqa: E731

    def log_metrics(self, metrics, step=None):
        self.steps.setdefault(step, {}).update(metrics)


class StepTruth(Trick):
    """Logs its step when logging is due, and records what each step really computed."""

    order = 100

    def __init__(self):
        self.loss, self.acc = {}, {}

    def after_loss(self, trainer, module, batch, out):
        step = trainer.global_step
        self.acc[step] = (out.logits.argmax(dim=-1) == batch.hard_targets).float().mean().item()
        out.aux_losses["zero"] = out.logits.sum() * 0.0
        if logging_due(trainer):
            module.log(self.tag("step"), float(step))
        return out

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.loss[trainer.global_step - 1] = outputs["loss"].item()


def test_step_terms_reach_the_logger_at_lightnings_steps_with_that_steps_values(quiet_trainer_kwargs):
    """Terms logged only when logging is due reach the logger at the same steps as a term logged every step
    (train/loss), each with the value of that very step."""
    truth, logger = StepTruth(), MemoryLogger()
    kwargs = {**quiet_trainer_kwargs, "logger": logger}
    trainer = pl.Trainer(max_epochs=2, limit_train_batches=7, limit_val_batches=0, log_every_n_steps=3,
                         callbacks=[truth], **kwargs)  # fmt: skip
    trainer.fit(_digits_model(), DigitsDataModule(batch_size=16))
    train_steps = {step: m for step, m in logger.steps.items() if "train/loss" in m}
    assert sorted(train_steps) == [2, 5, 8, 11]  # Lightning writes after optimizer steps 3, 6, 9, 12
    for step, metrics in train_steps.items():
        assert {"train/acc", "train/task_loss", "train/zero", "tricks/StepTruth/step"} <= set(metrics)
        assert metrics["tricks/StepTruth/step"] == step
        assert metrics["train/loss"] == pytest.approx(truth.loss[step])
        assert metrics["train/acc"] == pytest.approx(truth.acc[step])
    # an epoch's last step feeds callbacks that monitor at the epoch's end, though the logger skips it
    assert trainer.callback_metrics["train/acc"] == pytest.approx(truth.acc[13])


def test_the_overhead_benchmarks_stack_logs_every_term_at_lightnings_steps(quiet_trainer_kwargs):
    """EMATeacher + Mixup + PS-KD + ELR (benchmarks/overhead.py): every term each part logs reaches the logger at
    the steps train/loss does, and at no other step."""
    logger = MemoryLogger()
    tricks = [EMATeacher(decay=0.9), Mixup(alpha=0.2), SelfDistill("past_predictions"), ELR()]
    trainer = pl.Trainer(max_epochs=2, limit_train_batches=7, limit_val_batches=0, log_every_n_steps=3,
                         callbacks=tricks, **{**quiet_trainer_kwargs, "logger": logger})  # fmt: skip
    trainer.fit(_digits_model(), DigitsDataModule(batch_size=16))
    terms = {"train/loss", "train/acc", "train/task_loss", "train/elr_log_regulariser", "train/nonfinite_steps",
             "tricks/EMATeacher/decay", "tricks/EMATeacher/nonfinite", "tricks/Mixup/lam", "tricks/Mixup/cutmix",
             "tricks/SelfDistill/alpha", "tricks/SelfDistill/nonfinite", "tricks/ELR/nonfinite"}  # fmt: skip
    logged = {step: set(metrics) for step, metrics in logger.steps.items() if set(metrics) & terms}
    assert sorted(logged) == [2, 5, 8, 11] and all(names - {"epoch"} == terms for names in logged.values())


class DueRecorder(Trick):
    """Records logging_due and Lightning's own answer in the first and the last per-step hook of every batch."""

    def __init__(self):
        self.first, self.last, self.lightning = [], [], []

    def before_forward(self, trainer, module, batch):
        self.first.append(logging_due(trainer))
        self.lightning.append(trainer._logger_connector.should_update_logs)
        return batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.last.append(logging_due(trainer))


@pytest.mark.parametrize("every", [1, 3])
def test_logging_due_is_lightnings_rule_in_every_hook_and_for_every_trainer(every, quiet_trainer_kwargs):
    """Answered once per batch: Lightning's answer, the same before the forward and after the optimizer step;
    each trainer (fits run one after another in one process) gets its own answers."""
    due = DueRecorder()
    trainer = pl.Trainer(max_steps=6, log_every_n_steps=every, callbacks=[due], **quiet_trainer_kwargs)
    trainer.fit(_digits_model(), DigitsDataModule(batch_size=16))
    assert due.first == due.last == due.lightning == [(step + 1) % every == 0 for step in range(6)]


def test_features_reach_tricks_that_ask(quiet_trainer_kwargs):
    recorder = Recorder("f", [], needs_features=True)
    trainer = pl.Trainer(max_steps=1, limit_val_batches=0, callbacks=[recorder], **quiet_trainer_kwargs)
    trainer.fit(_digits_model(), DigitsDataModule(batch_size=8))
    assert recorder.seen["features"].shape == (8, 32)


def test_module_without_forward_features_says_so(quiet_trainer_kwargs):
    model = Classifier(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), num_classes=10)
    trainer = pl.Trainer(max_steps=1, callbacks=[Recorder("f", [], needs_features=True)], **quiet_trainer_kwargs)
    with pytest.raises(NotImplementedError, match="forward_features"):
        trainer.fit(model, DigitsDataModule())


def test_classifier_learns_digits(quiet_trainer_kwargs):
    pl.seed_everything(0, verbose=False)
    model = _digits_model(optimizer=lambda p: torch.optim.Adam(p, lr=3e-3))
    trainer = pl.Trainer(max_epochs=8, **quiet_trainer_kwargs)
    datamodule = DigitsDataModule()
    trainer.fit(model, datamodule)
    assert trainer.callback_metrics["val/acc"] > 0.9
    result = trainer.test(model, datamodule, verbose=False)[0]
    assert result["test/acc"] > 0.9 and 0 <= result["test/ece"] < 0.2 and result["test/nll"] < 0.5
    probs = torch.cat(trainer.predict(model, datamodule))
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(len(probs)))
    inputs_only = DataLoader([{"inputs": x} for x in torch.randn(6, 64)], batch_size=3)
    assert torch.cat(trainer.predict(model, inputs_only)).shape == (6, 10)


def test_user_loader_with_probability_targets(quiet_trainer_kwargs):
    x = torch.randn(64, 64)
    soft = torch.softmax(torch.randn(64, 10), dim=1)
    loader = DataLoader(TensorDataset(x, soft), batch_size=16)
    trainer = pl.Trainer(max_epochs=1, **quiet_trainer_kwargs)
    trainer.fit(_digits_model(), loader)
    assert trainer.global_step == 4


def test_scheduler_steps(quiet_trainer_kwargs):
    model = _digits_model(
        optimizer=lambda p: torch.optim.SGD(p, lr=1.0),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5),
        scheduler_interval="step",
    )
    trainer = pl.Trainer(max_steps=3, limit_val_batches=0, **quiet_trainer_kwargs)
    trainer.fit(model, DigitsDataModule())
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.125)


# ---------------------------------------------------------------- bad input
class NeedsIndex(Trick):
    needs_index = True


def test_trick_that_needs_index_without_index(quiet_trainer_kwargs):
    loader = DataLoader(TensorDataset(torch.randn(32, 64), torch.randint(0, 10, (32,))), batch_size=8)
    trainer = pl.Trainer(max_steps=1, callbacks=[NeedsIndex()], **quiet_trainer_kwargs)
    with pytest.raises(ValueError, match=r"NeedsIndex .*need dataset indices.*IndexedDataset"):
        trainer.fit(_digits_model(), loader)
    # the fix the message names works
    indexed = DataLoader(IndexedDataset(loader.dataset), batch_size=8)
    trainer = pl.Trainer(max_steps=1, callbacks=[NeedsIndex()], **quiet_trainer_kwargs)
    trainer.fit(_digits_model(), indexed)
    assert trainer.global_step == 1


def test_class_count_mismatch_with_datamodule(quiet_trainer_kwargs):
    model = Classifier(MLP(64, 5), num_classes=5)
    with pytest.raises(ValueError, match="data module has 10 classes.*num_classes=5"):
        pl.Trainer(max_steps=1, **quiet_trainer_kwargs).fit(model, DigitsDataModule())


def test_class_count_mismatch_with_plain_loader(quiet_trainer_kwargs):
    loader = DataLoader(TensorDataset(torch.randn(16, 64), torch.arange(16) % 10), batch_size=8)
    model = Classifier(MLP(64, 5), num_classes=5)
    with pytest.raises(ValueError, match=r"class ids in \[0, \d\] but num_classes=5"):
        pl.Trainer(max_steps=1, **quiet_trainer_kwargs).fit(model, loader)


def test_trick_on_plain_lightning_module_points_to_trick_module(quiet_trainer_kwargs):
    with pytest.raises(TypeError, match="must subclass lit_tricks.TrickModule"):
        pl.Trainer(max_steps=1, callbacks=[Recorder("x", [])], **quiet_trainer_kwargs).fit(
            PlainModule(), DigitsDataModule()
        )


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"backbone": "mlp", "num_classes": 10}, TypeError, "backbone must be a torch.nn.Module"),
        ({"backbone": nn.Linear(2, 2), "num_classes": 1}, ValueError, "num_classes must be an integer >= 2"),
        ({"backbone": nn.Linear(2, 2), "num_classes": 2, "ece_bins": 0}, ValueError, "ece_bins"),
        ({"backbone": nn.Linear(2, 2), "num_classes": 2, "scheduler_interval": "batch"}, ValueError, "interval"),
    ],
)
def test_classifier_rejects_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        Classifier(**kwargs)


# ---------------------------------------------------------------- checkpoints
def test_checkpoint_loads_safely_and_leaves_rng_alone(tmp_path, quiet_trainer_kwargs):
    quiet_trainer_kwargs["enable_checkpointing"] = True
    trainer = pl.Trainer(max_steps=2, limit_val_batches=1, **quiet_trainer_kwargs)
    model = _digits_model()
    trainer.fit(model, DigitsDataModule())
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    torch.load(path, weights_only=True)  # no pickled numpy or python objects
    backbone = MLP(64, 10, hidden=(32,))
    torch.manual_seed(123)
    expected_draw = torch.rand(1)
    torch.manual_seed(123)
    loaded = Classifier.load_from_checkpoint(path, backbone=backbone)
    assert torch.rand(1) == expected_draw
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key])


def test_trick_module_is_abstract_about_forward():
    with pytest.raises(NotImplementedError):
        TrickModule(num_classes=3)(torch.zeros(1, 2))


class NaNAtStep(Trick):
    """Makes one sample's loss NaN at one optimizer step."""

    def __init__(self, step):
        self.step = step

    def after_loss(self, trainer, module, batch, out):
        if trainer.global_step == self.step:
            out.per_sample_loss = out.per_sample_loss.clone()
            out.per_sample_loss[0] = float("nan")
        return out


def test_nonfinite_loss_warns_once_with_its_step(quiet_trainer_kwargs):
    model = _digits_model()
    trainer = pl.Trainer(max_steps=6, limit_val_batches=0, callbacks=[NaNAtStep(3)], **quiet_trainer_kwargs)
    with pytest.warns(UserWarning, match="first at step 3") as record:
        trainer.fit(model, DigitsDataModule(batch_size=16))
    assert sum("not finite" in str(w.message) for w in record) == 1
    assert model._nonfinite.tolist()[0] >= 1  # the NaN loss poisoned the weights, so later steps count too


def test_nonfinite_loss_raises_at_its_step(quiet_trainer_kwargs):
    trainer = pl.Trainer(max_steps=6, limit_val_batches=0, callbacks=[NaNAtStep(2)], **quiet_trainer_kwargs)
    with pytest.raises(FloatingPointError, match="nan at step 2.*skip_step"):
        trainer.fit(_digits_model(on_nonfinite="raise"), DigitsDataModule(batch_size=16))


def test_nonfinite_loss_step_is_skipped(quiet_trainer_kwargs):
    pl.seed_everything(0, verbose=False)
    model = _digits_model(on_nonfinite="skip_step")
    trainer = pl.Trainer(max_steps=5, limit_val_batches=0, callbacks=[NaNAtStep(2)], **quiet_trainer_kwargs)
    with pytest.warns(UserWarning, match="first at step 2.*skipped"):
        trainer.fit(model, DigitsDataModule(batch_size=16))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert model._nonfinite.tolist() == [1, 2] and trainer.global_step == 5  # 6 batches, one skipped


def test_out_of_range_label_in_a_later_batch_gets_a_clear_error(quiet_trainer_kwargs):
    targets = torch.randint(0, 10, (48,))
    targets[40] = 12  # in the third batch of 16
    loader = DataLoader(TensorDataset(torch.randn(48, 64), targets), batch_size=16)
    trainer = pl.Trainer(max_epochs=1, **quiet_trainer_kwargs)
    with pytest.raises(ValueError, match=r"class ids in \[\d+, 12\] but num_classes=10"):
        trainer.fit(_digits_model(), loader)


def test_on_nonfinite_is_checked():
    with pytest.raises(ValueError, match="on_nonfinite must be"):
        _digits_model(on_nonfinite="ignore")


def test_out_of_range_label_in_a_later_validation_batch_gets_a_clear_error(quiet_trainer_kwargs):
    targets = torch.randint(0, 10, (48,))
    targets[40] = 11
    val = DataLoader(TensorDataset(torch.randn(48, 64), targets), batch_size=16)
    train = DataLoader(TensorDataset(torch.randn(16, 64), torch.randint(0, 10, (16,))), batch_size=16)
    trainer = pl.Trainer(max_epochs=1, num_sanity_val_steps=0, **quiet_trainer_kwargs)
    with pytest.raises(ValueError, match=r"class ids in \[\d+, 11\] but num_classes=10"):
        trainer.fit(_digits_model(), train, val)


def test_stablemax_loss_option(quiet_trainer_kwargs):
    from lit_tricks.functional import stablemax_cross_entropy

    logits, targets = torch.tensor([[1.0, -1.0, 0.0]]), torch.tensor([0])
    model = Classifier(nn.Identity(), num_classes=3, loss="stablemax")
    # s(1, -1, 0) = (2, 1/2, 1): p_0 = 2 / 3.5
    torch.testing.assert_close(model.per_sample_loss(logits, targets), torch.tensor([-math.log(2 / 3.5)]))
    torch.testing.assert_close(model.per_sample_loss(logits, targets), stablemax_cross_entropy(logits, targets))
    trainer = pl.Trainer(max_steps=2, limit_val_batches=0, **quiet_trainer_kwargs)
    trainer.fit(_digits_model(loss="stablemax"), DigitsDataModule(batch_size=16))
    assert trainer.global_step == 2
    with pytest.raises(ValueError, match="loss must be one of"):
        _digits_model(loss="hinge")
