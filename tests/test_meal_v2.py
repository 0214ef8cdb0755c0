import math
import pickle

import lightning.pytorch as pl
import pytest
import torch
from jsonargparse import ArgumentParser
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from harness import assert_same
from lit_tricks import Classifier
from lit_tricks.callbacks.distill import Distill
from lit_tricks.core.batch import StepOutput
from lit_tricks.data import DigitsDataModule
from lit_tricks.distill.meal_v2 import MEALV2Discriminator, MEALV2Loss
from lit_tricks.functional.distillation import distillation_kl
from lit_tricks.functional.meal_v2 import discriminator_bce, reverse_grad
from lit_tricks.nets import MLP


def _softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def _step(logits):
    return StepOutput(logits, None, torch.zeros(logits.shape[0]))


def _constant_discriminator(loss: MEALV2Loss, num_classes: int, bias: tuple[float, float]) -> None:
    """A discriminator that outputs ReLU(bias) for every input: zero weights, zero hidden biases."""
    loss.discriminator = MEALV2Discriminator(num_classes, (2, 2))
    for layer in loss.discriminator:
        if isinstance(layer, nn.Linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
    loss.discriminator[4].bias.data = torch.tensor(bias)


def test_discriminator_bce_by_hand():
    # BCE(z, 1) = softplus(-z), BCE(z, 0) = softplus(z); student labelled (1, 0), teacher (0, 1)
    student = torch.tensor([[2.0, -1.0], [0.0, 0.0]])
    teacher = torch.tensor([[0.0, 3.0], [0.0, 0.0]])
    first = (_softplus(-2.0) + _softplus(-1.0) + _softplus(0.0) + _softplus(-3.0)) / 4
    torch.testing.assert_close(discriminator_bce(student, teacher), torch.tensor([first, math.log(2.0)]))
    # the batch mean is the authors' BCEWithLogitsLoss mean over the concatenated [2N, 2] scores
    labels = torch.tensor([[1.0, 0.0]] * 2 + [[0.0, 1.0]] * 2)
    authors = nn.functional.binary_cross_entropy_with_logits(torch.cat([student, teacher]), labels)
    torch.testing.assert_close(discriminator_bce(student, teacher).mean(), authors)
    with pytest.raises(ValueError, match=r"shape \[N, 2\]"):
        discriminator_bce(torch.zeros(2, 3), torch.zeros(2, 3))


def test_reverse_grad_negates_only_the_gradient():
    x = torch.tensor([1.0, -2.0], requires_grad=True)
    y = reverse_grad(x)
    torch.testing.assert_close(y, x.detach())
    (3.0 * y).sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([-3.0, -3.0]))


def test_meal_v2_term_by_hand():
    student = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]])
    teacher = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    loss = MEALV2Loss(temperature=1.0, d_weight=0.5)
    _constant_discriminator(loss, 2, (1.0, -1.0))  # scores ReLU(1, -1) = (1, 0) for every input
    # student: BCE(1, 1) + BCE(0, 0); teacher: BCE(1, 0) + BCE(0, 1)
    d = (_softplus(-1.0) + _softplus(0.0) + _softplus(1.0) + _softplus(0.0)) / 4
    kd = distillation_kl(student, teacher, 1.0)
    torch.testing.assert_close(loss(_step(student), teacher, None, None), kd + 0.5 * d)
    # without the final ReLU the second score stays -1
    loss = MEALV2Loss(d_weight=1.0, final_relu=False)
    loss.discriminator = MEALV2Discriminator(2, (2, 2), final_relu=False)
    loss.discriminator.load_state_dict(_with_bias((1.0, -1.0)))
    d = (_softplus(-1.0) + _softplus(-1.0) + _softplus(1.0) + _softplus(1.0)) / 4
    torch.testing.assert_close(loss(_step(student), teacher, None, None), kd + d)


def _with_bias(bias):
    state = {k: torch.zeros_like(v) for k, v in MEALV2Discriminator(2, (2, 2), final_relu=False).state_dict().items()}
    state["4.bias"] = torch.tensor(bias)
    return state


@pytest.mark.parametrize("inputs", ["logits", "probs"])
def test_adversarial_reverses_only_the_students_discriminator_gradient(inputs):
    torch.manual_seed(0)
    student, teacher = torch.randn(6, 5), torch.randn(6, 5)
    grads = {}
    for adversarial in (False, True):
        torch.manual_seed(1)
        loss = MEALV2Loss(inputs=inputs, hidden=(16, 8), final_relu=False, adversarial=adversarial)
        loss.discriminator = MEALV2Discriminator(5, (16, 8), final_relu=False)
        s = student.clone().requires_grad_()
        term = loss(_step(s), teacher, None, None) - distillation_kl(s, teacher, 1.0)  # the discriminator part
        term.sum().backward()
        grads[adversarial] = (s.grad, [p.grad for p in loss.discriminator.parameters()])
    assert grads[False][0].abs().sum() > 0
    torch.testing.assert_close(grads[True][0], -grads[False][0])
    for plain, reversed_ in zip(grads[False][1], grads[True][1], strict=True):
        torch.testing.assert_close(reversed_, plain)


