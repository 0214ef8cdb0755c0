"""The base LightningDataModule of our offline data sets: in-memory arrays, seeded splits, label noise."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from lit_tricks.data.balanced_sampler import BalanceMode, ClassBalancedSampler
from lit_tricks.data.hard_batches import HardBatchSampler
from lit_tricks.data.indexed import ArrayDataset
from lit_tricks.data.label_noise import NoiseKind, flip_labels
from lit_tricks.data.loader import ResumableDataLoader
from lit_tricks.data.long_tail import long_tail_indices
from lit_tricks.data.rs2 import RS2Sampler
from lit_tricks.data.sampler import EpochRandomSampler
from lit_tricks.data.smote import check_smote_options, smote_features
from lit_tricks.functional.data_diet import keep_by_scores, load_scores


class ArrayDataModule(pl.LightningDataModule):
    """Train / validation / test splits of in-memory tensors, as dict batches with ``index``.

    Subclasses implement :meth:`load_arrays`. The validation split is carved from the training split
    with a seeded permutation; then, if ``imbalance_ratio`` is set, the rest is cut to a long-tailed profile
    (:func:`~lit_tricks.data.long_tail.long_tail_counts`, class 0 the head), so validation and test stay
    balanced and measure every class alike; label noise (if any) is applied to the training split only, after
    the cut as in the long-tail papers, and the clean labels travel along as ``batch["clean_targets"]``.
    Shuffling is a function of ``(seed, epoch)``, no loader draws from the global RNG, and the training loader is
    a :class:`~lit_tricks.data.ResumableDataLoader`, so runs are reproducible and resume exactly, from end-of-epoch
    and mid-epoch checkpoints alike.

    Args:
        batch_size: training batch size (evaluation uses ``eval_batch_size``).
        val_fraction: fraction of the training split held out for validation (0 disables validation).
        label_noise: fraction of training labels flipped (see :func:`~lit_tricks.data.flip_labels`).
        noise_kind: ``"symmetric"`` or ``"asymmetric"``.
        seed: seed of the splits, the label noise and the shuffling.
        num_workers: DataLoader workers (0 is fastest for these small in-memory sets).
        eval_batch_size: batch size of validation, test and predict loaders.
        rs2_fraction: train each epoch on a fresh random fraction of the training split, without replacement
            across epochs (RS2, :class:`~lit_tricks.data.RS2Sampler`); ``None`` trains on all of it.
        prune_scores: one or more files saved by :class:`~lit_tricks.DataDietScores` (one per run; they are
            averaged) to prune the training split with, or ``None``.
        prune_keep: the fraction of the training split kept: the highest scores.
        prune_offset: skip this many of the highest scores first (useful under label noise).
        imbalance_ratio: rho = n_max / n_min (>= 1) of the exponential long-tail profile of the training split
            (100 and 10 are the usual), or ``None`` (as 1) for the balanced split. A long-tailed
            module exposes its training class counts as :attr:`train_class_counts` (the Classifier then logs
            balanced and many/medium/few-shot accuracy).
        balance: draw class-balanced training epochs, ``"over"``-sampling the minority classes or
            ``"under"``-sampling the majority ones (:class:`~lit_tricks.data.balanced_sampler.ClassBalancedSampler`,
            by the observed labels), or ``None``. Not combinable with ``rs2_fraction``.
        smote: add SMOTE's synthetic minority samples to the training split
            (:func:`~lit_tricks.data.smote.smote_features`; ``pip install lit_tricks[imbalance]``): ``True`` for
            the defaults (``k_neighbors=5``, ``sampling_strategy="auto"``: every class up to the largest), a dict
            of those two options, or ``None``. It runs after the long-tail cut and the label noise (by the
            observed labels), seeded by ``seed``, on flattened inputs. The synthetic samples are appended, so the
            real ones keep their indices and the new ones are numbered after them (per-sample tables size to the
            longer set); their ``clean_targets`` is the class they were made for. ``train_class_counts`` stays
            the real samples' counts. Not combinable with ``prune_scores``.
        hard_batches: delta: train on fixed batches, after the first epoch each epoch only the fraction
            ``hard_batches`` of them with the highest last loss (:class:`~lit_tricks.data.HardBatchSampler`; needs
            the :class:`~lit_tricks.HardBatches` callback), or ``None``. Not combinable with another sampler option.
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
        rs2_fraction: float | None = None,
        prune_scores: str | list[str] | None = None,
        prune_keep: float = 1.0,
        prune_offset: int = 0,
        imbalance_ratio: float | None = None,
        balance: BalanceMode | None = None,
        smote: bool | dict[str, Any] | None = None,
        hard_batches: float | None = None,
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
        if rs2_fraction is not None and not 0.0 < rs2_fraction <= 1.0:
            raise ValueError(f"rs2_fraction must be in (0, 1] (or None for all data), got {rs2_fraction}.")
        if not 0.0 < prune_keep <= 1.0:
            raise ValueError(f"prune_keep must be in (0, 1], got {prune_keep}.")
        if prune_scores is None and (prune_keep != 1.0 or prune_offset != 0):
            raise ValueError("prune_keep and prune_offset need prune_scores: the score files to prune with.")
        if imbalance_ratio is not None and not imbalance_ratio >= 1.0:
            raise ValueError(
                f"imbalance_ratio must be >= 1 (n_max / n_min; None or 1 for balanced data), got {imbalance_ratio}."
            )
        if balance not in (None, "over", "under"):
            raise ValueError(f"balance must be 'over', 'under' or None, got {balance!r}.")
        if balance is not None and rs2_fraction is not None:
            raise ValueError("balance and rs2_fraction both choose the training sampler: set only one of them.")
        if hard_batches is not None and not 0.0 < hard_batches <= 1.0:
            raise ValueError(f"hard_batches must be delta in (0, 1] (or None), got {hard_batches}.")
        if hard_batches is not None and (balance is not None or rs2_fraction is not None):
            raise ValueError("hard_batches chooses the training sampler: set neither balance nor rs2_fraction with it.")
        self.hard_batches = hard_batches
        if smote is not None and not isinstance(smote, (bool, dict)):
            raise TypeError(f"smote must be True, a dict of SMOTE options or None, got {smote!r}.")
        self.smote = {} if smote is True else None if smote is False else smote
        if self.smote is not None:
            check_smote_options(self.smote)
            if prune_scores is not None:
                raise ValueError("smote and prune_scores cannot be combined: prune the real data or over-sample it.")
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.val_fraction, self.label_noise, self.noise_kind = val_fraction, label_noise, noise_kind
        self.seed, self.num_workers = seed, num_workers
        self.rs2_fraction = rs2_fraction
        self.prune_scores, self.prune_keep, self.prune_offset = prune_scores, prune_keep, prune_offset
        self.imbalance_ratio, self.balance = imbalance_ratio, balance
        self.train_class_counts: Tensor | None = None
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
        if self.long_tailed:
            train_idx = train_idx[long_tail_indices(y[train_idx], self.imbalance_ratio, self.num_classes, self.seed)]
            self.train_class_counts = y[train_idx].bincount(minlength=self.num_classes)
        y_train = y[train_idx]
        noisy = flip_labels(y_train, self.label_noise, self.num_classes, self.noise_kind, seed=self.seed)
        x_train = x[train_idx]
        if self.smote is not None:
            x_train, noisy = smote_features(x_train, noisy, seed=self.seed, **self.smote)
            y_train = torch.cat([y_train, noisy[len(y_train) :]])  # a synthetic sample's class is its clean label
        self.train_set = ArrayDataset(x_train, noisy, clean_targets=y_train)
        if self.prune_scores is not None:
            scores = load_scores(self.prune_scores)
            if scores.numel() != len(self.train_set):
                raise ValueError(
                    f"prune_scores hold {scores.numel()} scores but the training split has {len(self.train_set)} "
                    "samples: score with the same data set, seed and val_fraction."
                )
            self.train_set = self.train_set.subset(keep_by_scores(scores, self.prune_keep, self.prune_offset))
        self.val_set = ArrayDataset(x[val_idx], y[val_idx]) if n_val else None
        self.test_set = ArrayDataset(x_test, y_test)

    @property
    def long_tailed(self) -> bool:
        """Whether the training split is cut to a long tail (``imbalance_ratio`` set and above 1)."""
        return self.imbalance_ratio is not None and self.imbalance_ratio > 1.0

    def train_dataloader(self) -> DataLoader:
        if self.balance is not None:
            sampler = ClassBalancedSampler(self.train_set.targets, self.balance, seed=self.seed)
        elif self.rs2_fraction is not None:
            sampler = RS2Sampler(self.train_set, self.rs2_fraction, seed=self.seed)
        elif self.hard_batches is not None:
            trainer = self.trainer
            world, rank, epoch = (
                (trainer.world_size, trainer.global_rank, trainer.current_epoch) if trainer else (1, 0, 0)
            )
            sampler = HardBatchSampler(len(self.train_set), self.batch_size, self.hard_batches, self.seed, world, rank)
            sampler.set_epoch(epoch)  # Lightning measures the epoch's length before it calls set_epoch
        else:
            sampler = EpochRandomSampler(self.train_set, seed=self.seed)
        return self._loader(self.train_set, self.batch_size, sampler=sampler, loader=ResumableDataLoader)

    def val_dataloader(self) -> DataLoader | list:
        return [] if self.val_set is None else self._loader(self.val_set, self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, self.eval_batch_size)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()

    def _loader(
        self, dataset: ArrayDataset, batch_size: int, loader: type[DataLoader] = DataLoader, **kwargs
    ) -> DataLoader:
        return loader(
            dataset,
            batch_size=batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            # a private generator: worker seeds must not come from (and advance) the global RNG
            generator=torch.Generator().manual_seed(self.seed),
            **kwargs,
        )
