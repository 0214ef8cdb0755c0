"""Shared by the benchmark scripts: arguments, the machine line, mean +- std, the JSON results."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import lightning
import lightning.pytorch as pl
import torch

from lit_tricks import Classifier
from lit_tricks.data import DigitsDataModule, MNIST1DDataModule
from lit_tricks.nets import CNN1D, MLP

RESULTS = Path(__file__).parent / "results"


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (0, 1, ...)")
    p.add_argument("--quick", action="store_true", help="a tiny run that only checks the script works")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder of the JSON results")
    return p


def machine_line() -> str:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return (
        f"Machine: {os.cpu_count()} CPU cores ({platform.machine()}), torch {torch.__version__}, "
        f"lightning {lightning.__version__}, device {device}, {torch.get_num_threads()} torch threads"
    )


def mean_std(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    mean = statistics.fmean(values) * scale
    std = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def write_json(out: Path, name: str, payload: dict) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps({"machine": machine_line(), **payload}, indent=2))
    return path


def fit_and_test(model: pl.LightningModule, datamodule: pl.LightningDataModule, **trainer_kwargs) -> tuple:
    """Fit silently on the CPU, then test. Returns ``(test metrics, fit seconds, trainer)``; the test runs on
    the EMA weights when an EMATeacher is among the callbacks."""
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **trainer_kwargs,
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule)
    seconds = time.perf_counter() - start
    return trainer.test(model, datamodule, verbose=False)[0], seconds, trainer


# The two trick benchmarks' set-ups, with the baselines' networks and budgets:
# name -> (data module factory(label noise, **other options), net factory, Adam lr, epochs)
SETUPS = {
    "digits / MLP": (
        lambda noise, **options: DigitsDataModule(batch_size=64, val_fraction=0.0, label_noise=noise, **options),
        lambda: MLP(64, 10),
        1e-3,
        65,
    ),
    "MNIST-1D / CNN1D": (
        lambda noise, **options: MNIST1DDataModule(batch_size=100, val_fraction=0.0, label_noise=noise, **options),
        lambda: CNN1D(10),
        1e-2,
        150,
    ),
}


def prepare(
    setup: str, noise: float, seed: int, quick: bool, quick_epochs: int = 1, model_options: dict | None = None,
    **data_options,
) -> tuple:  # fmt: skip
    """Seed, build and set up one run of a set-up: ``(model, datamodule, epochs, optimizer steps)``; ``model_options``
    go to the ``Classifier``, ``data_options`` to the data module. Quick mode: MNIST-1D with 500 signals and
    ``quick_epochs`` epochs."""
    make_data, make_net, lr, epochs = SETUPS[setup]
    pl.seed_everything(seed, verbose=False)
    datamodule = make_data(noise, **data_options)
    datamodule.seed = seed
    if quick:
        epochs = quick_epochs
        if isinstance(datamodule, MNIST1DDataModule):
            datamodule.num_samples = 500
    datamodule.setup()
    steps = epochs * -(-len(datamodule.train_set) // datamodule.batch_size)
    optimizer = lambda params: torch.optim.Adam(params, lr=lr)  # noqa: E731
    model = Classifier(make_net(), num_classes=10, optimizer=optimizer, **(model_options or {}))
    return model, datamodule, epochs, steps
