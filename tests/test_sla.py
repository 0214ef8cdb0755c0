import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lit_tricks import ELR, Classifier, Trick, TrickBatch
from lit_tricks.callbacks.sla import SLA, SLAHead, sla_head
from lit_tricks.cli import LitTricksCLI
from lit_tricks.data import DigitsDataModule
from lit_tricks.functional.sla import (
    sla_aggregate,
    sla_joint_targets,
    sla_self_distillation,
    sla_single,
    sla_transform,
)
from lit_tricks.nets import CNN2D, MLP


def test_transforms_by_hand():
    image = torch.tensor([[0.0, 1.0], [2.0, 3.0]]).view(1, 1, 2, 2)
    views = sla_transform(torch.cat([image, image + 10]))
    assert views.shape == (8, 1, 2, 2)  # sample-major: rows 0-3 are sample 0 under rotations 0, 90, 180, 270
    expected = [[[0, 1], [2, 3]], [[1, 3], [0, 2]], [[3, 2], [1, 0]], [[2, 0], [3, 1]]]
    torch.testing.assert_close(views[:4, 0], torch.tensor(expected, dtype=torch.float))
    torch.testing.assert_close(views[4:], views[:4] + 10)
    signal = torch.tensor([[0.0, 1.0, 2.0, 3.0]])  # ours: identity, reversal, half shift, reversal then shift
    expected = [[0, 1, 2, 3], [3, 2, 1, 0], [2, 3, 0, 1], [1, 0, 3, 2]]
    torch.testing.assert_close(sla_transform(signal), torch.tensor(expected, dtype=torch.float))
    torch.testing.assert_close(sla_transform(signal[:, None])[:, 0], sla_transform(signal))
    with pytest.raises(ValueError, match="must be square"):
        sla_transform(torch.zeros(2, 1, 4, 5))
    with pytest.raises(ValueError, match="got inputs of shape"):
        sla_transform(torch.zeros(2, 1, 4, 4, 4))


def test_joint_targets_by_hand():
    torch.testing.assert_close(sla_joint_targets(torch.tensor([2, 0]), 4), torch.tensor([8, 9, 10, 11, 0, 1, 2, 3]))
    probs = sla_joint_targets(torch.tensor([[0.25, 0.75]]), 2)  # column c*M + k
    torch.testing.assert_close(probs, torch.tensor([[0.25, 0.0, 0.75, 0.0], [0.0, 0.25, 0.0, 0.75]]))


def test_aggregation_single_and_distillation_by_hand():
    joint = torch.arange(8.0).view(2, 4)  # one sample, C = 2, M = 2: column c*2 + k
    torch.testing.assert_close(sla_aggregate(joint, 2), torch.tensor([[(0 + 5) / 2, (2 + 7) / 2]]))
    torch.testing.assert_close(sla_single(joint[::2], 2), torch.tensor([[0.0, 2.0]]))
    with pytest.raises(ValueError, match=r"joint logits must be \[N\*M, C\*M\]"):
        sla_aggregate(torch.zeros(3, 4), 2)
    # T^2 KL(softmax(agg / T) || softmax(single / T)) with teacher (1/4, 3/4) and student (1/2, 1/2), T = 2
    kl = sla_self_distillation(torch.zeros(1, 2), torch.tensor([[0.0, 2 * math.log(3.0)]]), temperature=2.0)
    assert kl.item() == pytest.approx(4 * (0.25 * math.log(0.5) + 0.75 * math.log(1.5)))


def test_expanded_batch_repeats_weights_and_index():
    batch = TrickBatch(torch.randn(2, 1, 4, 4), torch.tensor([1, 2]), torch.tensor([7, 9]), torch.tensor([1.0, 2.0]))
    out = SLA().before_forward(None, None, batch)
    torch.testing.assert_close(out.weight, torch.tensor([1.0] * 4 + [2.0] * 4))
    torch.testing.assert_close(out.index, torch.tensor([7] * 4 + [9] * 4))
    torch.testing.assert_close(out.targets, torch.tensor([4, 5, 6, 7, 8, 9, 10, 11]))
    torch.testing.assert_close(out.inputs[5], torch.rot90(batch.inputs[1], 1, (1, 2)))
    mixed = TrickBatch(torch.randn(2, 8), torch.tensor([[0.3, 0.7], [1.0, 0.0]]))  # e.g. Mixup's targets, 1-D inputs
    out = SLA().before_forward(None, None, mixed)
    assert out.inputs.shape == (8, 8) and out.targets.shape == (8, 8)
    torch.testing.assert_close(out.targets[1], torch.tensor([0.0, 0.3, 0.0, 0.0, 0.0, 0.7, 0.0, 0.0]))


