import math
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lit_tricks import Classifier
from lit_tricks.callbacks.distill import Distill
from lit_tricks.core.batch import StepOutput
from lit_tricks.data import DigitsDataModule
from lit_tricks.distill.dhkd import DHKDLoss
from lit_tricks.distill.tgeo import TGeoLoss, ratio_network
from lit_tricks.functional.kd_losses import (
    binary_kl,
    binary_kl_norm,
    fused_kd_loss,
    teacher_class_mean,
    tgeo_relations,
)
from lit_tricks.nets import MLP

# KL(Bern(1/2) || Bern(3/4)) = 0.5 ln(4/3): the value of both binary losses at a logit gap of ln 3
HALF_LN_4_3 = 0.5 * math.log(4 / 3)


def test_binary_kl_norm_by_hand():
    # per class: -ln 2 - 0.5 ln(d (1 - d)) with d = sigmoid((z_s - z_t) / T); d = 3/4 gives 0.5 ln(4/3)
    student = torch.tensor([[2 * math.log(3), 1.0], [0.5, -0.5]], requires_grad=True)
    teacher = torch.tensor([[0.0, 1.0], [0.5, -0.5]])
    loss = binary_kl_norm(student, teacher, temperature=2.0)
    torch.testing.assert_close(loss, torch.tensor([4 * HALF_LN_4_3, 0.0]))
    loss.sum().backward()
    # d/dz_s = T (d - 1/2): 2 * 0.25 at the gap, 0 where the logits agree
    torch.testing.assert_close(student.grad, torch.tensor([[0.5, 0.0], [0.0, 0.0]]))


def test_binary_kl_by_hand():
    student = torch.tensor([[math.log(3), 2.0]], requires_grad=True)  # sigmoid: 3/4, and equal to the teacher
    teacher = torch.tensor([[0.0, 2.0]])  # sigmoid: 1/2
    loss = binary_kl(student, teacher, temperature=1.0)
    torch.testing.assert_close(loss, torch.tensor([HALF_LN_4_3]))
    loss.sum().backward()
    torch.testing.assert_close(student.grad, torch.tensor([[0.25, 0.0]]))  # T (p_s - p_t)
    # the temperature divides the logits and multiplies by T^2
    torch.testing.assert_close(binary_kl(student * 3, teacher * 3, temperature=3.0), 9 * loss)


def test_binary_losses_stay_finite_where_the_authors_float32_clamp_overflows():
    # in float32 1 - 1e-8 rounds to 1, so clamping the sigmoid lets log(1 - d) reach -inf; clamping the
    # logit to logit(1 - eps) is the same clamp done exactly, with the same zero gradient beyond it
    student = torch.tensor([[400.0, -400.0]], requires_grad=True)
    teacher = torch.zeros(1, 2)
    bound = -math.log(2) - 0.5 * (math.log(1 - 1e-8) + math.log(1e-8))
    norm = binary_kl_norm(student, teacher, temperature=1.0)
    torch.testing.assert_close(norm, torch.tensor([2 * bound]))
    plain = binary_kl(student, teacher, temperature=1.0)
    assert torch.isfinite(plain).all()
    (norm + plain).sum().backward()
    torch.testing.assert_close(student.grad, torch.zeros(1, 2))


def test_binary_losses_refuse_a_bad_temperature():
    with pytest.raises(ValueError, match="temperature must be a finite number in \\(0.0, inf\\)"):
        binary_kl_norm(torch.zeros(1, 2), torch.zeros(1, 2), temperature=0.0)
    with pytest.raises(ValueError, match="eps"):
        binary_kl(torch.zeros(1, 2), torch.zeros(1, 2), eps=0.7)


