"""TrAct (lit_tricks.layers.tract): the weight gradient against its closed form solved directly on hand-checkable
tensors, for Linear, Conv1d and Conv2d; forward, input and bias gradients unchanged; removal; real fits; errors."""

import copy
import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lit_tricks import Classifier
from lit_tricks.callbacks.tract import ApplyTrAct
from lit_tricks.data import DigitsDataModule, MNIST1DDataModule
from lit_tricks.layers.tract import (
    TrActConv1d,
    TrActConv2d,
    TrActLinear,
    remove_tract,
    tract,
    tract_weight_grad,
)
from lit_tricks.nets import CNN1D, CNN2D, MLP


def _grads(layer, x, upstream):
    """Output, weight, bias and input gradients of ``sum(layer(x) * upstream)``."""
    layer.zero_grad()
    x = x.clone().requires_grad_()
    out = layer(x)
    (out * upstream).sum().backward()
    return out.detach(), layer.weight.grad.clone(), layer.bias.grad.clone(), x.grad


def _ridge(rows, grad_rows, lam):
    """``D = argmin_D ||A D^T - n G||^2 / n + lam ||D||^2`` by least squares on the stacked system
    ``[A / sqrt(n); sqrt(lam) I] D^T = [sqrt(n) G; 0]``: the TrAct gradient solved without forming the inverse."""
    n, d = rows.shape
    system = torch.cat([rows / math.sqrt(n), math.sqrt(lam) * torch.eye(d, dtype=rows.dtype)])
    target = torch.cat([math.sqrt(n) * grad_rows, torch.zeros(d, grad_rows.shape[1], dtype=rows.dtype)])
    return torch.linalg.lstsq(system, target).solution.T


def _patches_by_hand(x, kernel, stride, dilation):
    """Rows ``(sample, out position)`` of an already padded ``[N, C, H, W]`` input: the patch ``(C, kh, kw)``
    flattened, by plain loops (not ``F.unfold``)."""
    n, _, h, w = x.shape
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    out_h, out_w = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
    rows = []
    for i in range(n):
        for r in range(out_h):
            for c in range(out_w):
                rows.append(x[i, :, r * sh : r * sh + dh * (kh - 1) + 1 : dh, c * sw : c * sw + dw * (kw - 1) + 1 : dw])
    return torch.stack([p.flatten() for p in rows])


# ---------------------------------------------------------------- the closed form


def test_hand_example_where_the_gram_matrix_is_a_multiple_of_the_identity():
    # inputs 2 I: A^T A / n = 4 I / 2 = 2 I; lam = 2: dW' = dW (4 I)^-1 = dW / 4
    layer = tract(nn.Linear(2, 3), lam=2.0)
    upstream = torch.tensor([[1.0, -2.0, 3.0], [4.0, 0.5, -1.0]])
    _, grad, bias_grad, _ = _grads(layer, 2 * torch.eye(2), upstream)
    torch.testing.assert_close(grad, (upstream.T @ (2 * torch.eye(2))) / 4, rtol=0, atol=1e-6)
    torch.testing.assert_close(bias_grad, upstream.sum(0))  # the bias gradient is the plain one


@pytest.mark.parametrize("rows", [12, 3])  # n >= d: the d x d system; n < d: the n x n one (the authors' branch)
def test_linear_gradient_is_the_ridge_solution(rows):
    torch.manual_seed(0)
    layer, x, upstream = nn.Linear(5, 4).double(), torch.randn(rows, 5).double(), torch.randn(rows, 4).double()
    _, grad, _, _ = _grads(tract(layer, lam=0.3), x, upstream)
    torch.testing.assert_close(grad, _ridge(x, upstream, 0.3), rtol=0, atol=1e-10)
    gram = x.T @ x / rows + 0.3 * torch.eye(5, dtype=torch.float64)
    torch.testing.assert_close(grad, upstream.T @ x @ torch.linalg.inv(gram), rtol=0, atol=1e-10)


def test_linear_flattens_leading_dims_into_rows():
    torch.manual_seed(0)
    x, upstream = torch.randn(2, 3, 4).double(), torch.randn(2, 3, 6).double()
    _, grad, _, _ = _grads(tract(nn.Linear(4, 6).double(), lam=0.1), x, upstream)
    torch.testing.assert_close(grad, _ridge(x.reshape(6, 4), upstream.reshape(6, 6), 0.1), rtol=0, atol=1e-10)


