"""Harness (b): an uninterrupted fit of N steps equals a fit resumed from a checkpoint, bit for bit (weights,
optimizer, trick state): from the end-of-epoch ``last.ckpt`` of a shorter run (N/2), and from a mid-epoch
checkpoint of the uninterrupted run (``every_n_train_steps``), which stands for a run killed right after it (one
case is really killed, by SIGKILL)."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from harness import CASES, assert_same

STEPS_PER_EPOCH, MID_EPOCH_STEP = 5, 4  # the mid-epoch checkpoint: 4 of epoch 0's 5 batches served
_FULL_RUNS: dict[str, dict] = {}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: as fast for these tiny models, and far faster when other jobs load the cores (spinning
    OpenMP threads stall there)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _fit(name, root, max_epochs, ckpt_path=None, every_n_train_steps=None, extra_callbacks=()):
    pl.seed_everything(0, verbose=False)
    model, datamodule, callbacks = CASES[name]()
    checkpoints = [ModelCheckpoint(dirpath=root, save_last=True, save_top_k=0)]
    if every_n_train_steps:
        checkpoints.append(
            ModelCheckpoint(root / "steps", "{step}", every_n_train_steps=every_n_train_steps, save_top_k=-1)
        )
    trainer = pl.Trainer(
        max_epochs=max_epochs,
        limit_train_batches=STEPS_PER_EPOCH,
        limit_val_batches=2,
        accelerator="cpu",
        devices=1,
        default_root_dir=root,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[*callbacks, *extra_callbacks, *checkpoints],
    )
    trainer.fit(model, datamodule, ckpt_path=ckpt_path)
    return {
        "steps": trainer.global_step,
        "model": model.state_dict(),
        "optimizer": trainer.optimizers[0].state_dict(),
        "callbacks": [cb.state_dict() for cb in callbacks],
    }


def _full_run(name, tmp_path_factory):
    """The uninterrupted 2-epoch run of a case, with its mid-epoch checkpoint; shared by both tests."""
    if name not in _FULL_RUNS:
        root = tmp_path_factory.mktemp(f"{name}_full")
        _FULL_RUNS[name] = {**_fit(name, root, 2, every_n_train_steps=MID_EPOCH_STEP), "root": root}
    return _FULL_RUNS[name]


def _assert_same_run(full, resumed):
    assert resumed["steps"] == full["steps"] == 2 * STEPS_PER_EPOCH
    for part in ("model", "optimizer", "callbacks"):
        assert_same(full[part], resumed[part], part)


@pytest.mark.parametrize("name", sorted(CASES))
def test_resume_is_bit_exact(name, tmp_path, tmp_path_factory):
    full = _full_run(name, tmp_path_factory)
    _fit(name, tmp_path / "half", max_epochs=1)
    _assert_same_run(full, _fit(name, tmp_path / "resumed", 2, ckpt_path=tmp_path / "half" / "last.ckpt"))


@pytest.mark.parametrize("name", sorted(CASES))
def test_mid_epoch_resume_is_bit_exact(name, tmp_path, tmp_path_factory):
    full = _full_run(name, tmp_path_factory)
    checkpoint = full["root"] / "steps" / f"step={MID_EPOCH_STEP}.ckpt"
    _assert_same_run(full, _fit(name, tmp_path, 2, ckpt_path=checkpoint))


KILLED_RUN = """
import os, signal, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
import lightning.pytorch as pl
from test_harness_resume import MID_EPOCH_STEP, _fit

class KillAfterCheckpoint(pl.Callback):  # the checkpoint of step MID_EPOCH_STEP is written at its batch's end
    def on_train_batch_start(self, trainer, *args):
        if trainer.global_step == MID_EPOCH_STEP:
            os.kill(os.getpid(), signal.SIGKILL)

_fit({name!r}, Path({root!r}), 2, every_n_train_steps=MID_EPOCH_STEP, extra_callbacks=[KillAfterCheckpoint()])
"""


def test_resume_after_sigkill_mid_epoch_is_bit_exact(tmp_path, tmp_path_factory):
    name = "classifier_mlp_dropout"
    script = KILLED_RUN.format(tests=str(Path(__file__).parent), name=name, root=str(tmp_path / "killed"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=3600, env=env)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-4000:]
    checkpoint = tmp_path / "killed" / "steps" / f"step={MID_EPOCH_STEP}.ckpt"
    _assert_same_run(_full_run(name, tmp_path_factory), _fit(name, tmp_path / "resumed", 2, ckpt_path=checkpoint))
