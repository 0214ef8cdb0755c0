import math

import lightning.pytorch as pl
import pytest
import torch
from conftest import PlainModule
from lightning.pytorch.callbacks import Callback

from lit_tricks import Classifier, EMATeacher
from lit_tricks.data import DigitsDataModule
from lit_tricks.functional import ema_decay, ema_update_, half_life_to_decay
from lit_tricks.nets import CNN2D, MLP


# ---------------------------------------------------------------- the math
def test_decay_schedule_by_hand():
    assert ema_decay(0, 0.999) == 0.0  # the first update copies
    assert ema_decay(5, 0.999) == 0.999
    assert ema_decay(1, 0.999, warmup=True) == pytest.approx(1 - 2 ** (-2 / 3))  # 0.370
    assert ema_decay(9, 0.999, warmup=True, gamma=1.0, power=0.5) == pytest.approx(1 - 10**-0.5)
    assert ema_decay(10**9, 0.999, warmup=True) == 0.999  # capped at decay
    assert half_life_to_decay(10) == pytest.approx(0.5**0.1)
    assert half_life_to_decay(10, every_n_steps=10) == pytest.approx(0.5)


def test_update_by_hand():
    averages, values = [torch.tensor([1.0, 2.0]), torch.tensor([0.0])], [torch.tensor([3.0, 2.0]), torch.tensor([4.0])]
    ema_update_(averages, values, decay=0.75)  # 0.75 * a + 0.25 * v
    assert averages[0].tolist() == [1.5, 2.0] and averages[1].tolist() == [1.0]


# ---------------------------------------------------------------- in a real fit
class WeightRecorder(Callback):
    """Snapshots the live parameters after every optimizer step (registered before the EMA)."""

    def __init__(self):
        self.snapshots = []

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.snapshots.append({k: v.detach().clone() for k, v in pl_module.named_parameters()})


def _fit(callbacks, quiet_trainer_kwargs, steps=6, **trainer_kwargs):
    pl.seed_everything(0, verbose=False)
    model = Classifier(MLP(64, 10, hidden=(16,)), num_classes=10, optimizer=lambda p: torch.optim.SGD(p, lr=0.5))
    trainer_kwargs.setdefault("limit_val_batches", 0)
    trainer = pl.Trainer(max_steps=steps, callbacks=callbacks, **quiet_trainer_kwargs, **trainer_kwargs)
    trainer.fit(model, DigitsDataModule(batch_size=16))
    return trainer, model


@pytest.mark.parametrize("warmup", [False, True])
def test_ema_after_k_steps_matches_the_recursion(warmup, quiet_trainer_kwargs):
    recorder, ema = WeightRecorder(), EMATeacher(decay=0.8, warmup=warmup, start_step=2)
    _, model = _fit([recorder, ema], quiet_trainer_kwargs)
    expected = None
    for step, weights in enumerate(recorder.snapshots, start=1):
        if step <= 2:
            expected = dict(weights)  # before start_step the average copies
            continue
        beta = ema_decay(step - 3, 0.8, warmup)  # update number t = step - start_step - 1
        expected = {k: beta * expected[k] + (1 - beta) * weights[k] for k in weights}
    assert ema.num_updates == 4
    averaged = ema.ema_state_dict()
    for name, value in expected.items():
        torch.testing.assert_close(averaged[name], value, rtol=1e-5, atol=1e-6)
    assert not torch.equal(averaged["backbone.head.weight"], model.backbone.head.weight)


def test_counts_optimizer_steps_with_accumulation_and_every_n(quiet_trainer_kwargs):
    ema = EMATeacher(decay=0.9, every_n_steps=2)
    trainer, _ = _fit([ema], quiet_trainer_kwargs, steps=6, accumulate_grad_batches=3)
    assert trainer.global_step == 6 and ema.num_updates == 3


def test_evaluation_uses_ema_weights_and_restores_live_ones(quiet_trainer_kwargs):
    ema = EMATeacher(decay=0.9)
    trainer, model = _fit([ema], quiet_trainer_kwargs, limit_val_batches=1.0)
    live = {k: v.clone() for k, v in model.state_dict().items()}
    datamodule = DigitsDataModule(batch_size=16)
    with_ema = trainer.validate(model, datamodule, verbose=False)[0]
    for key, value in model.state_dict().items():
        assert torch.equal(value, live[key]), key  # restored exactly
    plain = Classifier(MLP(64, 10, hidden=(16,)), num_classes=10)
    plain.load_state_dict(ema.ema_state_dict())
    by_hand = pl.Trainer(**quiet_trainer_kwargs).validate(plain, datamodule, verbose=False)[0]
    assert with_ema["val/acc"] == by_hand["val/acc"] and with_ema["val/nll"] == pytest.approx(by_hand["val/nll"])
    ema.swap_for_eval = False
    assert trainer.validate(model, datamodule, verbose=False)[0]["val/nll"] != with_ema["val/nll"]


def test_teacher_outputs_are_the_ema_model_in_eval_mode_and_cached(quiet_trainer_kwargs):
    ema = EMATeacher(decay=0.9)
    trainer, model = _fit([ema], quiet_trainer_kwargs)
    model.train()
    x = torch.randn(4, 64)
    out = ema.teacher(x)
    assert model.training and not out.requires_grad
    assert ema.teacher(x) is out  # same step, same input: reused
    reference = Classifier(MLP(64, 10, hidden=(16,)), num_classes=10).eval()
    reference.load_state_dict(ema.ema_state_dict())
    torch.testing.assert_close(out, reference(x))
    assert EMATeacher.of(trainer) is ema


