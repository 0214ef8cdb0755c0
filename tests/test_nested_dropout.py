"""Nested dropout (lit_tricks.layers.nested_dropout, ApplyNestedDropout): the distribution of kept units against the
authors' formula, the prefix masks, eval, gradients, the generator in the state dict, a real fit, bad input."""

import math

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lit_tricks import Classifier
from lit_tricks.callbacks.nested_dropout import ApplyNestedDropout
from lit_tricks.data import DigitsDataModule
from lit_tricks.layers.nested_dropout import NestedDropout, nested_dropout, nested_dropout_probs, truncation_accuracy
from lit_tricks.nets import MLP


def _kept(out: torch.Tensor) -> torch.Tensor:
    """The number of kept units per row of a layer's output on an all-ones input."""
    return out.flatten(2).amax(dim=2).sum(dim=1) if out.dim() > 2 else out.sum(dim=1)


# ---------------------------------------------------------------- the distribution of k


def test_gaussian_probs_are_the_authors_formula():
    # the authors' GaussianDist(mu=0, std, N): exp(-((i - mu) / std)^2) for i = 1..N, normalised
    std, units = 2.0, 5
    weights = [math.exp(-((i / std) ** 2)) for i in range(1, units + 1)]
    expected = torch.tensor([w / sum(weights) for w in weights], dtype=torch.float64)
    torch.testing.assert_close(nested_dropout_probs(units, "gaussian", std=std), expected, rtol=1e-12, atol=0)


def test_geometric_probs_by_hand():
    torch.testing.assert_close(
        nested_dropout_probs(3, "geometric", p=0.5), torch.tensor([4 / 7, 2 / 7, 1 / 7], dtype=torch.float64)
    )


def test_a_tiny_std_does_not_underflow():
    probs = nested_dropout_probs(4, "gaussian", std=1e-3)  # exp(-1e6) is 0 in float64: softmax of the log-weights
    assert torch.equal(probs, torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64))


def test_per_sample_draws_follow_the_distribution():
    layer = NestedDropout(std=2.0, per_sample=True, seed=0)
    kept = _kept(layer(torch.ones(20000, 4))).long()
    frequencies = torch.bincount(kept, minlength=5)[1:].double() / kept.numel()
    torch.testing.assert_close(frequencies, nested_dropout_probs(4, std=2.0), atol=0.01, rtol=0)


def test_seeded_draws_are_multinomial_on_a_private_generator():
    layer = NestedDropout(std=3.0, seed=7)
    got = [int(_kept(layer(torch.ones(2, 6)))[0]) for _ in range(20)]
    generator = torch.Generator().manual_seed(7)
    expected = [int(torch.multinomial(nested_dropout_probs(6, std=3.0), 1, generator=generator)) + 1 for _ in range(20)]
    assert got == expected and len(set(got)) > 1
    state = torch.get_rng_state()
    NestedDropout(seed=1)(torch.ones(3, 4))
    assert torch.equal(state, torch.get_rng_state())  # the global generator is left alone


def test_without_a_seed_the_global_generator_draws():
    torch.manual_seed(3)
    a = NestedDropout(std=3.0, per_sample=True)(torch.ones(8, 6))
    torch.manual_seed(3)
    b = NestedDropout(std=3.0, per_sample=True)(torch.ones(8, 6))
    assert torch.equal(a, b)


# ---------------------------------------------------------------- the mask


@pytest.mark.parametrize("per_sample", [False, True])
def test_the_mask_keeps_a_prefix_without_rescaling(per_sample):
    layer = NestedDropout(std=4.0, per_sample=per_sample, seed=2)
    x = torch.randn(64, 10)
    out = layer(x)
    kept = layer.last_units.expand(64)
    prefix = torch.arange(10) < kept[:, None]
    assert torch.equal(out, torch.where(prefix, x, torch.zeros(())))
    assert (len(set(kept.tolist())) > 1) == per_sample  # 64 draws from std 4 are not all equal


def test_units_are_channels_for_conv_features():
    layer = NestedDropout(std=2.0, per_sample=True, seed=0)
    out = layer(torch.ones(16, 5, 3))  # [N, C, L]: whole channels kept or dropped
    assert torch.equal(out, out[:, :, :1].expand(16, 5, 3))
    assert torch.equal(out[:, :, 0], (torch.arange(5) < layer.last_units[:, None]).float())


def test_eval_is_identity_or_a_fixed_truncation():
    x = torch.randn(4, 6)
    layer = NestedDropout(std=1.0, seed=0).eval()
    assert torch.equal(layer(x), x)
    layer.eval_units = 2
    assert torch.equal(layer(x), torch.cat([x[:, :2], torch.zeros(4, 4)], dim=1))
    layer.eval_units = 7
    with pytest.raises(ValueError, match="eval_units=7 is more than the 6"):
        layer(x)


