"""scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes); nothing is downloaded."""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits
from torch import Tensor

from lit_tricks.data.array_datamodule import ArrayDataModule


class DigitsDataModule(ArrayDataModule):
    """The UCI 8x8 digits shipped with scikit-learn, scaled to [0, 1].

    A seeded ``test_fraction`` of the 1,797 images is the test split; ``val_fraction`` of the rest is the
    validation split. Inputs are ``[64]`` vectors, or ``[1, 8, 8]`` images with ``as_image=True``.

    Args:
        test_fraction: fraction of all images held out for testing.
        as_image: return ``[1, 8, 8]`` images instead of flat vectors.
        symmetric: scale pixels to [-1, 1] (as generative models expect) instead of [0, 1].
        **kwargs: see :class:`~lit_tricks.data.ArrayDataModule` (batch size, validation split, label noise,
            seed, workers).

    Example::

        >>> dm = DigitsDataModule(batch_size=32, as_image=True)
        >>> dm.setup()
        >>> batch = next(iter(dm.train_dataloader()))
        >>> batch["inputs"].shape, sorted(batch)
        (torch.Size([32, 1, 8, 8]), ['clean_targets', 'index', 'inputs', 'targets'])
    """

    num_classes = 10

    def __init__(self, test_fraction: float = 0.2, as_image: bool = False, symmetric: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}.")
        self.test_fraction, self.as_image, self.symmetric = test_fraction, as_image, symmetric

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (1, 8, 8) if self.as_image else (64,)

    def load_arrays(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        images, labels = load_digits(return_X_y=True)
        x = torch.as_tensor(images, dtype=torch.float32) / 16.0
        if self.symmetric:
            x = 2 * x - 1
        y = torch.as_tensor(labels, dtype=torch.long)
        if self.as_image:
            x = x.view(-1, 1, 8, 8)
        # The test split has its own fixed seed, so runs with any `seed` test on the same images.
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(12345))
        n_test = round(self.test_fraction * len(x))
        test, train = order[:n_test], order[n_test:]
        return x[train], y[train], x[test], y[test]
