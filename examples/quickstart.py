"""What configs/quickstart.yaml does, with the plain Python API.

    python examples/quickstart.py [--max-epochs 15]

An MLP on scikit-learn's 8x8 digits (offline), TensorBoard logs under lightning_logs/, the best checkpoint
by validation accuracy, then the test metrics. Add a trick by adding it to ``callbacks``.
"""

import argparse

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from lit_tricks import Classifier
from lit_tricks.data import DigitsDataModule
from lit_tricks.nets import MLP


def main(max_epochs: int) -> dict:
    pl.seed_everything(0)
    model = Classifier(
        backbone=MLP(in_features=64, num_classes=10, hidden=(256, 256)),
        num_classes=10,
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max_epochs),
    )
    trainer = pl.Trainer(
        max_epochs=max_epochs,
        log_every_n_steps=10,
        logger=TensorBoardLogger(save_dir=".", name="lightning_logs"),
        callbacks=[ModelCheckpoint(monitor="val/acc", mode="max", save_last=True)],  # + your tricks here
    )
    datamodule = DigitsDataModule(batch_size=64, val_fraction=0.1, seed=0)
    trainer.fit(model, datamodule)
    return trainer.test(model, datamodule, ckpt_path="best")[0]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-epochs", type=int, default=15)
    print(main(parser.parse_args().max_epochs))
