"""Model transforms (lit_tricks.layers): Ghost BatchNorm and multi-sample dropout, their math on hand-checkable
tensors, their setup callbacks in a real fit, and bit-exact resume."""

import copy
import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from conftest import PlainModule
from torch import nn

from harness import assert_same
from lit_tricks import Classifier, StepOutput, TrickBatch
from lit_tricks.callbacks.ghost_batch_norm import ApplyGhostBatchNorm
from lit_tricks.callbacks.multi_sample_dropout import ApplyMultiSampleDropout
from lit_tricks.data import DigitsDataModule
from lit_tricks.layers import (
    GhostBatchNorm,
    MultiSampleDropout,
    ghost_batch_norm,
    multi_sample_dropout,
    multi_sample_loss,
)
from lit_tricks.nets import CNN2D, MLP


def _random_bn(kind, channels, momentum=0.1):
    bn = kind(channels, momentum=momentum)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.num_batches_tracked.fill_(3)
    return bn


def _forward_backward(bn, x, upstream):
    x = x.detach().clone().requires_grad_()
    y = bn(x)
    (y * upstream).sum().backward()
    return y.detach(), x.grad, bn.weight.grad, bn.bias.grad


# ---------------------------------------------------------------- Ghost BatchNorm


@pytest.mark.parametrize(
    ("kind", "shape"),
    [
        (nn.BatchNorm1d, (8, 3)),
        (nn.BatchNorm1d, (5, 3, 4)),
        (nn.BatchNorm2d, (8, 3, 2, 2)),
        (nn.BatchNorm3d, (6, 2, 2, 1, 3)),
    ],
)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_a_batch_of_one_chunk_is_plain_batch_norm_exactly(kind, shape, momentum):
    torch.manual_seed(0)
    plain = _random_bn(kind, shape[1], momentum)
    ghost = GhostBatchNorm.from_batch_norm(copy.deepcopy(plain), virtual_batch_size=shape[0])
    x, upstream = torch.randn(shape), torch.randn(shape)
    for got, want in zip(_forward_backward(ghost, x, upstream), _forward_backward(plain, x, upstream), strict=True):
        assert torch.equal(got, want)
    assert_same(ghost.state_dict(), plain.state_dict())


def test_chunk_statistics_by_hand():
    ghost = GhostBatchNorm(1, virtual_batch_size=2, eps=1e-12, momentum=0.5)
    out = ghost(torch.tensor([[1.0], [3.0], [10.0], [14.0]]))
    # chunks {1, 3}: mean 2, var 1 (unbiased 2); {10, 14}: mean 12, var 4 (unbiased 8)
    assert torch.equal(out.flatten(), torch.tensor([-1.0, 1.0, -1.0, 1.0]))
    # once per chunk, in order, momentum 0.5: mean 0 -> 1 -> 6.5; var 1 -> 1.5 -> 4.75
    assert torch.equal(ghost.running_mean, torch.tensor([6.5]))
    assert torch.equal(ghost.running_var, torch.tensor([4.75]))
    assert int(ghost.num_batches_tracked) == 2


def test_a_short_last_chunk_has_its_own_statistics():
    ghost = GhostBatchNorm(1, virtual_batch_size=2, eps=1e-12, momentum=1.0)
    x = torch.tensor([1.0, 3.0, 1.0, 3.0, 5.0, 7.0]).view(3, 1, 2)  # chunks: samples {0, 1} and {2}
    assert torch.equal(ghost(x).flatten(), torch.tensor([-1.0, 1.0, -1.0, 1.0, -1.0, 1.0]))
    # momentum 1: the running statistics are the last chunk's, mean 6 and unbiased var 2
    assert torch.equal(ghost.running_mean, torch.tensor([6.0])) and torch.equal(ghost.running_var, torch.tensor([2.0]))


def test_a_lone_last_value_joins_the_chunk_before_it():
    torch.manual_seed(0)
    plain = _random_bn(nn.BatchNorm1d, 3)
    ghost = GhostBatchNorm.from_batch_norm(copy.deepcopy(plain), virtual_batch_size=2)
    x = torch.randn(5, 3)  # chunks {0, 1} and {2, 3, 4}: a chunk {4} would have no variance
    want = torch.cat([plain(x[:2]), plain(x[2:])])
    torch.testing.assert_close(ghost(x), want, rtol=0, atol=1e-6)
    torch.testing.assert_close(ghost.running_var, plain.running_var, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("shape", "virtual"), [((10, 3, 4, 4), 4), ((14, 5), 4), ((64, 4, 3), 16)])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_equals_plain_batch_norm_run_on_each_chunk_in_turn(shape, virtual, momentum):
    """The authors' code (eladhoffer/bigBatch main_gbn.py) runs the model on each chunk: same outputs, running
    statistics (updated once per chunk), counter and gradients."""
    torch.manual_seed(1)
    kind = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d}[len(shape)]
    plain = _random_bn(kind, shape[1], momentum)
    ghost = GhostBatchNorm.from_batch_norm(copy.deepcopy(plain), virtual)
    x, upstream = torch.randn(shape), torch.randn(shape)
    got = _forward_backward(ghost, x, upstream)
    x_ref = x.clone().requires_grad_()
    y_ref = torch.cat([plain(chunk) for chunk in x_ref.split(virtual)])
    (y_ref * upstream).sum().backward()
    for a, b in zip(got, (y_ref, x_ref.grad, plain.weight.grad, plain.bias.grad), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(ghost, name), getattr(plain, name), rtol=1e-6, atol=1e-6)
    assert int(ghost.num_batches_tracked) == int(plain.num_batches_tracked) == 3 + math.ceil(shape[0] / virtual)


