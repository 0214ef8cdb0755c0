import math

import lightning.pytorch as pl
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from harness import assert_same
from lit_tricks import Classifier, Mixup, Trick
from lit_tricks.callbacks.distill import Distill
from lit_tricks.core.batch import StepOutput
from lit_tricks.data import DigitsDataModule
from lit_tricks.distill import KDLoss, NDLoss, Teacher, TeacherLoss
from lit_tricks.functional.teacher_kd import class_mean_directions, nd_loss
from lit_tricks.nets import MLP


def _step(logits, features=None):
    return StepOutput(logits, features, torch.zeros(logits.shape[0]))


def test_kd_by_hand():
    student = torch.zeros(2, 2)
    teacher = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]])
    # T = 1: p_t = (3/4, 1/4), p_s = (1/2, 1/2); the second sample agrees with the teacher
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    torch.testing.assert_close(KDLoss(temperature=1.0)(_step(student), teacher, None, None), torch.tensor([kl, 0.0]))
    # T = 2: p_t = (sqrt 3, 1) / (1 + sqrt 3), times T^2 = 4
    p = math.sqrt(3.0) / (1.0 + math.sqrt(3.0))
    kl2 = 4.0 * (p * math.log(2 * p) + (1 - p) * math.log(2 * (1 - p)))
    torch.testing.assert_close(KDLoss(temperature=2.0)(_step(student), teacher, None, None)[0], torch.tensor(kl2))


def test_nd_by_hand():
    directions = class_mean_directions(torch.tensor([[2.0, 0.0], [0.0, 4.0]]), torch.tensor([1, 2]))
    torch.testing.assert_close(directions, torch.eye(2))
    student = torch.tensor([[3.0, 4.0], [6.0, 8.0]])
    teacher = torch.tensor([[0.0, 10.0], [0.0, 5.0]])
    # 1 - <s, e_y> / max(|s|, |t|): 1 - 3/10 (teacher norm larger), 1 - 8/10 (student norm larger)
    torch.testing.assert_close(nd_loss(student, teacher, directions, torch.tensor([0, 1])), torch.tensor([0.7, 0.2]))
    # probability targets: the direction is the target-weighted sum of the class directions
    soft = torch.tensor([[0.5, 0.5], [0.0, 1.0]])
    torch.testing.assert_close(nd_loss(student, teacher, directions, soft), torch.tensor([0.65, 0.2]))
    with pytest.raises(ValueError, match=r"classes \[1\] have no training sample"):
        class_mean_directions(torch.ones(2, 2), torch.tensor([3, 0]))


def test_ensemble_is_the_mean_of_the_softmax():
    torch.manual_seed(0)
    nets = [nn.Linear(4, 3), nn.Linear(4, 3)]
    x = torch.randn(5, 4)
    logits, features = Teacher(nets)(x)
    assert features is None
    mean = (nets[0](x).softmax(-1) + nets[1](x).softmax(-1)) / 2
    torch.testing.assert_close(logits.exp(), mean.detach())
    assert not any(p.requires_grad for net in nets for p in net.parameters()) and not nets[0].training
    with pytest.raises(ValueError, match="single teacher"):
        Teacher(nets)(x, features=True)
    low, _ = Teacher(nets[0], autocast=True)(x)  # bfloat16 inside on the CPU, float32 out
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, nets[0](x).detach(), atol=0.05, rtol=0.05)


class Record(Trick):
    """Runs after Distill and keeps what the student and the teacher saw."""

    order = 10

    def __init__(self):
        self.inputs = self.losses = self.logits = self.targets = None

    def after_loss(self, trainer, module, batch, out):
        self.inputs, self.targets = batch.inputs, batch.targets
        self.losses, self.logits = out.per_sample_loss.detach(), out.logits.detach()
        return out


class RecordingNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.net, self.seen = MLP(64, 10, hidden=(32,)), None

    def forward(self, x):
        self.seen = x
        return self.net(x)