def test_tgeo_relations_and_class_mean_by_hand():
    s = torch.tensor([[0.6, 0.4]])
    t = torch.tensor([[0.9, 0.1]])
    g = torch.tensor([[1.0, 0.0]])
    m = torch.tensor([[0.8, 0.2]])
    x = tgeo_relations(s, t, g, m)
    expected = [0.6, 0.4, 0.9, 0.1, 1.0, 0.0, 0.8, 0.2]
    expected += [0.04, 0.04, 0.16, 0.16, 0.09, 0.09, 0.01, 0.01, 0.04, 0.04]
    torch.testing.assert_close(x, torch.tensor([expected]))
    with pytest.raises(ValueError, match="four \\[N, C\\] tensors of one shape"):
        tgeo_relations(s, t, g, torch.zeros(1, 3))
    # class 0 seen twice (teacher mean 0.7/0.3), class 1 never (uniform); a mixed target mixes the means
    sums = torch.tensor([[1.4, 0.6], [0.0, 0.0]])
    counts = torch.tensor([2.0, 0.0])
    targets = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    torch.testing.assert_close(teacher_class_mean(targets, sums, counts), torch.tensor([[0.7, 0.3], [0.6, 0.4]]))
    torch.testing.assert_close(
        fused_kd_loss(torch.tensor([0.25, 1.0]), torch.tensor([4.0, 2.0]), torch.tensor([8.0, 5.0])),
        torch.tensor([7.0, 2.0]),
    )


def _student() -> Classifier:
    torch.manual_seed(0)
    return Classifier(MLP(4, 3, hidden=(5,)), num_classes=3)


def test_dhkd_aux_head_gets_only_the_logit_loss_and_the_main_head_none():
    module = _student()
    loss = DHKDLoss(temperature=2.0)
    module.distill_loss = loss  # where Distill attaches it, so the student's optimizer sees the head
    loss.setup(None, module, None)
    assert isinstance(loss.aux_head, nn.Linear) and loss.aux_head.in_features == 5
    assert any(p is loss.aux_head.weight for p in module.parameters())
    x = torch.randn(6, 4)
    logits, features = module.forward_features(x)
    # a copy of the main head on the aux head, and the main logits as the teacher: the loss is exactly 0
    loss.aux_head.load_state_dict(module.backbone.head.state_dict())
    out = StepOutput(logits, features, torch.zeros(6))
    torch.testing.assert_close(loss(out, logits.detach(), None, torch.zeros(6, dtype=torch.long)), torch.zeros(6))
    # the value is binary_kl_norm of the aux logits; the main head gets no gradient, backbone and aux head do
    teacher = torch.randn(6, 3)
    value = loss(out, teacher, None, torch.zeros(6, dtype=torch.long))
    torch.testing.assert_close(value, binary_kl_norm(loss.aux_head(features), teacher, 2.0))
    value.sum().backward()
    assert module.backbone.head.weight.grad is None
    assert module.backbone.body[1].weight.grad.abs().sum() > 0 and loss.aux_head.weight.grad.abs().sum() > 0


def test_dhkd_nonlinear_head_and_plain_binary_kl():
    module = _student()
    loss = DHKDLoss(temperature=1.0, head="nonlinear", logit_loss="binary_kl", hidden=7, dropout=0.0)
    loss.setup(None, module, None)
    kinds = [type(m) for m in loss.aux_head]
    assert kinds == [nn.Linear, nn.Dropout, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert loss.aux_head[0].in_features == 5 and loss.aux_head[-1].out_features == 3
    features, teacher = torch.randn(4, 5), torch.randn(4, 3)
    value = loss(StepOutput(torch.zeros(4, 3), features, torch.zeros(4)), teacher, None, torch.zeros(4))
    torch.testing.assert_close(value, binary_kl(loss.aux_head(features), teacher, 1.0))


def test_dhkd_bad_arguments():
    with pytest.raises(ValueError, match="temperature"):
        DHKDLoss(temperature=-1.0)
    with pytest.raises(ValueError, match="head must be 'linear' or 'nonlinear'"):
        DHKDLoss(head="mlp")
    with pytest.raises(ValueError, match="logit_loss must be one of"):
        DHKDLoss(logit_loss="kl")
    with pytest.raises(ValueError, match="dropout"):
        DHKDLoss(dropout=1.0)
    headless = Classifier(nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.Linear(8, 3, bias=False)), num_classes=3)
    headless.backbone[2] = nn.Identity()  # no Linear with 3 outputs left to read the width from
    with pytest.raises(ValueError, match="pass in_features"):
        DHKDLoss().setup(None, headless, None)
    loss = DHKDLoss()
    with pytest.raises(RuntimeError, match="setup"):
        loss(StepOutput(torch.zeros(1, 3), torch.zeros(1, 5), torch.zeros(1)), torch.zeros(1, 3), None, torch.zeros(1))
    loss.setup(None, _student(), None)
    with pytest.raises(ValueError, match="forward_features"):
        loss(StepOutput(torch.zeros(1, 3), None, torch.zeros(1)), torch.zeros(1, 3), None, torch.zeros(1))