class Probe(Trick):
    """Keeps what the step's loss is made of, before (order 99) or after (order 101) SLA's after_loss."""

    def __init__(self, order, sla=None):
        self.order, self.sla, self.seen = order, sla, None

    def after_loss(self, trainer, module, batch, out):
        single = None if self.sla is None else self.sla._head.single_logits.detach().clone()
        self.seen = (batch.targets.clone(), out.logits.detach().clone(), single, out.per_sample_loss.detach().clone())
        return out


def test_sla_sd_fit_computes_the_authors_loss(quiet_trainer_kwargs):
    pl.seed_everything(0, verbose=False)
    sla = SLA(self_distill=True, temperature=2.0)
    before, after = Probe(99, sla), Probe(101)
    trainer = pl.Trainer(
        max_epochs=1, limit_train_batches=2, limit_val_batches=1, callbacks=[sla, before, after], **quiet_trainer_kwargs
    )
    model = Classifier(CNN2D(10, width=8), num_classes=10)
    trainer.fit(model, DigitsDataModule(batch_size=8, as_image=True))
    assert isinstance(model.backbone.head, SLAHead) and model.backbone.head.joint.out_features == 40
    assert "val/acc" in trainer.callback_metrics  # evaluation gets 10-way logits
    joint_targets, joint, single, _ = before.seen
    labels = joint_targets[::4] // 4
    torch.testing.assert_close(joint_targets, sla_joint_targets(labels, 4))
    # the authors' create_sla_sd_trainer loss: joint CE + single CE + T^2 batchmean KL to the aggregated prediction
    aggregated = sum(joint[i::4, i::4] / 4 for i in range(4))
    kd = F.kl_div(F.log_softmax(single[::4] / 2, 1), F.softmax(aggregated / 2, 1), reduction="batchmean")
    expected = F.cross_entropy(joint, joint_targets) + F.cross_entropy(single[::4], labels) + 4 * kd
    torch.testing.assert_close(after.seen[3].mean(), expected)


def test_aggregated_and_single_inference(quiet_trainer_kwargs):
    model = Classifier(sla_head(CNN2D(10, width=8), 4), num_classes=10)
    x = torch.randn(3, 1, 8, 8)
    model.train()
    aggregated = SLA.aggregated_logits(model, x)
    assert model.training and aggregated.shape == (3, 10)
    model.eval()  # with batch norm in eval mode, the batch statistics no longer matter
    joint = model.backbone.head.joint(model.backbone.body(sla_transform(x)))
    torch.testing.assert_close(aggregated, sla_aggregate(joint, 4))
    torch.testing.assert_close(model(x), joint[::4, ::4])


def test_yaml_builds_sla(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    snippet = tmp_path / "sla.yaml"
    snippet.write_text(
        "model:\n  init_args:\n    backbone:\n      class_path: lit_tricks.nets.CNN2D\n"
        "      init_args: {num_classes: 10}\n"
        "data:\n  init_args: {as_image: true}\n"
        "trainer:\n  callbacks+:\n    - class_path: lit_tricks.callbacks.sla.SLA\n"
        "      init_args: {self_distill: true, temperature: 1.0}\n"
    )
    root = Path(__file__).resolve().parent.parent
    cli = LitTricksCLI(args=["--config", str(root / "configs/quickstart.yaml"), "--config", str(snippet)], run=False)
    assert [cb.self_distill for cb in cli.trainer.callbacks if isinstance(cb, SLA)] == [True]


def test_clear_errors(quiet_trainer_kwargs):
    with pytest.raises(ValueError, match="temperature must be a finite number"):
        SLA(temperature=0.0)
    with pytest.raises(TypeError, match="self_distill must be True or False"):
        SLA(self_distill="yes")
    with pytest.raises(TypeError, match="'body' is a Sequential"):
        sla_head(CNN2D(10), head="body")
    with pytest.raises(ValueError, match="has no submodule 'fc'"):
        sla_head(CNN2D(10), head="fc")
    with pytest.raises(ValueError, match="already an SLAHead with num_transforms=4"):
        sla_head(sla_head(nn.Sequential(nn.Linear(4, 3)), head="0"), num_transforms=2, head="0")
    trainer = pl.Trainer(max_steps=1, callbacks=[SLA(), ELR()], **quiet_trainer_kwargs)
    with pytest.raises(ValueError, match="ELR read C-way predictions per sample"):
        trainer.fit(Classifier(MLP(64, 10), num_classes=10), DigitsDataModule())
