"""Offline out-of-distribution splits: digits with held-out classes (near-OOD), noise (far-OOD) and a separate set of
auxiliary training outliers, for Outlier Exposure and MixOE."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor
from torch.utils.data import Dataset

from lit_tricks.core.checks import check_number
from lit_tricks.data.digits import DigitsDataModule
from lit_tricks.data.indexed import ArrayDataset


class NoiseDataset(Dataset):
    """Seeded noise samples ``{"inputs": x}``, fixed at construction: a far-OOD test set, or stand-in outliers.

    Args:
        num_samples: number of samples.
        shape: shape of one sample, e.g. ``[64]`` or ``[1, 8, 8]``.
        kind: ``"uniform"`` on ``[low, high]``, or ``"gaussian"`` with mean ``(low + high) / 2`` and standard
            deviation ``(high - low) / 4``, clipped to ``[low, high]``.
        low, high: the range of the pixels.
        seed: seed of the noise.

    Example::

        >>> ds = NoiseDataset(10, [64], kind="gaussian")
        >>> len(ds), ds[0]["inputs"].shape, bool((ds.inputs >= 0).all() and (ds.inputs <= 1).all())
        (10, torch.Size([64]), True)
    """

    def __init__(
        self,
        num_samples: int = 500,
        shape: list[int] | tuple[int, ...] = (64,),
        kind: Literal["uniform", "gaussian"] = "uniform",
        low: float = 0.0,
        high: float = 1.0,
        seed: int = 0,
    ) -> None:
        check_number("num_samples", num_samples, at_least=1, integer=True)
        check_number("low", low)
        check_number("high", high, above=low, hint="high must be above low.")
        if kind not in ("uniform", "gaussian"):
            raise ValueError(f"kind must be 'uniform' or 'gaussian', got {kind!r}.")
        shape = tuple(shape)
        if not shape or any(not isinstance(s, int) or s < 1 for s in shape):
            raise ValueError(f"shape must be positive integers, e.g. [64] or [1, 8, 8], got {shape!r}.")
        generator = torch.Generator().manual_seed(seed)
        if kind == "uniform":
            x = low + (high - low) * torch.rand(num_samples, *shape, generator=generator)
        else:
            x = (low + high) / 2 + (high - low) / 4 * torch.randn(num_samples, *shape, generator=generator)
        self.inputs = x.clamp(low, high)

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"inputs": self.inputs[i]}


class OpenSetDigitsDataModule(DigitsDataModule):
    """scikit-learn's 8x8 digits with the first ``known_classes`` classes in distribution and the rest held out.

    Training, validation and test splits hold only the known classes (their labels unchanged, ``0..K-1``). After
    ``setup`` it also offers:

    * :attr:`near_ood_set`: the test-split images of the held-out classes (near-OOD: same kind of images);
    * :attr:`far_ood_set`: Gaussian noise of the inputs' shape and range, as many as the ID test split (far-OOD);
    * :attr:`outlier_set`: auxiliary training outliers disjoint from both: the known training images with their
      pixels shuffled (each by its own fixed permutation), which keeps their intensities and destroys their shape,
      a small offline stand-in for the papers' auxiliary sets (80 Million Tiny Images, WebVision).

    Args:
        known_classes: the number of in-distribution classes ``K`` (digits ``0..K-1``).
        **kwargs: see :class:`~lit_tricks.data.DigitsDataModule` (``as_image``, batch size, seed, ...).

    Example::

        >>> dm = OpenSetDigitsDataModule(known_classes=6)
        >>> dm.setup()
        >>> dm.num_classes, int(dm.train_set.targets.max()), int(dm.near_ood_set.targets.min())
        (6, 5, 6)
    """

    def __init__(self, known_classes: int = 6, **kwargs) -> None:
        super().__init__(**kwargs)
        check_number("known_classes", known_classes, at_least=2, at_most=9, integer=True)
        self.num_classes = known_classes
        self.near_ood_set: ArrayDataset | None = None
        self.far_ood_set: NoiseDataset | None = None
        self.outlier_set: ArrayDataset | None = None

    def load_arrays(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        x, y, x_test, y_test = super().load_arrays()
        known, known_test = y < self.num_classes, y_test < self.num_classes
        self.near_ood_set = ArrayDataset(x_test[~known_test], y_test[~known_test])
        return x[known], y[known], x_test[known_test], y_test[known_test]

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        super().setup(stage)
        x = self.train_set.inputs
        generator = torch.Generator().manual_seed(self.seed + 1)
        order = torch.rand(len(x), x[0].numel(), generator=generator).argsort(dim=1)
        scrambled = x.flatten(1).gather(1, order).view_as(x)
        self.outlier_set = ArrayDataset(scrambled, torch.full((len(x),), -1))
        low = -1.0 if self.symmetric else 0.0
        shape = list(self.input_shape)
        self.far_ood_set = NoiseDataset(len(self.test_set), shape, "gaussian", low, 1.0, seed=self.seed + 2)
