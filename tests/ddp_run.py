"""Run one harness case under DDP (2 CPU processes, gloo) and save what each rank ends with.

Usage: python tests/ddp_run.py CASE OUT_DIR   (Lightning re-launches this script for rank 1)
"""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).parent))
from harness import CASES, tear_down_process_group  # noqa: E402


def main(name: str, out: Path) -> None:
    pl.seed_everything(0, verbose=False)
    model, datamodule, callbacks = CASES[name]()
    trainer = pl.Trainer(
        strategy="ddp",
        accelerator="cpu",
        devices=2,
        max_epochs=2,
        limit_train_batches=3,
        limit_val_batches=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    initial = {k: v.detach().clone() for k, v in model.named_parameters()}
    trainer.fit(model, datamodule)
    result = {
        "initial": initial,
        "params": {k: v.detach().clone() for k, v in model.named_parameters()},
        "callbacks": [cb.state_dict() for cb in callbacks],
        "records": [cb.records for cb in callbacks if hasattr(cb, "records")],
        "metrics": {k: v.clone() for k, v in trainer.callback_metrics.items() if k.startswith("val/")},
        "world_size": trainer.world_size,
    }
    torch.save(result, out / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
    tear_down_process_group()
