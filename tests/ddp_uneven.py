"""Fit per-sample tables, sample reweighting and replay under DDP with rank-local shards of different sizes.

Usage: python tests/ddp_uneven.py OUT_DIR   (Lightning re-launches this script for rank 1)

Rank 0 trains on dataset indices 0-19 and rank 1 on 20-35 of one 40-sample ``IndexedDataset``, in batches of
12: the last batches hold 8 and 4 samples, and neither shard's length is the index range.
"""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Subset, TensorDataset

sys.path.insert(0, str(Path(__file__).parent))
from harness import RecordWeights, tear_down_process_group  # noqa: E402
from lit_tricks import ELR, Classifier, ExperienceReplay, SampleReweighting, SelfDistill  # noqa: E402
from lit_tricks.data import IndexedDataset  # noqa: E402
from lit_tricks.nets import MLP  # noqa: E402

SHARDS = (range(0, 20), range(20, 36))


class Shards(pl.LightningDataModule):
    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(0)
        full = IndexedDataset(TensorDataset(torch.randn(40, 8, generator=generator), torch.arange(40) % 3))
        return DataLoader(Subset(full, list(SHARDS[self.trainer.global_rank])), batch_size=12)


def main(out: Path) -> None:
    pl.seed_everything(0, verbose=False)
    callbacks = [
        ExperienceReplay(memory_size=16, seed=1),
        SelfDistill("past_predictions", total_epochs=2),
        ELR(),
        SampleReweighting("quadratic", 0.5),
        RecordWeights(),
    ]
    trainer = pl.Trainer(
        strategy="ddp",
        accelerator="cpu",
        devices=2,
        max_epochs=2,
        use_distributed_sampler=False,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    model = Classifier(MLP(8, 3, hidden=(16,)), num_classes=3)
    trainer.fit(model, Shards())
    result = {
        "callbacks": [cb.state_dict() for cb in callbacks[:3]],
        "records": callbacks[-1].records,
        "params": {k: v.detach().clone() for k, v in model.named_parameters()},
    }
    torch.save(result, out / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    tear_down_process_group()
