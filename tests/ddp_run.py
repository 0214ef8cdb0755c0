"""Run harness cases under DDP (2 CPU processes, gloo) and save what each rank ends with.

Usage: python tests/ddp_run.py OUT_DIR CASE [CASE ...]   (Lightning re-launches this script for rank 1)

The cases run one after another in the same two processes (one process group): starting Python, importing
Lightning and connecting gloo is most of a tiny case's cost. Each case is seeded afresh and gets a new Trainer;
a case that raises on both ranks writes its traceback to ``OUT_DIR/CASE/error.txt`` and the next case runs.
"""

import sys
import traceback
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).parent))
from harness import CASES, tear_down_process_group  # noqa: E402


def run_case(name: str, out: Path) -> None:
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


def main(out: Path, names: list[str]) -> None:
    for name in names:
        case_dir = out / name
        case_dir.mkdir(parents=True, exist_ok=True)
        try:
            run_case(name, case_dir)
        except Exception:  # both ranks fail alike in a broken case; record it and go on to the next one
            (case_dir / "error.txt").write_text(traceback.format_exc())
            if torch.distributed.is_initialized():
                torch.distributed.barrier()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
    tear_down_process_group()