def test_default_widths_and_bad_input():
    assert [m.out_features for m in MEALV2Discriminator(1000, (125, 15)) if isinstance(m, nn.Linear)] == [125, 15, 2]
    for name, kwargs in [
        ("inputs", {"inputs": "softmax"}),
        ("hidden", {"hidden": (8,)}),
        ("hidden", {"hidden": (8, 0)}),
        ("hidden", {"hidden": 8}),
        ("d_weight", {"d_weight": -1.0}),
        ("temperature", {"temperature": 0.0}),
    ]:
        with pytest.raises(ValueError, match=name):
            MEALV2Loss(**kwargs)
    with pytest.raises(RuntimeError, match="setup"):
        MEALV2Loss()(_step(torch.zeros(1, 2)), torch.zeros(1, 2), None, None)


def test_default_widths_follow_the_authors_rule(quiet_trainer_kwargs):
    trainer = pl.Trainer(**quiet_trainer_kwargs)
    for classes, widths in [(1000, [125, 15, 2]), (10, [16, 8, 2])]:  # C // 8, C // 64, at least 16, 8
        loss = MEALV2Loss()
        loss.setup(trainer, Classifier(MLP(4, classes), num_classes=classes), None)
        assert [m.out_features for m in loss.discriminator if isinstance(m, nn.Linear)] == widths


def test_fit_trains_the_discriminator_with_the_student(quiet_trainer_kwargs, tmp_path):
    pl.seed_everything(0)
    teachers = [MLP(64, 10, hidden=(32,)), MLP(64, 10, hidden=(16,))]  # MEAL V2: an ensemble, no hard labels
    loss = MEALV2Loss(hidden=(8, 4))
    distill = Distill(teachers, loss=loss, hard_weight=0.0)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    kwargs = {**quiet_trainer_kwargs, "enable_checkpointing": True}
    trainer = pl.Trainer(max_steps=3, log_every_n_steps=1, callbacks=[distill, checkpoint], **kwargs)
    student = Classifier(MLP(64, 10, hidden=(16,)), num_classes=10)
    loss.discriminator = MEALV2Discriminator(10, (8, 4))  # built here to compare with the trained one
    start = {k: v.clone() for k, v in loss.discriminator.state_dict().items()}
    trainer.fit(student, DigitsDataModule(batch_size=32))
    assert student.distill_loss.discriminator is loss.discriminator
    assert_same(pickle.loads(pickle.dumps(loss)).state_dict(), loss.state_dict())  # as ddp_spawn would
    # the student's optimizer holds the discriminator and has stepped it
    held = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert all(id(p) in held for p in loss.discriminator.parameters())
    assert any(not torch.equal(start[k], v) for k, v in loss.discriminator.state_dict().items())
    assert all(not p.requires_grad for t in teachers for p in t.parameters())
    assert {"tricks/Distill/mealv2", "tricks/Distill/meal_v2_d_loss", "tricks/Distill/meal_v2_d_acc"} <= set(
        trainer.callback_metrics
    )
    # the discriminator is saved in the student's checkpoint (the teachers are not) and reloads into a fresh one
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]
    assert {k for k in saved if not k.startswith("backbone.")} == {f"distill_loss.discriminator.{k}" for k in start}
    fresh = Classifier(MLP(64, 10, hidden=(16,)), num_classes=10)
    fresh.distill_loss = MEALV2Loss(hidden=(8, 4))
    fresh.distill_loss.discriminator = MEALV2Discriminator(10, (8, 4))
    fresh.load_state_dict(saved)
    assert_same(fresh.state_dict(), student.state_dict())


def test_built_from_yaml():
    parser = ArgumentParser()
    parser.add_argument("--distill", type=Distill)
    config = parser.parse_string(
        """
        distill:
          class_path: lit_tricks.Distill
          init_args:
            teacher: {class_path: lit_tricks.nets.MLP, init_args: {in_features: 64, num_classes: 10}}
            hard_weight: 0.0
            loss:
              class_path: lit_tricks.distill.meal_v2.MEALV2Loss
              init_args: {inputs: probs, hidden: [8, 4], adversarial: true}
        """
    )
    distill = parser.instantiate(config).distill
    assert isinstance(distill.loss, MEALV2Loss)
    assert (distill.loss.inputs, distill.loss.hidden, distill.loss.adversarial) == ("probs", (8, 4), True)
