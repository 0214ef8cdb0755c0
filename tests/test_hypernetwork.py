"""HyperNetwork and MIP (Ortiz et al., ICLR 2024): the encoding, the additive output, the predicted shapes, the
functional call, a real fit, YAML construction and the errors."""

import copy
import math

import lightning.pytorch as pl
import pytest
import torch
from jsonargparse import ArgumentParser
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lit_tricks.modules.hypernetwork import LossConditionedRegression, mixed_regression_loss
from lit_tricks.nets import MLP
from lit_tricks.nets.hypernetwork import HyperNetwork, encode_input


def _hypernet(mip=True, input_dim=1, hidden=(8, 16), target=None, **kwargs):
    torch.manual_seed(0)
    return HyperNetwork(input_dim, target or MLP(2, 3, hidden=(5,)), hidden=hidden, mip=mip, **kwargs)


def test_cos_sin_encoding_by_hand_and_its_norm_is_constant():
    h = torch.tensor([0.0, 1 / 3, 1.0])
    expected = torch.tensor([1.0, math.sqrt(3) / 2, 0.0, 0.0, 0.5, 1.0])
    torch.testing.assert_close(encode_input(h, "cos|sin"), expected, atol=1e-7, rtol=0)
    h = torch.rand(64, 5)
    torch.testing.assert_close(encode_input(h).norm(dim=-1), torch.full((64,), math.sqrt(5)))


def test_z_one_minus_z_encoding_by_hand_keeps_the_l1_norm():
    h = torch.tensor([[0.2, 0.7], [1.0, 0.0]])
    encoded = encode_input(h, "z|1-z")
    torch.testing.assert_close(encoded, torch.tensor([[0.2, 0.7, 0.8, 0.3], [1.0, 0.0, 0.0, 1.0]]))
    torch.testing.assert_close(encoded.abs().sum(-1), torch.tensor([2.0, 2.0]))


def test_mip_output_is_theta0_plus_the_hypernet_term_by_hand():
    # hidden=(): theta = b + W E(h); target nn.Linear(1, 1) has theta = (weight, bias)
    net = HyperNetwork(1, nn.Linear(1, 1), hidden=(), mip=True)
    with torch.no_grad():
        net.output.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        net.output.bias.copy_(torch.tensor([0.5, -1.0]))
    params = net.predict_parameters(torch.tensor([0.0]))  # E(0) = [1, 0]
    torch.testing.assert_close(params["weight"], torch.tensor([[1.5]]))
    torch.testing.assert_close(params["bias"], torch.tensor([2.0]))
    torch.testing.assert_close(net(torch.tensor([[2.0]]), torch.tensor([0.0])), torch.tensor([[5.0]]))
    params = net.predict_parameters(torch.tensor([1.0]))  # E(1) = [0, 1]
    torch.testing.assert_close(params["weight"], torch.tensor([[2.5]]))
    torch.testing.assert_close(params["bias"], torch.tensor([3.0]))


def test_mip_predicts_theta0_when_the_hypernet_output_is_zero():
    net = _hypernet(mip=True, input_dim=2)
    with torch.no_grad():
        net.output.weight.zero_()
    theta0 = net.independent_parameters()
    for h in (torch.tensor([0.0, 0.0]), torch.tensor([0.3, 1.0])):
        params = net.predict_parameters(h)
        assert params.keys() == theta0.keys()
        for name in params:
            torch.testing.assert_close(params[name], theta0[name], rtol=0, atol=0)


def test_theta0_is_initialised_as_hyperlight():
    torch.manual_seed(0)
    target = nn.Sequential(nn.Linear(256, 256), nn.LayerNorm(256))
    theta0 = HyperNetwork(1, target, hidden=(4,), mip=True).independent_parameters()
    assert theta0["0.weight"].std().item() == pytest.approx(math.sqrt(2 / 256), rel=0.03)  # Kaiming, fan-in
    assert torch.equal(theta0["0.bias"], torch.zeros(256))
    assert torch.equal(theta0["1.weight"], torch.ones(256))  # a 1-D non-bias tensor keeps the target's value
    assert torch.equal(HyperNetwork(1, target, hidden=(4,), mip=False).output.bias, torch.zeros(256 * 258 + 256))


def test_plain_output_is_proportional_to_the_input_magnitude_at_init():
    # The problem MIP fixes: LeakyReLU layers with zero biases are positively homogeneous, so theta(a h) = a theta(h)
    net = _hypernet(mip=False, input_dim=2)
    h = torch.tensor([0.2, 0.5])
    small, large = net.predict_parameters(h), net.predict_parameters(3 * h)
    for name in small:
        torch.testing.assert_close(large[name], 3 * small[name])
        assert torch.equal(net.predict_parameters(torch.zeros(2))[name], torch.zeros_like(small[name]))


def test_predicted_parameters_have_the_target_shapes():
    target = MLP(2, 3, hidden=(5,))
    net = _hypernet(input_dim=3, target=target)
    shapes = {name: p.shape for name, p in target.named_parameters()}
    single = net.predict_parameters(torch.rand(3))
    assert {name: t.shape for name, t in single.items()} == shapes
    batched = net.predict_parameters(torch.rand(4, 3))
    assert {name: t.shape for name, t in batched.items()} == {n: (4, *s) for n, s in shapes.items()}