def test_fit_with_mixup_per_sample_and_frozen_teacher(quiet_trainer_kwargs):
    pl.seed_everything(0)
    teacher, record = RecordingNet(), Record()
    distill = Distill(teacher, temperature=2.0, weight=0.5, hard_weight=0.3)
    trainer = pl.Trainer(
        max_steps=3, log_every_n_steps=1, callbacks=[Mixup(alpha=0.4), distill, record], **quiet_trainer_kwargs
    )
    student = Classifier(MLP(64, 10, hidden=(16,)), num_classes=10)
    trainer.fit(student, DigitsDataModule(batch_size=32))
    assert teacher.seen is record.inputs  # the mixed inputs the student saw
    assert record.targets.ndim == 2  # Mixup did mix the targets
    expected_ce = -(record.targets * record.logits.log_softmax(-1)).sum(-1)
    kd = KDLoss(2.0)(_step(record.logits), teacher.net(record.inputs), None, None)
    torch.testing.assert_close(record.losses, 0.3 * expected_ce + 0.5 * kd)
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    assert all(name.startswith("backbone.") for name in student.state_dict())
    assert {"tricks/Distill/kd", "tricks/Distill/teacher_acc", "tricks/Distill/agreement"} <= set(
        trainer.callback_metrics
    )


def test_nd_fit_trains_the_projection_and_saves_the_directions(quiet_trainer_kwargs, tmp_path):
    pl.seed_everything(0)
    teacher = Classifier(MLP(64, 10, hidden=(32,)), num_classes=10)
    trainer = pl.Trainer(max_steps=2, callbacks=[Distill(teacher, loss="nd")], **quiet_trainer_kwargs)
    student = Classifier(MLP(64, 10, hidden=(16,)), num_classes=10)
    trainer.fit(student, DigitsDataModule(batch_size=32))
    loss = student.distill_loss
    assert isinstance(loss, NDLoss) and loss.directions.shape == (10, 32)
    torch.testing.assert_close(loss.directions.norm(dim=1), torch.ones(10))
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert all(id(p) in optimized for p in loss.projection.parameters())  # 16 -> 32 EmbTrans, trained
    assert "distill_loss.directions" in student.state_dict()
    assert not any(name.startswith("distill_loss") for name, _ in teacher.named_parameters())
    # validating the student from its checkpoint: no setup computation, the loss takes the saved shapes
    trainer.save_checkpoint(tmp_path / "student.ckpt")
    again = Classifier(MLP(64, 10, hidden=(16,)), num_classes=10)
    trainer = pl.Trainer(callbacks=[Distill(teacher, loss="nd")], limit_val_batches=1, **quiet_trainer_kwargs)
    trainer.validate(again, DigitsDataModule(batch_size=32), ckpt_path=tmp_path / "student.ckpt", verbose=False)
    assert_same(again.state_dict(), student.state_dict())


