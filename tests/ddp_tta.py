"""EcoTTA under DDP (2 CPU processes, gloo): warm up on source data, adapt on a corrupted stream, save each rank's
meta parameters, logged metrics and local per-domain hits.

Usage: python tests/ddp_tta.py OUT_DIR   (Lightning re-launches this script for rank 1)
"""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

from harness import tear_down_process_group
from lit_tricks import EcoTTA
from lit_tricks.data import CorruptionStreamDataModule, DigitsDataModule
from lit_tricks.nets import CNN2D


def main(out: Path) -> None:
    pl.seed_everything(0, verbose=False)
    quiet = dict(strategy="ddp", accelerator="cpu", devices=2, logger=False, enable_checkpointing=False,
                 enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    data = DigitsDataModule(as_image=True, batch_size=32, val_fraction=0.0)
    eco = EcoTTA(CNN2D(num_classes=10, width=8), ["body.0", "body.2"], input_shape=[1, 8, 8])
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=4, **quiet)
    trainer.fit(eco, data)
    warmed = {k: v.detach().clone() for k, v in eco.named_parameters() if v.requires_grad}
    stream = CorruptionStreamDataModule(data, ["contrast", "fog"], severity=5, batch_size=32)
    tester = pl.Trainer(inference_mode=False, **quiet)
    metrics = tester.test(eco, datamodule=stream, verbose=False)[0]
    torch.save(
        {"warmed": warmed, "metrics": metrics, "records": eco._records, "world_size": tester.world_size},
        out / f"rank{tester.global_rank}.pt",
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    tear_down_process_group()