@pytest.mark.parametrize("mip", [True, False])
def test_functional_call_equals_the_target_with_the_weights_loaded(mip):
    loaded = MLP(2, 3, hidden=(5,))
    net = _hypernet(mip=mip, input_dim=2, target=loaded)
    x, h = torch.randn(6, 2), torch.rand(6, 2)
    with torch.no_grad():
        loaded.load_state_dict(net.predict_parameters(h[0]))
        torch.testing.assert_close(net(x, h[0]), loaded(x))
        per_sample = net(x, h)  # one weight set per sample (vmap)
        rows = torch.cat([net(x[i : i + 1], h[i]) for i in range(len(x))])
    torch.testing.assert_close(per_sample, rows, atol=1e-5, rtol=1e-5)


def test_only_the_hypernet_has_parameters_and_the_users_target_is_left_alone():
    target = MLP(2, 3, hidden=(5,))
    before = copy.deepcopy(target.state_dict())
    net = _hypernet(target=target)
    assert {name.split(".")[0] for name, _ in net.named_parameters()} == {"body", "output"}
    assert not any(key.startswith("target.") for key in net.state_dict())  # the template is not saved
    net(torch.randn(4, 2), torch.rand(4, 1)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    assert all(p.requires_grad for p in target.parameters())
    assert all(torch.equal(p, before[name]) for name, p in target.state_dict().items())


def test_mixed_regression_loss_by_hand():
    pred = torch.tensor([[1.0], [0.0]])
    targets = torch.tensor([[0.0, 2.0], [1.0, 1.0]])
    lam = torch.tensor([[0.25], [0.5]])
    # (0.75 * 1 + 0.25 * 1 + 0.5 * 1 + 0.5 * 1) / 2
    assert mixed_regression_loss(pred, targets, lam).item() == pytest.approx(1.0)
    # the excess over the minimum lam (1 - lam) (y0 - y1)^2 is the distance to the optimum (1 - lam) y0 + lam y1
    pred, targets, lam = torch.randn(50, 1), torch.randn(50, 2), torch.rand(50, 1)
    floor = (lam * (1 - lam) * (targets[:, :1] - targets[:, 1:]).square()).mean()
    optimum = (1 - lam) * targets[:, :1] + lam * targets[:, 1:]
    excess = mixed_regression_loss(pred, targets, lam) - floor
    torch.testing.assert_close(excess, (pred - optimum).square().mean())


def test_a_real_fit_trains_the_hypernetwork(tmp_path):
    torch.manual_seed(0)
    x = torch.rand(64, 1) * 2 - 1
    data = DataLoader(TensorDataset(x, torch.cat([x.sin(), x.cos()], dim=1)), batch_size=16)
    val = DataLoader(TensorDataset(x[:16], torch.cat([x[:16].sin(), x[:16].cos()], dim=1)), batch_size=16)
    model = LossConditionedRegression(HyperNetwork(1, MLP(1, 1, hidden=(8,)), hidden=(8,)))
    before = copy.deepcopy(model.hypernet.state_dict())
    trainer = pl.Trainer(
        max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, val_check_interval=4,
    )  # fmt: skip
    trainer.fit(model, data, val)
    after = model.hypernet.state_dict()
    metrics = trainer.callback_metrics
    assert trainer.global_step == 4 and torch.isfinite(metrics["train/loss"])
    assert 0 <= metrics["val/excess"] < metrics["val/loss"]
    assert all(not torch.equal(after[name], before[name]) for name in ("output.weight", "output.bias"))


def test_constructible_from_yaml():
    parser = ArgumentParser()
    parser.add_argument("--model", type=LossConditionedRegression)
    config = parser.parse_string(
        """
model:
  class_path: lit_tricks.modules.hypernetwork.LossConditionedRegression
  init_args:
    hypernet:
      class_path: lit_tricks.nets.hypernetwork.HyperNetwork
      init_args:
        input_dim: 1
        hidden: [8]
        mip: false
        target: {class_path: lit_tricks.nets.MLP, init_args: {in_features: 1, num_classes: 1, hidden: [4]}}
"""
    )
    model = parser.instantiate_classes(config).model
    assert isinstance(model, LossConditionedRegression) and model.hypernet.mip is False
    assert model(torch.zeros(3, 1), torch.rand(3, 1)).shape == (3, 1)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"input_dim": 0}, ValueError, "input_dim"),
        ({"target": nn.ReLU()}, ValueError, "no parameters"),
        ({"target": "mlp"}, TypeError, "target"),
        ({"hidden": (8, 0)}, ValueError, "hidden"),
        ({"encoding": "fourier"}, ValueError, "encoding"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, error, match):
    arguments = {"input_dim": 1, "target": nn.Linear(1, 1)} | kwargs
    with pytest.raises(error, match=match):
        HyperNetwork(**arguments)


def test_bad_inputs_raise_clear_errors():
    net = _hypernet(mip=True)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        net(torch.zeros(2, 2), torch.tensor([1.5]))
    with pytest.raises(ValueError, match="shape"):
        net(torch.zeros(2, 2), torch.rand(2))
    with pytest.raises(ValueError, match="one row per sample"):
        net(torch.zeros(2, 2), torch.rand(3, 1))
    assert _hypernet(mip=False).predict_parameters(torch.tensor([2.0]))["head.bias"].shape == (3,)  # plain: any h
    with pytest.raises(ValueError, match="input_dim must be 1"):
        LossConditionedRegression(_hypernet(input_dim=2))
    with pytest.raises(TypeError, match="HyperNetwork"):
        LossConditionedRegression(nn.Linear(1, 1))
