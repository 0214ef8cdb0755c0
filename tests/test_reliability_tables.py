"""Reliability of the per-sample tables (PS-KD, ELR), the EMA and replay: non-finite values, soft targets, table
sizes and dtypes, uneven DDP batches, damaged checkpoints (issue #22)."""

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset, random_split

from lit_tricks import ELR, Classifier, CutMix, EMATeacher, Mixup, SampleReweighting, SelfDistill, Trick
from lit_tricks.core.checkpoint import load_checkpoint
from lit_tricks.core.sample_table import SampleTable, index_range
from lit_tricks.data import ArrayDataset, DigitsDataModule, IndexedDataset
from lit_tricks.functional.ema import ema_update_finite_, lerp_where_
from lit_tricks.nets import MLP

NAN = float("nan")


def _loader(inputs, targets, batch_size=8, **extras):
    return DataLoader(ArrayDataset(inputs, targets, **extras), batch_size=batch_size)


def _trainer(callbacks, quiet_trainer_kwargs, **kwargs):
    kwargs.setdefault("limit_val_batches", 0)
    return pl.Trainer(callbacks=callbacks, log_every_n_steps=1, **quiet_trainer_kwargs, **kwargs)


# ---------------------------------------------------------------- non-finite values never enter a memory
def test_table_skips_and_counts_rows_that_are_not_finite():
    table = SampleTable()
    trainer = SimpleNamespace(train_dataloader=SimpleNamespace(dataset=range(5)), world_size=1)
    module = SimpleNamespace(num_classes=2, device=torch.device("cpu"), trainer=trainer)
    table.allocate(trainer, module, owner="test")
    rows = torch.tensor([[0.25, 0.75], [NAN, 0.5], [float("inf"), 0.0]])
    table.write(module, torch.tensor([0, 1, 2]), rows)
    assert table.values.tolist() == [[0.25, 0.75], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]
    assert table.seen.tolist() == [True, False, False, False, False] and int(table.nonfinite) == 2
    assert table.read(torch.tensor([0, 1])).tolist() == [[0.25, 0.75], [0.0, 0.0]]
    assert table.read(torch.tensor([0, 1]), default=-1.0).tolist() == [[0.25, 0.75], [-1.0, -1.0]]


def test_table_default_follows_the_seen_flags_after_all_rows_were_written_and_after_a_reload():
    table = SampleTable()
    trainer = SimpleNamespace(train_dataloader=SimpleNamespace(dataset=range(3)), world_size=1)
    module = SimpleNamespace(num_classes=1, device=torch.device("cpu"), trainer=trainer)
    table.allocate(trainer, module, owner="test")
    table.write(module, torch.tensor([0]), torch.ones(1, 1))
    partial = {key: value.clone() for key, value in table.state_dict().items()}
    table.write(module, torch.tensor([1, 2]), torch.full((2, 1), 2.0))
    everything = torch.tensor([0, 1, 2])
    for _ in range(2):  # the first read finds every row written, the second skips the flags
        assert table.read(everything, default=-1.0).flatten().tolist() == [1.0, 2.0, 2.0]
    table.load_state_dict(partial)  # a checkpoint from before rows 1 and 2 were written
    assert table.read(everything, default=-1.0).flatten().tolist() == [1.0, -1.0, -1.0]


def test_ema_update_is_skipped_when_a_value_is_not_finite():
    averages = [torch.tensor([1.0, 2.0]), torch.tensor([0.0])]
    finite = ema_update_finite_(averages, [torch.tensor([3.0, 2.0]), torch.tensor([4.0])], decay=0.75)
    assert bool(finite) and averages[0].tolist() == [1.5, 2.0] and averages[1].tolist() == [1.0]
    finite = ema_update_finite_(averages, [torch.tensor([3.0, 2.0]), torch.tensor([NAN])], decay=0.75)
    assert not bool(finite) and averages[0].tolist() == [1.5, 2.0] and averages[1].tolist() == [1.0]