def test_average_buffers_option_tracks_batchnorm_statistics(quiet_trainer_kwargs):
    pl.seed_everything(0, verbose=False)
    model = Classifier(CNN2D(10, width=4), num_classes=10)
    copy, average = EMATeacher(decay=0.5, buffers="copy"), EMATeacher(decay=0.5)
    assert average.buffers == "average"  # the default: BatchNorm statistics that match the EMA weights
    for ema in (copy, average):
        trainer = pl.Trainer(max_steps=3, limit_val_batches=0, callbacks=[ema], **quiet_trainer_kwargs)
        trainer.fit(model, DigitsDataModule(batch_size=16, as_image=True))
    key = "backbone.body.0.1.running_mean"
    assert key not in copy.state_dict()["ema"] and key in average.state_dict()["ema"]
    assert torch.equal(copy.ema_state_dict()[key], model.state_dict()[key])
    assert not torch.equal(average.ema_state_dict()[key], model.state_dict()[key])


def test_works_on_a_plain_lightning_module(quiet_trainer_kwargs):
    ema = EMATeacher(decay=0.9)
    trainer = pl.Trainer(max_steps=4, callbacks=[ema], **quiet_trainer_kwargs)
    module = PlainModule()
    trainer.fit(module, DigitsDataModule())
    assert ema.num_updates == 4 and ema.teacher(torch.zeros(2, 64)).shape == (2, 10)


def test_ema_weights_from_checkpoint(tmp_path, quiet_trainer_kwargs):
    ema = EMATeacher(decay=0.9)
    trainer, model = _fit([ema], quiet_trainer_kwargs)
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    weights = EMATeacher.ema_weights_from_checkpoint(tmp_path / "run.ckpt")
    expected = ema.ema_state_dict()
    assert set(weights) == set(expected) and all(torch.equal(weights[k], expected[k]) for k in expected)
    assert torch.equal(
        torch.load(tmp_path / "run.ckpt")["state_dict"]["backbone.head.weight"], model.backbone.head.weight
    )
    trainer_without = pl.Trainer(max_steps=1, limit_val_batches=0, **quiet_trainer_kwargs)
    trainer_without.fit(Classifier(MLP(64, 10), num_classes=10), DigitsDataModule())
    trainer_without.save_checkpoint(tmp_path / "plain.ckpt")
    with pytest.raises(ValueError, match="holds no EMATeacher state"):
        EMATeacher.ema_weights_from_checkpoint(tmp_path / "plain.ckpt")


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"decay": 0.0}, r"decay must be a finite number in \(0.0, 1.0\)"),
        ({"decay": 1.0}, r"decay must be a finite number in \(0.0, 1.0\)"),
        ({"decay": 1.5}, r"decay must be a finite number in \(0.0, 1.0\)"),
        ({"decay": float("nan")}, "decay must be a finite number"),
        ({"half_life": -1}, r"half_life must be a finite number in \(0.0, inf\)"),
        ({"half_life": float("nan")}, "half_life must be a finite number"),
        ({"half_life": float("inf")}, "half_life must be a finite number"),
        ({"warmup_gamma": float("nan")}, "warmup_gamma"),
        ({"every_n_steps": 0}, "every_n_steps"),
        ({"start_step": -1}, "start_step"),
        ({"warmup_power": 0}, "warmup_power"),
        ({"buffers": "ignore"}, "buffers"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EMATeacher(**kwargs)


def test_half_precision_weights_are_averaged_in_float32(quiet_trainer_kwargs):
    """Under precision="bf16-true" an update of weight 1 - decay = 0.001 is below bfloat16's resolution: the
    average is kept in float32 (and lent as a bfloat16 copy for evaluation), so it still moves."""
    ema = EMATeacher(decay=0.999)
    trainer = pl.Trainer(max_steps=5, limit_val_batches=1, num_sanity_val_steps=0, precision="bf16-true",
                         callbacks=[ema], **quiet_trainer_kwargs)  # fmt: skip
    model = Classifier(MLP(64, 10, hidden=(16,)), num_classes=10)
    start = [p.detach().float().clone() for p in model.parameters()]
    trainer.fit(model, DigitsDataModule(batch_size=16))
    live = [p.detach().clone() for p in model.parameters()]
    assert all(p.dtype == torch.bfloat16 for p in live) and all(a.dtype == torch.float32 for a in ema._ema)
    # a bfloat16 average would not have moved from the initial weights at all
    assert all((average - s).abs().max() > 0 for average, s in zip(ema._ema, start, strict=True))
    with ema.swapped():
        for p, average in zip(model.parameters(), ema._ema, strict=True):
            assert p.dtype == torch.bfloat16 and torch.equal(p, average.to(torch.bfloat16))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), live, strict=True))  # restored exactly


def test_two_teachers_and_no_teacher(quiet_trainer_kwargs):
    with pytest.raises(RuntimeError, match="more than one stateful callback of type `EMATeacher`"):
        _fit([EMATeacher(), EMATeacher()], quiet_trainer_kwargs)
    trainer, _ = _fit([], quiet_trainer_kwargs, steps=1)
    with pytest.raises(ValueError, match="add lit_tricks.EMATeacher"):
        EMATeacher.of(trainer)


def test_half_life_sets_decay():
    assert EMATeacher(half_life=100).decay == pytest.approx(math.exp(math.log(0.5) / 100))


def test_sharded_strategies_get_a_clear_error():
    # Lightning runs FSDP only on GPUs, so the guard is checked directly (no process group needed).
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    ema = EMATeacher()
    trainer = SimpleNamespace(strategy=FSDPStrategy(), callbacks=[ema])
    with pytest.raises(NotImplementedError, match="does not support FSDPStrategy yet"):
        ema.setup(trainer, None, "fit")
