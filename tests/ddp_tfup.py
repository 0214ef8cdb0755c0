"""TFUP under DDP (2 CPU processes, gloo): without a fit, each rank encodes its share of the test stream and the ranks
gather the features into one cache; saves each rank's cache and test metrics.

Usage: python tests/ddp_tfup.py OUT_DIR   (Lightning re-launches this script for rank 1)
"""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from test_tfup import _shifted_target
from torch.utils.data import DataLoader, TensorDataset

from harness import tear_down_process_group
from lit_tricks.modules.tta.tfup import TFUP


def main(out: Path) -> None:
    quiet = dict(strategy="ddp", accelerator="cpu", devices=2, logger=False, enable_checkpointing=False,
                 enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    encoder, text, x, y = _shifted_target()
    streamed = TFUP(encoder, text_embeddings=text)
    tester = pl.Trainer(**quiet)
    metrics = tester.test(streamed, DataLoader(TensorDataset(x, y), batch_size=64), verbose=False)[0]
    torch.save(
        {"cache": (streamed.cache_keys, streamed.cache_labels), "metrics": metrics, "world_size": tester.world_size},
        out / f"rank{tester.global_rank}.pt",
    )  # fmt: skip


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    tear_down_process_group()
