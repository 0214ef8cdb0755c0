"""2-D toy distributions for generative models: two moons, 8 Gaussians, swiss roll, checkerboard."""

from __future__ import annotations

import math
from typing import Literal

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from lit_tricks.data.indexed import ArrayDataset
from lit_tricks.data.loader import ResumableDataLoader
from lit_tricks.data.sampler import EpochRandomSampler

Toy = Literal["moons", "8gaussians", "swissroll", "checkerboard"]


def toy_2d(name: Toy, n: int, seed: int = 0) -> Tensor:
    """``[n, 2]`` float32 samples of a 2-D toy distribution (unstandardised), from a seeded numpy generator."""
    rng = np.random.default_rng(seed)
    if name == "moons":
        from sklearn.datasets import make_moons

        x, _ = make_moons(n, noise=0.05, random_state=int(rng.integers(2**31)))
    elif name == "8gaussians":
        angles = 2 * math.pi * rng.integers(0, 8, n) / 8
        x = 2 * np.stack([np.cos(angles), np.sin(angles)], axis=1) + 0.1 * rng.standard_normal((n, 2))
    elif name == "swissroll":
        t = 1.5 * math.pi * (1 + 2 * rng.random(n))
        x = np.stack([t * np.cos(t), t * np.sin(t)], axis=1) / 5 + 0.1 * rng.standard_normal((n, 2))
    elif name == "checkerboard":
        x1 = 4 * rng.random(n) - 2
        x2 = rng.random(n) - rng.integers(0, 2, n) * 2.0 + np.floor(x1) % 2
        x = np.stack([x1, x2], axis=1)
    else:
        raise ValueError(f"name must be 'moons', '8gaussians', 'swissroll' or 'checkerboard', got {name!r}.")
    return torch.as_tensor(x, dtype=torch.float32)


class Toy2DDataModule(pl.LightningDataModule):
    """A 2-D toy distribution standardised per dimension to standard deviation ``sigma_data`` (with the
    training split's statistics), as dict batches ``{"inputs", "index"}``.

    Args:
        name: ``"moons"``, ``"8gaussians"``, ``"swissroll"`` or ``"checkerboard"``.
        num_samples: training samples; validation and test get ``eval_samples`` fresh ones each.
        sigma_data: the standard deviation after standardisation (a consistency model's :math:`\\sigma_d`).
        batch_size: training batch size.
        eval_samples: size of the validation and test sets (the real sets of the sample-quality metrics).
        seed: seed of the samples and the shuffling.
    """

    def __init__(
        self, name: Toy = "moons", num_samples: int = 20_000, sigma_data: float = 0.5, batch_size: int = 256,
        eval_samples: int = 2000, seed: int = 0,
    ) -> None:  # fmt: skip
        super().__init__()
        toy_2d(name, 1)  # an unknown name fails here
        if num_samples < 2 or eval_samples < 2 or batch_size < 1 or sigma_data <= 0:
            raise ValueError("num_samples and eval_samples must be >= 2, batch_size >= 1 and sigma_data > 0.")
        self.name, self.num_samples, self.sigma_data = name, num_samples, sigma_data
        self.batch_size, self.eval_samples, self.seed = batch_size, eval_samples, seed
        self.train_set: ArrayDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        x = toy_2d(self.name, self.num_samples + 2 * self.eval_samples, self.seed)
        train = x[: self.num_samples]
        self.mean, self.std = train.mean(dim=0), train.std(dim=0)
        x = (x - self.mean) / self.std * self.sigma_data
        targets = torch.zeros(len(x), dtype=torch.long)  # unused; keeps the batches in the common dict form
        self.train_set = ArrayDataset(x[: self.num_samples], targets[: self.num_samples])
        self.val_set = ArrayDataset(x[self.num_samples : -self.eval_samples], targets[: self.eval_samples])
        self.test_set = ArrayDataset(x[-self.eval_samples :], targets[: self.eval_samples])

    def train_dataloader(self) -> DataLoader:
        sampler = EpochRandomSampler(self.train_set, seed=self.seed)
        return ResumableDataLoader(self.train_set, self.batch_size, sampler=sampler, generator=torch.Generator())

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, self.eval_samples, generator=torch.Generator())

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, self.eval_samples, generator=torch.Generator())

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()
