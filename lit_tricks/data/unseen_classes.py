"""The deep-metric-learning split: train on the first classes, evaluate retrieval on the unseen rest."""

from __future__ import annotations

import torch

from lit_tricks.core.checks import check_number
from lit_tricks.data.array_datamodule import ArrayDataModule
from lit_tricks.data.digits import DigitsDataModule
from lit_tricks.data.indexed import ArrayDataset


class UnseenClassesDataModule(ArrayDataModule):
    """Every sample of ``source`` (its train and test splits pooled) of classes ``0..K-1`` for training; those of
    classes ``K..`` for validation and test, split by a seeded ``val_fraction`` (as CUB-200 trains on 100 classes
    and tests retrieval on the other 100). Labels are kept as they are.

    Args:
        source: the data module whose arrays are split (its ``load_arrays``); default 8x8 digits.
        train_classes: ``K``, the number of training classes.
        val_fraction: the fraction of the unseen classes' samples for validation (the rest are the test split).
        batch_size, eval_batch_size, seed, num_workers: as :class:`~lit_tricks.data.ArrayDataModule`.

    Example::

        >>> dm = UnseenClassesDataModule(train_classes=5)
        >>> dm.setup()
        >>> int(dm.train_set.targets.max()), int(dm.val_set.targets.min()), len(dm.train_set) + len(dm.val_set) + len(
        ...     dm.test_set)
        (4, 5, 1797)
    """

    def __init__(
        self,
        source: ArrayDataModule | None = None,
        train_classes: int = 5,
        val_fraction: float = 0.5,
        batch_size: int = 64,
        eval_batch_size: int = 512,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size, seed=seed, num_workers=num_workers)
        source = DigitsDataModule() if source is None else source
        if not isinstance(source, ArrayDataModule):
            raise TypeError(
                f"source must be a lit_tricks ArrayDataModule (e.g. DigitsDataModule()), got {type(source).__name__}."
            )
        check_number("train_classes", train_classes, at_least=2, below=source.num_classes, integer=True)
        check_number("val_fraction", val_fraction, above=0.0, below=1.0)
        self.source, self.train_classes, self.val_fraction = source, train_classes, val_fraction
        self.num_classes = source.num_classes

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        x, y, x_test, y_test = self.source.load_arrays()
        x, y = torch.cat([x, x_test]), torch.cat([y, y_test])
        seen = y < self.train_classes
        self.train_set = ArrayDataset(x[seen], y[seen])
        x_new, y_new = x[~seen], y[~seen]
        order = torch.randperm(len(x_new), generator=torch.Generator().manual_seed(self.seed))
        n_val = round(self.val_fraction * len(x_new))
        self.val_set = ArrayDataset(x_new[order[:n_val]], y_new[order[:n_val]])
        self.test_set = ArrayDataset(x_new[order[n_val:]], y_new[order[n_val:]])
