"""Harness (b): fit N steps in one go == fit N/2, checkpoint, resume to N; weights and trick state bit-exact."""

import lightning.pytorch as pl
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint

from harness import CASES, assert_same


def _fit(name, root, max_epochs, ckpt_path=None):
    pl.seed_everything(0, verbose=False)
    model, datamodule, callbacks = CASES[name]()
    trainer = pl.Trainer(
        max_epochs=max_epochs,
        limit_train_batches=5,
        limit_val_batches=2,
        accelerator="cpu",
        devices=1,
        default_root_dir=root,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[*callbacks, ModelCheckpoint(dirpath=root, save_last=True, save_top_k=0)],
    )
    trainer.fit(model, datamodule, ckpt_path=ckpt_path)
    return trainer, model, callbacks


@pytest.mark.parametrize("name", sorted(CASES))
def test_resume_is_bit_exact(name, tmp_path):
    full_trainer, full_model, full_callbacks = _fit(name, tmp_path / "full", max_epochs=2)
    _fit(name, tmp_path / "half", max_epochs=1)
    resumed_trainer, resumed_model, resumed_callbacks = _fit(
        name, tmp_path / "resumed", max_epochs=2, ckpt_path=tmp_path / "half" / "last.ckpt"
    )
    assert resumed_trainer.global_step == full_trainer.global_step == 10
    assert_same(full_model.state_dict(), resumed_model.state_dict(), "model")
    assert_same(full_trainer.optimizers[0].state_dict(), resumed_trainer.optimizers[0].state_dict(), "optimizer")
    for full_cb, resumed_cb in zip(full_callbacks, resumed_callbacks, strict=True):
        assert_same(full_cb.state_dict(), resumed_cb.state_dict(), type(full_cb).__name__)