@pytest.fixture(scope="module")
def teacher_checkpoint(tmp_path_factory):
    """A 2-step teacher saved as `python -m lit_tricks fit` lays out a run: <run>/config.yaml, <run>/checkpoints/."""
    run = tmp_path_factory.mktemp("teacher_run")
    pl.seed_everything(0)
    model = Classifier(MLP(64, 10, hidden=(32,)), num_classes=10)
    checkpoint = ModelCheckpoint(dirpath=run / "checkpoints", save_last=True, save_top_k=0)
    trainer = pl.Trainer(
        max_steps=2, callbacks=[checkpoint], accelerator="cpu", logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=run,
    )  # fmt: skip
    trainer.fit(model, DigitsDataModule(batch_size=32))
    backbone = {
        "class_path": "lit_tricks.nets.MLP",
        "init_args": {"in_features": 64, "num_classes": 10, "hidden": [32]},
    }
    config = {"model": {"class_path": "lit_tricks.Classifier", "init_args": {"backbone": backbone, "num_classes": 10}}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    return run / "checkpoints" / "last.ckpt", model


def test_teacher_from_a_checkpoint_path(teacher_checkpoint, quiet_trainer_kwargs, tmp_path):
    path, trained = teacher_checkpoint
    distill = Distill(str(path))
    x = torch.randn(4, 64)
    torch.testing.assert_close(distill.teacher(x)[0], trained(x).detach())
    assert distill.state_dict() == {"teacher_paths": [str(path)]}
    pair = Distill([str(path), path])  # a list of paths (str or Path): an ensemble of two
    torch.testing.assert_close(pair.teacher(x)[0], trained(x).detach().log_softmax(-1))
    # without the run's config.yaml a Classifier cannot be rebuilt (its backbone is not in its hyperparameters)
    alone = tmp_path / "alone" / "checkpoints"
    alone.mkdir(parents=True)
    (alone / "t.ckpt").write_bytes(path.read_bytes())
    with pytest.raises(ValueError, match="no config.yaml"):
        Distill(str(alone / "t.ckpt"))
    saved = torch.load(path, weights_only=True)
    saved["hyper_parameters"]["_class_path"] = "lit_tricks.Classifier"  # as the CLI stores it
    torch.save(saved, alone / "t.ckpt")
    with pytest.raises(ValueError, match="does not keep its backbone"):
        Distill(str(alone / "t.ckpt"))
    with pytest.warns(UserWarning, match="trained with"):
        distill.load_state_dict({"teacher_paths": [str(tmp_path / "moved.ckpt")]})


def test_bad_input_fails_clearly(quiet_trainer_kwargs, tmp_path):
    with pytest.raises(FileNotFoundError, match="No teacher checkpoint"):
        Distill(str(tmp_path / "gone.ckpt"))
    with pytest.raises(ValueError, match=r"loss must be one of \['dhkd', 'kd', 'meal_v2', 'nd', 'tgeo'\]"):
        Distill(nn.Linear(64, 10), loss="kdd")
    with pytest.raises(TypeError, match="loss must be"):
        Distill(nn.Linear(64, 10), loss=nn.MSELoss())
    with pytest.raises(ValueError, match="temperature"):
        Distill(nn.Linear(64, 10), temperature=0.0)
    with pytest.raises(ValueError, match="empty list"):
        Distill([])

    def fit(teacher):
        trainer = pl.Trainer(max_steps=1, callbacks=[Distill(teacher)], **quiet_trainer_kwargs)
        trainer.fit(Classifier(MLP(64, 10, hidden=(16,)), num_classes=10), DigitsDataModule(batch_size=32))

    with pytest.raises(ValueError, match="teacher predicts 5 classes"):  # read from num_classes at setup
        fit(Classifier(nn.Linear(64, 5), num_classes=5))
    with pytest.raises(ValueError, match=r"teacher's logits have shape \(32, 5\)"):  # a plain module: first step
        fit(nn.Linear(64, 5))


def test_custom_teacher_loss_and_hard_loss_replacement(quiet_trainer_kwargs):
    class Zero(TeacherLoss):
        replaces_hard_loss = True

        def forward(self, student, teacher_logits, teacher_features, targets):
            return student.logits.sum(-1) * 0.0

    record = Record()
    trainer = pl.Trainer(
        max_steps=1, callbacks=[Distill(nn.Linear(64, 10), loss=Zero()), record], **quiet_trainer_kwargs
    )
    trainer.fit(Classifier(MLP(64, 10, hidden=(16,)), num_classes=10), DigitsDataModule(batch_size=32))
    assert torch.equal(record.losses, torch.zeros(32))


def test_teacher_runs_once_per_step_for_every_reader():
    class Counting(nn.Linear):
        calls = 0

        def forward(self, x):
            Counting.calls += 1
            return super().forward(x)

    distill = Distill(Counting(4, 3))
    x = torch.randn(2, 4)
    first = distill.teacher_outputs(x)
    assert distill.teacher_outputs(x) is first and Counting.calls == 1
    distill.teacher_outputs(x.clone())  # another tensor
    x += 1  # the same tensor, changed in place
    distill.teacher_outputs(x)
    assert Counting.calls == 3


def test_each_named_loss_keeps_its_authors_temperature_unless_one_is_given():
    teacher = MLP(64, 10, hidden=(8,))
    defaults = {"kd": 4.0, "nd": 4.0, "dhkd": 2.0, "tgeo": 1.5, "meal_v2": 1.0}
    for name, temperature in defaults.items():
        assert Distill(teacher, loss=name).loss.temperature == temperature
        assert Distill(teacher, loss=name, temperature=3.0).loss.temperature == 3.0
    with pytest.raises(ValueError, match="give the temperature to the loss"):
        Distill(teacher, loss=KDLoss(temperature=2.0), temperature=4.0)
