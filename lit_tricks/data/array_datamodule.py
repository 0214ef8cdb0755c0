"""The base LightningDataModule of our offline data sets: in-memory arrays, seeded splits, label noise."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from lit_tricks.data.indexed import ArrayDataset
from lit_tricks.data.label_noise import NoiseKind, flip_labels
from lit_tricks.data.sampler import EpochRandomSampler


class ArrayDataModule(pl.LightningDataModule):
    """Train / validation / test splits of in-memory tensors, as dict batches with ``index``.

    Subclasses implement :meth:`load_arrays`. The validation split is carved from the training split
    with a seeded permutation; label noise (if any) is applied to the training split only, and the clean
    labels travel along as ``batch["clean_targets"]``. Shuffling is a function of ``(seed, epoch)`` and no
    loader draws from the global RNG, so runs are reproducible and resume exactly.

    Args:
        batch_size: training batch size (evaluation uses ``eval_batch_size``).
        val_fraction: fraction of the training split held out for validation (0 disables validation).
        label_noise: fraction of training labels flipped (see :func:`~lit_tricks.data.flip_labels`).
        noise_kind: ``"symmetric"`` or ``"asymmetric"``.
        seed: seed of the splits, the label noise and the shuffling.
        num_workers: DataLoader workers (0 is fastest for these small in-memory sets).
        eval_batch_size: batch size of validation, test and predict loaders.
    """

    num_classes: int

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.1,
        label_noise: float = 0.0,
        noise_kind: NoiseKind = "symmetric",
        seed: int = 0,
        num_workers: int = 0,
        eval_batch_size: int = 512,
    ) -> None:
        super().__init__()
        if batch_size < 1 or eval_batch_size < 1:
            raise ValueError(f"batch_size and eval_batch_size must be >= 1, got {batch_size}, {eval_batch_size}.")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}.")
        if not 0.0 <= label_noise <= 1.0:
            raise ValueError(f"label_noise must be in [0, 1], got {label_noise}.")
        if noise_kind not in ("symmetric", "asymmetric"):
            raise ValueError(f"noise_kind must be 'symmetric' or 'asymmetric', got {noise_kind!r}.")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}.")
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.val_fraction, self.label_noise, self.noise_kind = val_fraction, label_noise, noise_kind
        self.seed, self.num_workers = seed, num_workers
        self.train_set: ArrayDataset | None = None
        self.val_set: ArrayDataset | None = None
        self.test_set: ArrayDataset | None = None

    def load_arrays(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Return ``(train_inputs, train_targets, test_inputs, test_targets)``; subclasses implement it."""
        raise NotImplementedError(f"{type(self).__name__} must implement load_arrays().")

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        x, y, x_test, y_test = self.load_arrays()
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.seed))
        n_val = round(self.val_fraction * len(x))
        val_idx, train_idx = order[:n_val], order[n_val:]
        y_train = y[train_idx]
        noisy = flip_labels(y_train, self.label_noise, self.num_classes, self.noise_kind, seed=self.seed)
        self.train_set = ArrayDataset(x[train_idx], noisy, clean_targets=y_train)
        self.val_set = ArrayDataset(x[val_idx], y[val_idx]) if n_val else None
        self.test_set = ArrayDataset(x_test, y_test)

    def train_dataloader(self) -> DataLoader:
        sampler = EpochRandomSampler(self.train_set, seed=self.seed)
        return self._loader(self.train_set, self.batch_size, sampler=sampler)

    def val_dataloader(self) -> DataLoader | list:
        return [] if self.val_set is None else self._loader(self.val_set, self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, self.eval_batch_size)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()

    def _loader(self, dataset: ArrayDataset, batch_size: int, **kwargs) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            # a private generator: worker seeds must not come from (and advance) the global RNG
            generator=torch.Generator().manual_seed(self.seed),
            **kwargs,
        )