# ---------------------------------------------------------------------------------------------------- TGeo-KD
def _fake_trainer(lr: float = 0.5):
    """What TGeoLoss reads of a trainer, for tests that run the loss outside a fit."""
    return SimpleNamespace(
        state=SimpleNamespace(fn=TrainerFn.FITTING, stage=None),
        datamodule=None,
        strategy=SimpleNamespace(reduce=lambda tensor, reduce_op: tensor),
        optimizers=[SimpleNamespace(param_groups=[{"lr": lr}])],
        fast_dev_run=False,
        _logger_connector=SimpleNamespace(should_update_logs=False),
    )


def _linear_student(loss):
    torch.manual_seed(0)
    module = Classifier(MLP(3, 2, hidden=()), num_classes=2)
    module.distill_loss = loss
    trainer = _fake_trainer()
    module._trainer = trainer
    loss.setup(trainer, module, None)
    return module


def test_tgeo_loss_value_is_the_ratio_fused_kd_and_ce():
    loss = TGeoLoss(temperature=2.0, held_out=[])
    module = _linear_student(loss)
    loss.class_sums.copy_(torch.tensor([[1.6, 0.4], [0.3, 0.7]]))  # teacher means 0.8/0.2 and 0.3/0.7
    loss.class_counts.copy_(torch.tensor([2.0, 1.0]))
    loss.eval()  # no upper step, no statistics update
    logits, teacher = torch.tensor([[0.5, -0.5], [0.0, 1.0]]), torch.tensor([[2.0, 0.0], [1.0, 0.0]])
    targets = torch.tensor([0, 1])
    value = loss(StepOutput(logits, None, torch.zeros(2)), teacher, None, targets)
    g = torch.eye(2)
    state = tgeo_relations(logits.softmax(-1), teacher.softmax(-1), g, torch.tensor([[0.8, 0.2], [0.3, 0.7]]))
    alpha = loss.ratio_net(state).squeeze(-1)
    soft_t, log_s = (teacher / 2).softmax(-1), (logits / 2).log_softmax(-1)
    kd = 4 * (soft_t * (soft_t.log() - log_s)).sum(-1)  # T^2 KL at T = 2
    ce = nn.functional.cross_entropy(logits, targets, reduction="none")
    torch.testing.assert_close(value, alpha * kd + (1 - alpha) * ce)
    assert loss.replaces_hard_loss and module.distill_loss is loss


def test_tgeo_upper_step_is_the_one_step_lookahead_hypergradient():
    torch.manual_seed(1)
    x_val, y_val = torch.randn(5, 3), torch.randint(0, 2, (5,))
    loss = TGeoLoss(temperature=1.0, held_out=[(x_val, y_val)], lookahead_lr=0.5)
    module = _linear_student(loss)
    loss._optimizer = torch.optim.SGD(loss.ratio_net.parameters(), lr=1.0)  # the step is then minus the gradient
    before = [p.clone() for p in loss.ratio_net.parameters()]
    x, y, teacher = torch.randn(4, 3), torch.tensor([0, 1, 1, 0]), torch.randn(4, 2)
    # brute force: the student as explicit W, b; theta' = theta - eta * grad of the mean fused loss
    head = module.backbone.head
    omega = [p.clone().requires_grad_() for p in before]
    w, b = head.weight.detach().clone().requires_grad_(), head.bias.detach().clone().requires_grad_()
    logits = x @ w.T + b
    p_t = teacher.softmax(-1)
    class_means = torch.stack([p_t[y == c].mean(0) for c in (0, 1)])  # this batch is added before it is read
    state = tgeo_relations(logits.detach().softmax(-1), p_t, torch.eye(2)[y], class_means[y])
    names = [n for n, _ in loss.ratio_net.named_parameters()]
    alpha = torch.func.functional_call(loss.ratio_net, dict(zip(names, omega, strict=True)), (state,)).squeeze(-1)
    kd = (p_t * (teacher.log_softmax(-1) - logits.log_softmax(-1))).sum(-1)
    ce = nn.functional.cross_entropy(logits, y, reduction="none")
    inner = (alpha * kd + (1 - alpha) * ce).mean()
    gw, gb = torch.autograd.grad(inner, (w, b), create_graph=True)
    outer = nn.functional.cross_entropy(x_val @ (w - 0.5 * gw).T + (b - 0.5 * gb), y_val)
    expected = torch.autograd.grad(outer, omega)
    module.train()
    out = loss(StepOutput(module(x), None, torch.zeros(4)), teacher, None, y)
    for p, p0, g in zip(loss.ratio_net.parameters(), before, expected, strict=True):
        torch.testing.assert_close(p, p0 - g)
        assert p.grad is None and not p.requires_grad
    assert loss.steps == 1 and loss.held_out_batches == 1
    out.sum().backward()  # the student's own backward still works and never reaches the ratio network
    assert head.weight.grad is not None


