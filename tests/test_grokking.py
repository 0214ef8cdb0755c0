import json
import os
import subprocess
import sys

import lightning.pytorch as pl
import pytest
import torch
from conftest import ROOT
from torch import nn

from lit_tricks import Classifier
from lit_tricks.data.modular import ModularArithmeticDataModule, modular_table
from lit_tricks.nets import MLP
from lit_tricks.nets.output_scale import OutputScale, lazy_rich_lr


def _pairs(inputs, p):
    """Decode one-hot rows [N, 2p] back into (a, b) pairs."""
    return torch.stack([inputs[:, :p].argmax(-1), inputs[:, p:].argmax(-1)], dim=-1)


@pytest.mark.parametrize(
    ("operation", "rule"),
    [("add", lambda a, b: a + b), ("sub", lambda a, b: a - b), ("mul", lambda a, b: a * b)],
)
def test_table_counts_and_labels(operation, rule):
    pairs, c = modular_table(5, operation)
    assert pairs.shape == (25, 2) and len(set(map(tuple, pairs.tolist()))) == 25
    assert c.tolist() == [rule(a, b) % 5 for a, b in pairs.tolist()]
    assert modular_table(5, "add")[1][:6].tolist() == [0, 1, 2, 3, 4, 1]  # (0,0..4) then (1,0)


def test_division_inverts_multiplication():
    pairs, c = modular_table(7, "div")
    assert len(c) == 42 and (pairs[:, 1] != 0).all()
    assert ((c * pairs[:, 1]) % 7 == pairs[:, 0]).all()  # c = a / b  <=>  c b = a (mod 7)
    assert c[pairs.tolist().index([1, 3])] == 5  # 3 * 5 = 15 = 1 (mod 7)


def test_split_is_disjoint_complete_and_seeded():
    dm = ModularArithmeticDataModule(p=11, train_fraction=0.4, seed=3)
    dm.setup()
    train, held = _pairs(dm.train_set.inputs, 11), _pairs(dm.val_set.inputs, 11)
    assert len(train) == int(0.4 * 121) == 48 and len(held) == 73
    assert dm.val_set is dm.test_set  # validation = the held-out pairs
    seen = set(map(tuple, train.tolist()))
    assert not seen & set(map(tuple, held.tolist())) and len(seen | set(map(tuple, held.tolist()))) == 121
    assert (dm.train_set.targets == train.sum(-1) % 11).all() and (dm.val_set.targets == held.sum(-1) % 11).all()
    assert dm.train_set.inputs.shape == (48, 22) and (dm.train_set.inputs.sum(-1) == 2).all()
    again = ModularArithmeticDataModule(p=11, train_fraction=0.4, seed=3)
    again.setup()
    other = ModularArithmeticDataModule(p=11, train_fraction=0.4, seed=4)
    other.setup()
    assert torch.equal(again.train_set.inputs, dm.train_set.inputs)
    assert not torch.equal(other.train_set.inputs, dm.train_set.inputs)


def test_tokens_full_batch_and_validation_carve():
    dm = ModularArithmeticDataModule(p=7, inputs="tokens", batch_size=None, seed=0)
    dm.setup()
    assert dm.num_classes == 7 and dm.input_shape == (2,) and dm.batch_size == len(dm.train_set) == 19
    batch = next(iter(dm.train_dataloader()))
    assert batch["inputs"].dtype == torch.long and batch["inputs"].shape == (19, 2)
    assert (batch["targets"] == batch["inputs"].sum(-1) % 7).all() and sorted(batch["index"].tolist()) == list(
        range(19)
    )
    carved = ModularArithmeticDataModule(p=7, batch_size=4, val_fraction=0.25)
    carved.setup()
    assert len(carved.val_set) == 5 and len(carved.train_set) == 14 and carved.val_set is not carved.test_set


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"p": 1}, ValueError, "p must be"),
        ({"p": 7.0}, TypeError, "p must be an integer"),
        ({"train_fraction": 0.0}, ValueError, "train_fraction"),
        ({"train_fraction": 1.0}, ValueError, "train_fraction"),
        ({"train_fraction": 1.5}, ValueError, "train_fraction"),
        ({"inputs": "bits"}, ValueError, "inputs must be"),
        ({"operation": "pow"}, ValueError, "operation must be"),
        ({"operation": "div", "p": 9}, ValueError, "prime p"),
        ({"batch_size": 0}, ValueError, "batch_size"),
    ],
)
def test_data_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        ModularArithmeticDataModule(**kwargs)


def test_empty_split_is_refused_at_setup():
    dm = ModularArithmeticDataModule(p=2, train_fraction=0.1)
    with pytest.raises(ValueError, match="empty split"):
        dm.setup()