def test_a_network_step_equals_the_authors_chunk_loop():
    """eladhoffer/bigBatch main_gbn.py: forward and backward each chunk, then divide the gradients by the number
    of chunks. One step of the ghost network on the whole batch gives the same gradients and buffers."""
    torch.manual_seed(0)
    reference = CNN2D(width=4)
    ghost = ghost_batch_norm(copy.deepcopy(reference), 8)
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    for chunk_x, chunk_y in zip(x.chunk(4), y.chunk(4), strict=True):
        F.cross_entropy(reference(chunk_x), chunk_y).backward()
    F.cross_entropy(ghost(x), y).backward()
    for a, b in zip(reference.parameters(), ghost.parameters(), strict=True):
        torch.testing.assert_close(a.grad / 4, b.grad, rtol=1e-4, atol=1e-6)
    for (name, a), b in zip(reference.state_dict().items(), ghost.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_eval_mode_uses_the_running_statistics_unchanged():
    torch.manual_seed(0)
    plain = _random_bn(nn.BatchNorm2d, 3).eval()
    ghost = GhostBatchNorm.from_batch_norm(copy.deepcopy(plain), virtual_batch_size=2).eval()
    x = torch.randn(7, 3, 2, 2)
    assert torch.equal(ghost(x), plain(x))
    assert int(ghost.num_batches_tracked) == 3


def test_low_precision_input_keeps_its_dtype():
    ghost = GhostBatchNorm(3, virtual_batch_size=4)
    out = ghost(torch.randn(10, 3, 2, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and ghost.running_mean.dtype == torch.float32


def test_ghost_batch_norm_swaps_in_place_and_keeps_the_tensors():
    net = CNN2D(width=4)
    before = net.state_dict(keep_vars=True)
    assert ghost_batch_norm(net, 16) is net
    ghosts = [m for m in net.modules() if isinstance(m, GhostBatchNorm)]
    assert len(ghosts) == 4 and not any(type(m) is nn.BatchNorm2d for m in net.modules())
    after = net.state_dict(keep_vars=True)
    assert list(after) == list(before) and all(after[k] is before[k] for k in before)
    CNN2D(width=4).load_state_dict(net.state_dict())  # checkpoints load both ways
    net.load_state_dict(CNN2D(width=4).state_dict())
    ghost_batch_norm(net, 8)  # again: the ghost layers take the new size
    assert {m.virtual_batch_size for m in ghosts} == {8}
    assert "virtual_batch_size=8" in repr(net)


def test_ghost_batch_norm_bad_input():
    with pytest.raises(ValueError, match="no BatchNorm1d/2d/3d layer"):
        ghost_batch_norm(MLP(64, 10), 32)
    with pytest.raises(ValueError, match="virtual_batch_size must be an integer in \\[1"):
        ghost_batch_norm(CNN2D(), 0)
    with pytest.raises(TypeError, match="virtual_batch_size must be an integer"):
        ghost_batch_norm(CNN2D(), 16.0)
    with pytest.raises(TypeError, match="SyncBatchNorm"):
        ghost_batch_norm(nn.Sequential(nn.SyncBatchNorm(3)), 16)
    with pytest.raises(TypeError, match="materialise lazy layers"):
        ghost_batch_norm(nn.Sequential(nn.LazyBatchNorm1d()), 16)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        ghost_batch_norm("net", 16)
    with pytest.raises(ValueError, match="virtual_batch_size must be an integer in \\[1"):
        ApplyGhostBatchNorm(virtual_batch_size=-1)
    with pytest.raises(ValueError, match="if_missing must be"):
        ApplyGhostBatchNorm(if_missing="ignore")


# ---------------------------------------------------------------- multi-sample dropout


def test_multi_sample_dropout_draws_k_masks_through_the_shared_head():
    torch.manual_seed(0)
    head = nn.Linear(6, 6, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.eye(6))  # z_k = m_k * h / (1 - p): every entry 0 or h / (1 - p)
    layer = MultiSampleDropout(head, p=0.5, samples=4)
    h = torch.rand(5, 6) + 1.0
    out = layer(h)
    z = layer.sample_logits
    assert z.shape == (4, 5, 6)
    assert bool(((z == 0) | torch.isclose(z, 2 * h)).all())
    assert len({tuple(mask.flatten().tolist()) for mask in (z != 0)}) == 4  # four different masks
    torch.testing.assert_close(out, z.mean(dim=0))
    layer.eval()
    assert torch.equal(layer(h), h) and layer.sample_logits is None  # eval: one pass, no dropout


def test_multi_sample_dropout_equals_k_dropout_head_calls_in_a_loop():
    """The K samples in one batched call draw the same masks as K calls of dropout then head (what the
    re-implementations rahowa/multisample_dropout_pytorch and drzqb/Multi-Sample-Dropout loop over)."""
    head = nn.Linear(32, 10)
    h = torch.randn(16, 32)
    torch.manual_seed(1)
    layer = MultiSampleDropout(head, p=0.5, samples=8)
    out = layer(h)
    torch.manual_seed(1)
    loop = torch.stack([head(F.dropout(h, 0.5, training=True)) for _ in range(8)])
    torch.testing.assert_close(layer.sample_logits, loop, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out, loop.mean(dim=0), rtol=1e-6, atol=1e-6)


def test_multi_sample_loss_by_hand():
    z = torch.tensor([[[0.0, 0.0]], [[math.log(3.0), 0.0]]])  # K=2, N=1: p(class 0) = 1/2, then 3/4
    want = (math.log(2.0) + math.log(4.0 / 3.0)) / 2
    hard = multi_sample_loss(z, torch.tensor([0]), lambda logits, y: F.cross_entropy(logits, y, reduction="none"))
    soft = multi_sample_loss(z, torch.tensor([[1.0, 0.0]]), lambda logits, y: -(y * logits.log_softmax(-1)).sum(-1))
    torch.testing.assert_close(hard, torch.tensor([want]))
    torch.testing.assert_close(soft, torch.tensor([want]))
    with pytest.raises(ValueError, match="targets have 2"):
        multi_sample_loss(z, torch.tensor([0, 1]), F.cross_entropy)


def test_the_trick_averages_the_k_losses_per_sample():
    torch.manual_seed(0)
    model = Classifier(MLP(64, 10, hidden=[16]), num_classes=10)
    trick = ApplyMultiSampleDropout(p=0.3, samples=3)
    trick.setup(None, model, "fit")
    x, y = torch.randn(4, 64), torch.tensor([0, 1, 2, 3])
    logits = model(x)
    z = model.backbone.head.sample_logits
    want = torch.stack([F.cross_entropy(z_k, y, reduction="none") for z_k in z]).mean(dim=0)
    out = trick.after_loss(None, model, TrickBatch(x, y), StepOutput(logits, None, model.per_sample_loss(logits, y)))
    torch.testing.assert_close(out.per_sample_loss, want)
    assert out.per_sample_loss.shape == (4,) and model.backbone.head.sample_logits is None
    with pytest.raises(RuntimeError, match="was not called in training mode"):
        trick.after_loss(None, model, TrickBatch(x, y), out)


def test_multi_sample_dropout_wraps_once_and_bad_input():
    net = multi_sample_dropout(MLP(64, 10), p=0.5, samples=8)
    assert isinstance(net.head, MultiSampleDropout) and isinstance(net.head.head, nn.Linear)
    multi_sample_dropout(net, p=0.2, samples=2)
    assert (net.head.p, net.head.samples) == (0.2, 2) and isinstance(net.head.head, nn.Linear)
    with pytest.raises(ValueError, match="has no submodule 'classifier'"):
        multi_sample_dropout(MLP(64, 10), head="classifier")
    with pytest.raises(ValueError, match="p must be a finite number in \\[0.0, 1.0\\)"):
        MultiSampleDropout(nn.Linear(2, 2), p=1.0)
    with pytest.raises(ValueError, match="samples must be an integer in \\[1"):
        ApplyMultiSampleDropout(samples=0)
    with pytest.raises(TypeError, match="head must be a torch.nn.Module"):
        MultiSampleDropout("linear")
    with pytest.raises(TypeError, match="must subclass lit_tricks.TrickModule"):
        ApplyMultiSampleDropout().setup(None, PlainModule(), "fit")


# ---------------------------------------------------------------- real fits (resume and DDP: tests/harness.py)


def _fit(root, callbacks, max_steps):
    pl.seed_everything(0, verbose=False)
    model = Classifier(CNN2D(width=4), num_classes=10)
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
    trainer.fit(model, DigitsDataModule(as_image=True, batch_size=64))
    return model, trainer


def test_ghost_batch_norm_fit_on_digits_cnn(tmp_path):
    model, trainer = _fit(tmp_path, [ApplyGhostBatchNorm(virtual_batch_size=16)], max_steps=3)
    ghosts = [m for m in model.modules() if isinstance(m, GhostBatchNorm)]
    assert len(ghosts) == 4 and trainer.global_step == 3
    assert {int(m.num_batches_tracked) for m in ghosts} == {3 * 4}  # 3 batches of 64 = 4 chunks each
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))


def test_multi_sample_dropout_fit_on_digits_cnn(tmp_path):
    model, trainer = _fit(tmp_path, [ApplyMultiSampleDropout(p=0.5, samples=4)], max_steps=3)
    assert isinstance(model.backbone.head, MultiSampleDropout) and trainer.global_step == 3
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
