"""Weight Compander: the map and its gradient by hand, registration and export, a real fit, bad input."""

import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.nn.utils import parametrize

from lit_tricks import Classifier
from lit_tricks.callbacks.weight_compander import ApplyWeightCompander
from lit_tricks.data import DigitsDataModule
from lit_tricks.layers.weight_compander import (
    WeightCompander,
    compand,
    expand,
    remove_weight_compander,
    weight_compander,
)
from lit_tricks.nets import CNN2D


def test_compand_by_hand():
    # alpha = 0.5, beta = 0.44: f(v) = sign(v) * (sqrt(|v| + 0.44) - sqrt(0.44))
    v = torch.tensor([0.0, 0.56, -0.56, 1.81, -8.56], dtype=torch.float64)
    r = math.sqrt(0.44)
    want = torch.tensor([0.0, 1.0 - r, r - 1.0, 1.5 - r, r - 3.0], dtype=torch.float64)
    torch.testing.assert_close(compand(v, alpha=0.5, beta=0.44), want, rtol=0, atol=1e-12)
    torch.testing.assert_close(compand(v, alpha=1.0, beta=0.3), v, rtol=0, atol=1e-12)  # alpha = 1: identity
    torch.testing.assert_close(expand(compand(v, 0.5, 0.44), 0.5, 0.44), v, rtol=0, atol=1e-12)


def test_gradient_is_the_derivative_by_hand():
    # f'(v) = alpha * (|v| + beta)^(alpha - 1), also at v = 0 (the one-sided limit, not autograd's sign' = 0)
    v = torch.tensor([0.0, 0.56, -0.56, 1.81, -8.56], dtype=torch.float64, requires_grad=True)
    compand(v, alpha=0.5, beta=0.44).sum().backward()
    want = 0.5 / torch.tensor([0.44, 1.0, 1.0, 2.25, 9.0], dtype=torch.float64).sqrt()
    torch.testing.assert_close(v.grad, want, rtol=0, atol=1e-12)
    torch.autograd.gradcheck(lambda t: compand(t, 0.3, 0.05), torch.randn(7, dtype=torch.float64, requires_grad=True))


def test_registration_keeps_the_function_and_export_gives_plain_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(3 * 36, 5))
    model.eval()
    x = torch.randn(2, 1, 8, 8)
    before = model(x)
    weight_compander(model, alpha=0.5, beta=0.01)
    assert parametrize.is_parametrized(model[0], "weight") and parametrize.is_parametrized(model[3], "weight")
    assert not parametrize.is_parametrized(model[0], "bias") and not parametrize.is_parametrized(model[1])
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # move the free tensors: the weights follow through the compander
        for layer in (model[0], model[3]):
            layer.parametrizations.weight.original.add_(0.1)
    v = model[3].parametrizations.weight.original
    torch.testing.assert_close(model[3].weight, compand(v, 0.5, 0.01))
    trained = model(x)
    remove_weight_compander(model)
    assert not parametrize.is_parametrized(model[3]) and isinstance(model[3].weight, nn.Parameter)
    assert "3.weight" in model.state_dict()
    torch.testing.assert_close(model(x), trained, rtol=0, atol=0)


def _fit(root, callbacks):
    pl.seed_everything(0, verbose=False)
    model = Classifier(CNN2D(width=4), num_classes=10)
    trainer = pl.Trainer(
        max_steps=3,
        limit_train_batches=3,
        limit_val_batches=1,
        accelerator="cpu",
        devices=1,
        default_root_dir=root,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=callbacks,
    )
    trainer.fit(model, DigitsDataModule(as_image=True, batch_size=64))
    return model, trainer


def test_fit_trains_the_free_tensors_on_digits_cnn(tmp_path):
    model, trainer = _fit(tmp_path, [ApplyWeightCompander(alpha=0.5, beta=0.01)])
    assert trainer.global_step == 3 and math.isfinite(float(trainer.callback_metrics["train/loss"]))
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert layers and all(parametrize.is_parametrized(m, "weight") for m in layers)
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert all(id(m.parametrizations.weight.original) in optimized for m in layers)
    x = torch.rand(4, 1, 8, 8)
    model.eval()
    want = model(x)
    remove_weight_compander(model)
    torch.testing.assert_close(model(x), want, rtol=0, atol=0)


def test_bad_input_is_refused_clearly():
    with pytest.raises(ValueError, match=r"alpha must be a finite number in \(0.0, 1.0\]"):
        ApplyWeightCompander(alpha=1.5)
    with pytest.raises(ValueError, match=r"beta must be a finite number in \(0.0, inf\)"):
        WeightCompander(beta=0.0)
    with pytest.raises(TypeError, match="alpha must be a finite number"):
        compand(torch.zeros(1), alpha="0.5")
    with pytest.raises(ValueError, match="beta must be"):
        weight_compander(nn.Linear(2, 2), beta=float("nan"))
    with pytest.raises(ValueError, match="no nn.Linear or nn.Conv"):
        weight_compander(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(2)))
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        weight_compander("net")
    net = weight_compander(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="already applied"):
        weight_compander(net)
    with pytest.raises(ValueError, match="apply weight_compander first"):
        remove_weight_compander(nn.Linear(2, 2))


def test_resume_restores_the_free_tensors(tmp_path):
    def fit(max_steps, ckpt_path=None):
        pl.seed_everything(0, verbose=False)
        model = Classifier(CNN2D(width=4), num_classes=10)
        trainer = pl.Trainer(
            max_steps=max_steps,
            limit_val_batches=0,
            accelerator="cpu",
            devices=1,
            default_root_dir=tmp_path,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[ApplyWeightCompander(), ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)],
        )
        trainer.fit(model, DigitsDataModule(as_image=True, batch_size=64), ckpt_path=ckpt_path)
        return model

    straight = fit(4)
    fit(2)
    resumed = fit(4, ckpt_path=tmp_path / "last.ckpt")
    torch.testing.assert_close(resumed.state_dict(), straight.state_dict())