def test_gradient_flows_only_through_kept_units():
    torch.manual_seed(0)
    head = nn.Linear(8, 3)
    layer = NestedDropout(std=3.0, seed=4)
    x = torch.randn(5, 8, requires_grad=True)
    head(layer(x)).sum().backward()
    k = int(layer.last_units)
    assert 1 <= k < 8
    torch.testing.assert_close(x.grad[:, :k], head.weight.sum(dim=0)[:k].expand(5, k))
    assert torch.equal(x.grad[:, k:], torch.zeros(5, 8 - k))
    assert torch.equal(head.weight.grad[:, k:], torch.zeros(3, 8 - k)) and head.weight.grad[:, :k].abs().sum() > 0


def test_the_generator_state_is_in_the_state_dict():
    layer = NestedDropout(std=3.0, seed=5)
    layer(torch.ones(1, 6))
    saved = {key: value.clone() if torch.is_tensor(value) else value for key, value in layer.state_dict().items()}
    first = [int(_kept(layer(torch.ones(1, 6)))[0]) for _ in range(10)]
    restored = NestedDropout(std=3.0, seed=99)
    restored.load_state_dict(saved)
    assert [int(_kept(restored(torch.ones(1, 6)))[0]) for _ in range(10)] == first
    assert NestedDropout().state_dict()["_extra_state"] == {}  # no private generator, nothing to keep


# ---------------------------------------------------------------- truncation accuracy, the transform


def test_truncation_accuracy_equals_a_loop_over_prefixes():
    torch.manual_seed(0)
    head, features, targets = nn.Linear(6, 4), torch.randn(30, 6), torch.randint(0, 4, (30,))
    expected = []
    for k in range(1, 7):
        logits = head(torch.cat([features[:, :k], torch.zeros(30, 6 - k)], dim=1))
        expected.append((logits.argmax(dim=1) == targets).float().mean())
    torch.testing.assert_close(truncation_accuracy(features, head, targets), torch.stack(expected))


def test_nested_dropout_wraps_the_head_between_features_and_head():
    net = nested_dropout(MLP(64, 10, hidden=(16,)), std=2.0, seed=0)
    assert isinstance(net.head[0], NestedDropout) and isinstance(net.head[1], nn.Linear)
    x = torch.randn(4, 64)
    net.eval()
    assert torch.equal(net(x), net.head[1](net.forward_features(x)))
    nested_dropout(net, std=5.0, eval_units=3)  # a second call replaces the layer, keeps the mode
    assert len(net.head) == 2 and net.head[0].std == 5.0 and not net.head[0].training
    assert torch.equal(net(x), net.head[1](net.forward_features(x) * (torch.arange(16) < 3)))


def test_fit_on_noisy_digits(tmp_path):
    pl.seed_everything(0, verbose=False)
    model = Classifier(MLP(64, 10, hidden=(32,)), num_classes=10)
    trainer = pl.Trainer(
        max_steps=4,
        limit_val_batches=1,
        log_every_n_steps=1,
        accelerator="cpu",
        devices=1,
        default_root_dir=tmp_path,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ApplyNestedDropout(std=4.0, seed=0)],
    )
    before = model.backbone.head.weight.detach().clone()
    trainer.fit(model, DigitsDataModule(batch_size=32, label_noise=0.4))
    head = model.backbone.head
    assert isinstance(head[0], NestedDropout) and trainer.global_step == 4
    assert not torch.equal(head[1].weight, before) and math.isfinite(float(trainer.callback_metrics["train/loss"]))
    assert 1 <= float(trainer.callback_metrics["tricks/NestedDropout/kept_units"]) <= 32


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"std": 0.0}, ValueError, "std must be"),
        ({"std": float("nan")}, ValueError, "std must be"),
        ({"distribution": "geometric", "p": 1.0}, ValueError, "p must be"),
        ({"distribution": "gauss"}, ValueError, "distribution must be 'gaussian'"),
        ({"eval_units": 0}, ValueError, "eval_units must be"),
        ({"seed": 1.5}, TypeError, "seed must be an integer"),
        ({"per_sample": "yes"}, TypeError, "per_sample must be a bool"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        NestedDropout(**kwargs)
    with pytest.raises(error, match=match):
        ApplyNestedDropout(**kwargs)


def test_bad_head_and_inputs():
    with pytest.raises(TypeError, match="head must be the dotted name"):
        ApplyNestedDropout(head="")
    with pytest.raises(ValueError, match="no submodule 'classifier'"):
        nested_dropout(MLP(64, 10), head="classifier")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        nested_dropout("MLP")
    with pytest.raises(ValueError, match="units along dim 1"):
        NestedDropout()(torch.ones(5))
    with pytest.raises(TypeError, match="head must be a torch.nn.Linear"):
        truncation_accuracy(torch.ones(2, 3), nn.Sequential(nn.Linear(3, 2)), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="features must be"):
        truncation_accuracy(torch.ones(2, 4), nn.Linear(3, 2), torch.zeros(2, dtype=torch.long))