# ---------------------------------------------------------------------------------------------------- real fits
def _distill_fit(loss, quiet_trainer_kwargs, steps=4):
    pl.seed_everything(0, verbose=False)
    teacher = MLP(64, 10, hidden=(32,))
    distill = Distill(teacher, loss=loss, temperature=2.0)
    model = Classifier(MLP(64, 10, hidden=(16,)), num_classes=10, optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    trainer = pl.Trainer(
        max_steps=steps, limit_val_batches=1, log_every_n_steps=1, callbacks=[distill], **quiet_trainer_kwargs
    )
    trainer.fit(model, DigitsDataModule(batch_size=16))
    return model, trainer


def test_dhkd_in_a_real_fit(quiet_trainer_kwargs):
    model, trainer = _distill_fit("dhkd", quiet_trainer_kwargs)
    loss = model.distill_loss
    assert isinstance(loss, DHKDLoss) and loss.temperature == 2.0 and loss.aux_head.in_features == 16
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert id(loss.aux_head.weight) in optimized  # the student's optimizer trains the auxiliary head
    assert torch.isfinite(trainer.callback_metrics["tricks/Distill/dhkd"])
    head = loss.aux_head.weight.clone()
    (metrics,) = trainer.validate(model, DigitsDataModule(batch_size=16), verbose=False)  # setup runs again
    assert torch.equal(loss.aux_head.weight, head) and metrics["val/acc"] > 0.0  # the main head predicts


def test_tgeo_in_a_real_fit(quiet_trainer_kwargs):
    pl.seed_everything(0, verbose=False)
    initial = ratio_network(10).state_dict()  # what the loss's ratio network starts from under this seed
    model, trainer = _distill_fit("tgeo", quiet_trainer_kwargs)
    loss = model.distill_loss
    assert isinstance(loss, TGeoLoss) and loss.steps == 4 and loss.held_out_batches == 4
    assert float(loss.class_counts.sum()) == 4 * 16  # every training sample's teacher prediction counted
    moved = [not torch.equal(p, initial[n]) for n, p in loss.ratio_net.state_dict().items()]
    assert any(moved)  # the bilevel step trains the ratio network (the authors' released code never does)
    alpha = float(trainer.callback_metrics["tricks/Distill/tgeo_alpha"])
    assert 0.0 < alpha < 1.0


def test_tgeo_needs_held_out_data_and_good_arguments(quiet_trainer_kwargs):
    loader = DataLoader(TensorDataset(torch.randn(32, 64), torch.randint(0, 10, (32,))), batch_size=8)
    distill = Distill(MLP(64, 10), loss="tgeo")
    model = Classifier(MLP(64, 10, hidden=(16,)), num_classes=10)
    with pytest.raises(ValueError, match="pass held_out=<DataLoader>"):
        pl.Trainer(max_steps=1, callbacks=[distill], **quiet_trainer_kwargs).fit(model, loader)
    for kwargs, message in (
        ({"update_every": 0}, "update_every"),
        ({"ratio_lr": 0.0}, "ratio_lr"),
        ({"lookahead_lr": float("nan")}, "lookahead_lr"),
        ({"hidden": (8, 0)}, "hidden widths"),
        ({"temperature": float("inf")}, "temperature"),
    ):
        with pytest.raises(ValueError, match=message):
            TGeoLoss(**kwargs)
    empty = TGeoLoss(held_out=[])
    _linear_student(empty).train()
    with pytest.raises(ValueError, match="held-out data is empty"):
        empty(
            StepOutput(torch.zeros(2, 2, requires_grad=True), None, torch.zeros(2)),
            torch.zeros(2, 2),
            None,
            torch.tensor([0, 1]),
        )