@pytest.mark.parametrize(
    ("kwargs", "shape"),
    [
        ({"kernel_size": 3, "padding": 1}, (4, 2, 5, 5)),
        ({"kernel_size": (2, 3), "stride": 2, "padding": (1, 0), "dilation": (1, 2)}, (3, 2, 7, 8)),
        ({"kernel_size": 2, "padding": "same", "padding_mode": "reflect"}, (2, 2, 4, 5)),
        ({"kernel_size": 3}, (1, 2, 3, 4)),  # 2 patches of 18 values: n < d
    ],
)
def test_conv2d_gradient_is_the_ridge_solution_on_its_patches(kwargs, shape):
    torch.manual_seed(0)
    conv = nn.Conv2d(shape[1], 3, **kwargs).double()
    x = torch.randn(shape, dtype=torch.float64)
    out = conv(x)
    upstream = torch.randn_like(out)
    padded = F.pad(x, conv._reversed_padding_repeated_twice, "constant" if conv.padding_mode == "zeros" else "reflect")
    rows = _patches_by_hand(padded, conv.kernel_size, conv.stride, conv.dilation)
    grad_rows = upstream.permute(0, 2, 3, 1).reshape(-1, 3)
    # the rows are the layer's patches: A W^T + b is its output
    torch.testing.assert_close(rows @ conv.weight.reshape(3, -1).T + conv.bias, out.permute(0, 2, 3, 1).reshape(-1, 3))
    _, grad, _, _ = _grads(tract(conv, lam=0.1), x, upstream)
    torch.testing.assert_close(grad.reshape(3, -1), _ridge(rows, grad_rows, 0.1), rtol=0, atol=1e-10)


def test_conv1d_gradient_is_the_ridge_solution_on_its_patches():
    torch.manual_seed(0)
    conv = nn.Conv1d(2, 3, 3, stride=2, padding=1).double()
    x = torch.randn(4, 2, 9, dtype=torch.float64)
    upstream = torch.randn_like(conv(x))
    rows = _patches_by_hand(F.pad(x, (1, 1)).unsqueeze(2), (1, 3), (1, 2), (1, 1))
    _, grad, _, _ = _grads(tract(conv, lam=0.1), x, upstream)
    torch.testing.assert_close(grad.reshape(3, -1), _ridge(rows, upstream.transpose(1, 2).reshape(-1, 3), 0.1))
    unbatched = tract(copy.deepcopy(conv), lam=0.1)  # an unbatched [C, L] input is one sample
    _, grad_one, _, _ = _grads(unbatched, x[0], upstream[0])
    rows_one = _patches_by_hand(F.pad(x[:1], (1, 1)).unsqueeze(2), (1, 3), (1, 2), (1, 1))
    torch.testing.assert_close(grad_one.reshape(3, -1), _ridge(rows_one, upstream[0].T, 0.1))


def test_tract_weight_grad_low_precision_solves_in_float32():
    torch.manual_seed(0)
    a, g = torch.randn(32, 6), torch.randn(32, 4)
    want = tract_weight_grad(g, a, 0.1)
    got = tract_weight_grad(g.bfloat16(), a.bfloat16(), 0.1)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=0.05, atol=0.02)


# ---------------------------------------------------------------- forward unchanged, any optimizer, removal


@pytest.mark.parametrize(
    ("layer", "shape"),
    [(nn.Linear(6, 4), (5, 6)), (nn.Conv1d(2, 4, 3, padding=1), (3, 2, 7)), (nn.Conv2d(1, 4, 3), (3, 1, 6, 6))],
)
def test_forward_input_and_bias_gradients_are_the_plain_layers(layer, shape):
    torch.manual_seed(0)
    x = torch.randn(shape)
    upstream = torch.randn_like(layer(x))
    plain = _grads(layer, x, upstream)
    wrapped = tract(copy.deepcopy(layer), lam=0.1)
    got = _grads(wrapped, x, upstream)
    for i in (0, 2, 3):  # output, bias gradient, input gradient
        assert torch.equal(got[i], plain[i])
    assert not torch.allclose(got[1], plain[1])  # the weight gradient is TrAct's
    wrapped.eval()
    with torch.no_grad():
        assert torch.equal(wrapped(x), layer(x))


def test_an_sgd_step_with_the_tract_gradient():
    """Any optimizer uses the replaced gradient: SGD moves the weight by ``-lr * dW'``."""
    torch.manual_seed(0)
    layer = tract(nn.Linear(3, 2), lam=0.1)
    before = layer.weight.detach().clone()
    x, upstream = torch.randn(8, 3), torch.randn(8, 2)
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    (layer(x) * upstream).sum().backward()
    opt.step()
    torch.testing.assert_close(layer.weight.detach(), before - 0.5 * tract_weight_grad(upstream, x, 0.1))