def _net(seed=0):
    torch.manual_seed(seed)
    return MLP(6, 3, hidden=(8,))


def test_output_scale_centred_uncentred_and_state():
    x = torch.randn(5, 6)
    scaled = OutputScale(_net(), alpha=3.0)
    assert torch.equal(scaled(x), torch.zeros(5, 3))  # centred: exactly 0 at initialisation
    reference = _net()
    torch.testing.assert_close(OutputScale(reference, 3.0, center=False)(x), 3.0 * reference(x))
    with torch.no_grad():
        scaled.net.head.bias.add_(torch.tensor([1.0, -2.0, 0.5]))
    torch.testing.assert_close(scaled(x), 3.0 * torch.tensor([1.0, -2.0, 0.5]).expand(5, 3))
    # the initial copy is state (buffers), not parameters: the optimizer never sees it, a checkpoint restores it
    assert len(list(scaled.parameters())) == 4 and "initial.head.bias" in scaled.state_dict()
    restored = OutputScale(_net(seed=1), alpha=3.0)
    restored.load_state_dict(scaled.state_dict())
    torch.testing.assert_close(restored(x), scaled(x))


def test_output_scale_gradient_is_alpha_times_the_nets():
    x = torch.randn(5, 6)
    plain, scaled = _net(), OutputScale(_net(), alpha=4.0)
    weights = torch.randn(5, 3)
    (plain(x) * weights).sum().backward()
    (scaled(x) * weights).sum().backward()
    for a, b in zip(plain.parameters(), scaled.net.parameters(), strict=True):
        torch.testing.assert_close(b.grad, 4.0 * a.grad)
    assert all(buffer.grad is None for buffer in scaled.initial.buffers())


def test_lazy_rich_lr_keeps_the_output_step_and_shrinks_the_weight_step():
    assert lazy_rich_lr(0.1, 2.0) == pytest.approx(0.025) and lazy_rich_lr(0.1, 0.5) == pytest.approx(0.4)
    # one GD step on a linear net, MSE to y = 1 from f = 0: the output moves by lr0 |x|^2 whatever alpha,
    # the weights by lr0 |x| / alpha
    x = torch.tensor([[1.0, 2.0]])
    for alpha in (0.5, 1.0, 8.0):
        net = nn.Linear(2, 1, bias=False)
        model = OutputScale(net, alpha)
        start = net.weight.detach().clone()
        optimizer = torch.optim.SGD(model.parameters(), lr=lazy_rich_lr(0.01, alpha))
        (0.5 * (model(x) - 1.0).square().sum()).backward()
        optimizer.step()
        torch.testing.assert_close(model(x), torch.tensor([[0.01 * 5.0]]))
        torch.testing.assert_close((net.weight - start).norm(), torch.tensor(0.01 * 5**0.5 / alpha))


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("nan"), float("inf")])
def test_alpha_must_be_positive(alpha):
    with pytest.raises(ValueError, match="alpha must be"):
        OutputScale(_net(), alpha)
    with pytest.raises(ValueError, match="alpha must be"):
        lazy_rich_lr(0.1, alpha)


def test_output_scale_bad_types():
    with pytest.raises(TypeError, match="net must be"):
        OutputScale(lambda x: x, 1.0)
    with pytest.raises(TypeError, match="center must be a bool"):
        OutputScale(_net(), 1.0, center=1)
    with pytest.raises(ValueError, match="base_lr"):
        lazy_rich_lr(0.0, 1.0)


def test_tiny_fit_with_output_scale_and_stablemax():
    pl.seed_everything(0, verbose=False)
    data = ModularArithmeticDataModule(p=7, train_fraction=0.5, seed=0)
    model = Classifier(
        OutputScale(MLP(14, 7, hidden=(32,)), alpha=0.5),
        num_classes=7,
        loss="stablemax",
        optimizer=lambda params: torch.optim.AdamW(params, lr=lazy_rich_lr(0.01, 0.5)),
    )
    before = [p.detach().clone() for p in model.backbone.initial.buffers()]
    trainer = pl.Trainer(
        max_steps=5,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(model, data)
    assert trainer.global_step == 5 and "val/acc" in trainer.callback_metrics
    assert all(torch.equal(a, b) for a, b in zip(before, model.backbone.initial.buffers(), strict=True))
    assert trainer.callback_metrics["train/acc"] > 0.2  # 24 training pairs, 5 full-batch steps


def test_benchmark_quick(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    script = ROOT / "benchmarks" / "grokking.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--quick", "--out", str(tmp_path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "| StableMax + ⊥Grad, no wd |" in proc.stdout
    runs = json.loads((tmp_path / "grokking_quick.json").read_text())["runs"]
    assert len(runs) == 9 and all(r["curve"][0][0] == 0 for r in runs)