def test_lerp_where_is_the_update_or_an_exact_no_op():  # the accelerator path, decided on the device
    averages, values = [torch.tensor([1.0, 2.0])], [torch.tensor([3.0, 2.0])]
    lerp_where_(averages, values, 0.75, torch.tensor(True))
    assert averages[0].tolist() == [1.5, 2.0]
    for bad in (NAN, float("inf"), -float("inf")):
        lerp_where_(averages, [torch.tensor([bad, 5.0])], 0.75, torch.tensor(False))
        assert averages[0].tolist() == [1.5, 2.0]


def test_one_nan_sample_poisons_no_memory(quiet_trainer_kwargs):
    pl.seed_everything(0, verbose=False)
    inputs, targets = torch.randn(32, 64), torch.arange(32) % 10
    inputs[3] = NAN  # one bad sample in the first batch: its loss, then every weight, becomes NaN
    ema, pskd, elr = EMATeacher(decay=0.9), SelfDistill(total_epochs=1), ELR()
    trainer = _trainer([ema, pskd, elr], quiet_trainer_kwargs, max_steps=3)
    trainer.fit(Classifier(MLP(64, 10, hidden=(16,)), num_classes=10), _loader(inputs, targets))
    for table in (pskd.table, elr.targets):
        assert torch.isfinite(table.values).all()
        assert table.seen[:8].tolist() == [True, True, True, False, True, True, True, True]
        assert int(table.nonfinite) == 1 + 8 + 8  # the bad sample, then the whole of two NaN batches
    assert all(torch.isfinite(value).all() for value in ema.state_dict()["ema"].values())
    assert int(ema.nonfinite) == 3  # the weights are NaN after every step: no update was taken
    metrics = trainer.callback_metrics
    assert metrics["tricks/ELR/nonfinite"] == 17 and metrics["tricks/SelfDistill/nonfinite"] == 17
    assert metrics["tricks/EMATeacher/nonfinite"] == 3


def test_unguarded_ema_takes_the_bare_update(quiet_trainer_kwargs):
    """skip_nonfinite=False is the bare fused update: fast, and NaN weights reach the average."""
    inputs, targets = torch.randn(32, 64), torch.arange(32) % 10
    inputs[3] = NAN
    ema = EMATeacher(decay=0.9, skip_nonfinite=False)
    trainer = _trainer([ema], quiet_trainer_kwargs, max_steps=2)
    trainer.fit(Classifier(MLP(64, 10, hidden=(16,)), num_classes=10), _loader(inputs, targets))
    assert not all(torch.isfinite(value).all() for value in ema.state_dict()["ema"].values())
    assert int(ema.nonfinite) == 0


# ---------------------------------------------------------------- PS-KD keeps probability targets
class TargetSpy(Trick):
    order = 5

    def __init__(self):
        self.records = []

    def before_forward(self, trainer, module, batch):
        self.records.append((trainer.current_epoch, batch.index.clone(), batch.targets.clone()))
        return batch

    def after_loss(self, trainer, module, batch, out):
        self.records[-1] += (out.logits.detach().softmax(dim=-1),)
        return out


def test_pskd_blends_probability_targets(quiet_trainer_kwargs):
    pl.seed_everything(0, verbose=False)
    soft = torch.full((16, 4), 0.1)
    soft[torch.arange(16), torch.arange(16) % 4] = 0.7
    pskd, spy = SelfDistill(alpha_T=0.8, total_epochs=2), TargetSpy()
    trainer = _trainer([pskd, spy], quiet_trainer_kwargs, max_epochs=2)
    trainer.fit(Classifier(MLP(8, 4), num_classes=4), _loader(torch.randn(16, 8), soft))
    (_, index0, targets0, probs0), _, (epoch, index1, targets1, _), _ = spy.records
    torch.testing.assert_close(targets0, soft[index0])  # epoch 0: the given probabilities, not one-hot
    assert epoch == 1 and torch.equal(index0, index1)
    torch.testing.assert_close(targets1, 0.2 * soft[index1] + 0.8 * probs0)  # alpha_1 = 0.8 * 2 / 2


# ---------------------------------------------------------------- a second view with Mixup is refused
@pytest.mark.parametrize("mixing", [Mixup(alpha=0.4), CutMix()])
def test_ema_distillation_of_another_view_refuses_mixup(mixing, quiet_trainer_kwargs):
    tricks = [EMATeacher(), SelfDistill("ema", view_key="weak"), mixing]
    with pytest.raises(ValueError, match=r"view_key='weak'.*mixes batch\['inputs'\] but not batch\['weak'\]"):
        _trainer(tricks, quiet_trainer_kwargs, max_steps=1).fit(Classifier(MLP(64, 10), 10), DigitsDataModule())