def test_tract_swaps_the_first_layer_in_place_and_remove_tract_undoes_it():
    net = CNN2D(width=4)
    first = net.body[0][0]
    before = net.state_dict(keep_vars=True)
    assert tract(net, lam=0.2) is net and net.body[0][0] is first and type(first) is TrActConv2d
    assert first.lam == 0.2 and "lam=0.2" in repr(first)
    assert sum(isinstance(m, (TrActConv2d, TrActLinear)) for m in net.modules()) == 1  # only the first layer
    after = net.state_dict(keep_vars=True)
    assert list(after) == list(before) and all(after[k] is before[k] for k in before)
    tract(net, lam=0.5)  # again: the layer takes the new lam
    assert first.lam == 0.5 and type(first) is TrActConv2d
    copy.deepcopy(net)
    assert remove_tract(net) is net and type(first) is nn.Conv2d and not hasattr(first, "lam")
    assert net.state_dict(keep_vars=True)["body.0.0.weight"] is before["body.0.0.weight"]
    layer = nn.Linear(3, 2)
    assert tract(layer) is layer and type(layer) is TrActLinear and layer.lam == 0.1
    assert type(tract(MLP(40, 10), layer="head").head) is TrActLinear  # a named layer
    assert type(tract(CNN1D()).body[0][0]) is TrActConv1d


def test_layers_are_constructible_directly():
    assert TrActLinear(3, 2, lam=0.3).lam == 0.3
    conv = TrActConv2d(1, 2, 3, padding="same", lam=0.05)
    assert conv(torch.randn(1, 1, 5, 5)).shape == (1, 2, 5, 5) and conv.groups == 1
    assert TrActConv1d(1, 2, 3, stride=2)(torch.randn(2, 1, 9)).shape == (2, 2, 4)


def test_bad_input():
    with pytest.raises(ValueError, match=r"lam must be a finite number in \(0.0, inf\).*default is 0.1"):
        tract(CNN2D(), lam=0.0)
    with pytest.raises(ValueError, match="lam must be"):
        tract(CNN2D(), lam=float("nan"))
    with pytest.raises(TypeError, match="lam must be a finite number"):
        ApplyTrAct(lam="0.1")
    with pytest.raises(ValueError, match="lam must be"):
        TrActLinear(2, 2, lam=-1.0)
    with pytest.raises(ValueError, match=r"has no submodule 'body.9': .*'body.0.0'"):
        tract(CNN2D(), layer="body.9")
    with pytest.raises(TypeError, match="layer must be the dotted name"):
        tract(CNN2D(), layer=0)
    with pytest.raises(TypeError, match="layer must be the dotted name"):
        ApplyTrAct(layer="")
    with pytest.raises(TypeError, match="not a plain torch.nn.Linear, Conv1d or Conv2d"):
        tract(nn.Sequential(nn.Conv3d(1, 2, 3)))
    with pytest.raises(TypeError, match=r"'0' \(ConvTranspose2d\) is not a plain"):
        tract(nn.Sequential(nn.ConvTranspose2d(1, 2, 3)))
    with pytest.raises(TypeError, match="not a plain"):
        tract(CNN2D(), layer="body.0.1")  # a BatchNorm
    with pytest.raises(ValueError, match="groups=2; TrAct supports groups=1"):
        tract(nn.Conv2d(2, 4, 3, groups=2))
    with pytest.raises(TypeError, match="lazy layer: run one forward pass first"):
        tract(nn.Sequential(nn.LazyLinear(3)))
    with pytest.raises(ValueError, match="no Linear or Conv layer"):
        tract(nn.Sequential(nn.ReLU()))
    with pytest.raises(TypeError, match="layer_or_model must be a torch.nn.Module"):
        tract("net")
    with pytest.raises(TypeError, match="layer_or_model must be a torch.nn.Module"):
        remove_tract(None)


# ---------------------------------------------------------------- real fits (resume and DDP: tests/harness.py)


def _fit(root, model, data, callbacks, max_steps=3):
    trainer = pl.Trainer(
        max_steps=max_steps,
        limit_val_batches=1,
        accelerator="cpu",
        devices=1,
        default_root_dir=root,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    trainer.fit(model, data)
    return trainer


def test_fit_on_digits_cnn2d(tmp_path):
    pl.seed_everything(0, verbose=False)
    model = Classifier(CNN2D(width=4), num_classes=10)
    start = model.backbone.body[0][0].weight.detach().clone()
    trainer = _fit(tmp_path, model, DigitsDataModule(as_image=True, batch_size=64), [ApplyTrAct(lam=0.1)])
    first = model.backbone.body[0][0]
    assert type(first) is TrActConv2d and trainer.global_step == 3
    assert not torch.equal(first.weight, start) and math.isfinite(float(trainer.callback_metrics["train/loss"]))


def test_fit_on_mnist1d_cnn1d_with_a_named_layer(tmp_path):
    pl.seed_everything(0, verbose=False)
    model = Classifier(CNN1D(10, channels=8), num_classes=10)
    data = MNIST1DDataModule(num_samples=200, batch_size=50)
    trainer = _fit(tmp_path, model, data, [ApplyTrAct(lam=0.1, layer="backbone.body.0.0")])
    assert type(model.backbone.body[0][0]) is TrActConv1d and trainer.global_step == 3
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