# ---------------------------------------------------------------- the teacher keeps frozen layers frozen
def test_teacher_restores_each_layers_own_mode(quiet_trainer_kwargs):
    model = Classifier(MLP(64, 10, hidden=(16,), dropout=0.5), num_classes=10)
    ema = EMATeacher(decay=0.9)
    _trainer([ema], quiet_trainer_kwargs, max_steps=1).fit(model, DigitsDataModule())
    model.train()
    frozen = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)][0].eval()
    ema.teacher(torch.randn(2, 64))
    assert model.training and not frozen.training


# ---------------------------------------------------------------- table dtype and device
def test_float16_table_when_resuming_from_a_float32_checkpoint(tmp_path, quiet_trainer_kwargs):
    data = DigitsDataModule(batch_size=64)
    first = SelfDistill(total_epochs=2)
    trainer = _trainer([first], quiet_trainer_kwargs, max_epochs=1, limit_train_batches=2)
    trainer.fit(Classifier(MLP(64, 10), num_classes=10), data)
    trainer.save_checkpoint(tmp_path / "fp32.ckpt")
    assert first.table.values.dtype == torch.float32
    for resumed in (SelfDistill(total_epochs=2, table_dtype="float16"), ELR(table_dtype="float16")):
        if isinstance(resumed, ELR):  # an ELR table of its own, float32 in the checkpoint
            run = _trainer([ELR()], quiet_trainer_kwargs, max_epochs=1, limit_train_batches=2)
            run.fit(Classifier(MLP(64, 10), num_classes=10), data)
            run.save_checkpoint(tmp_path / "fp32.ckpt")
        trainer = _trainer([resumed], quiet_trainer_kwargs, max_epochs=2, limit_train_batches=2)
        trainer.fit(Classifier(MLP(64, 10), num_classes=10), data, ckpt_path=tmp_path / "fp32.ckpt")
        table = resumed.table if isinstance(resumed, SelfDistill) else resumed.targets
        assert table.values.dtype == torch.float16 and bool(table.seen.any())


def test_cpu_table_and_bad_table_options(quiet_trainer_kwargs):
    elr = ELR(table_device="cpu")
    _trainer([elr], quiet_trainer_kwargs, max_steps=2).fit(Classifier(MLP(64, 10), 10), DigitsDataModule())
    assert elr.targets.values.device.type == "cpu" and int(elr.targets.seen.sum()) == 128
    for kwargs, match in [
        ({"table_device": "cuda"}, "table_device must be 'module'"),
        ({"table_dtype": "bfloat16"}, "table_dtype must be"),
        ({"num_samples": 0}, "num_samples must be a positive integer"),
    ]:
        for part in (ELR, SelfDistill):
            with pytest.raises(ValueError, match=match):
                part(**kwargs)


# ---------------------------------------------------------------- tables span the index range
def test_tables_are_sized_by_the_index_range(quiet_trainer_kwargs):
    full = IndexedDataset(TensorDataset(torch.randn(40, 8), torch.arange(40) % 3))
    train, _ = random_split(full, [30, 10], generator=torch.Generator().manual_seed(0))
    assert index_range(train) == 40 and index_range(full) == 40
    elr, pskd = ELR(), SelfDistill(total_epochs=1)
    trainer = _trainer([elr, pskd], quiet_trainer_kwargs, max_epochs=1)
    trainer.fit(Classifier(MLP(8, 3), num_classes=3), DataLoader(train, batch_size=10))
    assert elr.targets.values.shape == (40, 3) and sorted(elr.targets.seen.nonzero().flatten()) == sorted(train.indices)
    assert int(pskd.table.seen.sum()) == 30


def test_an_index_outside_the_table_is_a_clear_error(quiet_trainer_kwargs):
    loader = DataLoader(TensorDataset(torch.randn(16, 8), torch.arange(16) % 3, torch.arange(16) + 100), batch_size=8)
    with pytest.raises(ValueError, match=r"index outside \[0, 16\).*pass num_samples=.*\[100, 107\]"):
        _trainer([ELR()], quiet_trainer_kwargs, max_steps=1).fit(Classifier(MLP(8, 3), 3), loader)
    elr = ELR(num_samples=116)
    _trainer([elr], quiet_trainer_kwargs, max_steps=2).fit(Classifier(MLP(8, 3), 3), loader)
    assert elr.targets.values.shape == (116, 3) and int(elr.targets.seen[100:].sum()) == 16


@pytest.mark.parametrize("bad", [[-1, 0], [0, 3]])
def test_reads_and_writes_outside_the_table_are_clear_errors(bad):
    table = SampleTable()
    trainer = SimpleNamespace(train_dataloader=SimpleNamespace(dataset=range(3)), world_size=1)
    module = SimpleNamespace(num_classes=2, device=torch.device("cpu"), trainer=trainer)
    table.allocate(trainer, module, owner="test")
    expected = rf"index outside \[0, 3\).*Got indices in \[{min(bad)}, {max(bad)}\]"
    with pytest.raises(ValueError, match=expected):
        table.read(torch.tensor(bad))
    for rows in (torch.ones(2, 2), torch.tensor([[1.0, NAN], [1.0, 1.0]])):  # the finite and the guarded path
        with pytest.raises(ValueError, match=expected):
            table.write(module, torch.tensor(bad), rows)
    assert not table.seen.any()  # no row counts as written


# ---------------------------------------------------------------- uneven batches under DDP
def test_uneven_rank_local_shards_under_ddp(tmp_path):
    """Rank 0 holds indices 0-19 and rank 1 20-35 of 40, batches of 12: last batches of 8 and 4 samples."""
    from lit_tricks.functional import reweighting_weights

    script = Path(__file__).with_name("ddp_uneven.py")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=600, env=env
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    for name in ("callbacks", "params"):
        torch.testing.assert_close(ranks[0][name], ranks[1][name], rtol=0, atol=0)
    replay, pskd, elr = ranks[0]["callbacks"]
    assert replay["seen"] == 2 * 36  # every new sample of both ranks, both epochs, entered the memory
    for table in (pskd, elr):
        assert table["values"].shape == (40, 3) and table["seen"].nonzero().flatten().tolist() == list(range(36))
    steps = list(zip(ranks[0]["records"], ranks[1]["records"], strict=True))
    sizes = [(len(step0["loss"]), len(step1["loss"])) for step0, step1 in steps]  # new, then new + replayed
    assert sizes == [(12, 12), (16, 8), (24, 24), (16, 8)]
    for step0, step1 in steps:
        expected = reweighting_weights(torch.cat([step0["loss"], step1["loss"]]), "quadratic", 0.5)
        torch.testing.assert_close(torch.cat([step0["weight"], step1["weight"]]), expected)


# ---------------------------------------------------------------- logging
def test_sample_reweighting_logs_its_warm_up(quiet_trainer_kwargs):
    trainer = _trainer([SampleReweighting(warmup_steps=3)], quiet_trainer_kwargs, max_steps=2)
    trainer.fit(Classifier(MLP(64, 10), num_classes=10), DigitsDataModule())
    assert trainer.callback_metrics["tricks/SampleReweighting/warmup_remaining"] == 2  # at step 1
    assert "tricks/SampleReweighting/weight_max" not in trainer.callback_metrics


# ---------------------------------------------------------------- damaged checkpoint files
def test_damaged_checkpoints_are_named(tmp_path):
    empty, text = tmp_path / "empty.ckpt", tmp_path / "notes.ckpt"
    empty.write_bytes(b"")
    text.write_text("this is not a checkpoint\n")
    for path in (empty, text):
        with pytest.raises(ValueError, match=f"{path.name}' is damaged or not a PyTorch checkpoint"):
            EMATeacher.ema_weights_from_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="No checkpoint file at"):
        load_checkpoint(tmp_path / "missing.ckpt")

    class Unsafe:
        def __reduce__(self):
            return (print, ("unsafe",))

    torch.save({"x": Unsafe()}, tmp_path / "unsafe.ckpt")
    with pytest.raises(Exception, match="Weights only load failed"):  # still refused, not called damaged
        load_checkpoint(tmp_path / "unsafe.ckpt")
