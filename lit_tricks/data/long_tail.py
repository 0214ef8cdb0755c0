"""Long-tailed training splits: the exponential class profile and a seeded cut of a data set to it."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def long_tail_counts(class_counts: Sequence[int] | Tensor, rho: float) -> Tensor:
    r"""Samples per class of the exponential long-tail profile with imbalance ratio ``rho``.

    .. math:: n_c = \left\lfloor n_{\max}\, \rho^{-c / (C - 1)} \right\rfloor, \quad c = 0, \dots, C - 1,

    with class 0 the head and class :math:`C - 1` the tail (Cao et al., 2019, LDAM-DRW; Buda et al., 2018).
    :math:`n_{\max}` is the smallest of ``class_counts``, so every class holds enough samples for its target;
    on a balanced set that is the per-class count, as in the authors' CIFAR-LT code.

    Example::

        >>> long_tail_counts([100] * 5, rho=16).tolist()
        [100, 50, 25, 12, 6]
    """
    counts = torch.as_tensor(class_counts)
    if counts.ndim != 1 or len(counts) < 2 or counts.dtype.is_floating_point:
        raise ValueError(f"class_counts must be integer counts of at least 2 classes, got {class_counts!r}.")
    if not rho >= 1.0:
        raise ValueError(f"rho (the imbalance ratio n_max / n_min) must be >= 1, got {rho}.")
    n_max, last = int(counts.min()), len(counts) - 1
    # the authors' float expression (imb_factor = 1 / rho raised to c / (C - 1)), so the floors agree
    profile = torch.tensor([int(n_max * (1.0 / rho) ** (c / last)) for c in range(len(counts))])
    if int(profile[-1]) < 1:
        raise ValueError(
            f"rho={rho} leaves the tail class with no sample ({n_max} in the smallest class): use a smaller rho "
            "or more data."
        )
    return profile


def long_tail_indices(labels: Tensor, rho: float, num_classes: int, seed: int = 0) -> Tensor:
    """Sorted indices of a seeded subset of ``labels`` whose class counts follow :func:`long_tail_counts`.

    Each class keeps a uniformly drawn subset of its samples of the profile's size; the draw depends only on
    ``seed``. ``rho=1`` keeps ``min(class_counts)`` samples of every class (a balanced subset).

    Example::

        >>> labels = torch.tensor([0, 1, 2] * 4)
        >>> labels[long_tail_indices(labels, rho=4, num_classes=3)].bincount().tolist()
        [4, 2, 1]
    """
    labels = torch.as_tensor(labels).long()
    if labels.ndim != 1 or (labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes)):
        raise ValueError(f"labels must be class ids [N] in [0, {num_classes}).")
    targets = long_tail_counts(labels.bincount(minlength=num_classes), rho)
    generator = torch.Generator().manual_seed(seed)
    kept = []
    for c, size in enumerate(targets.tolist()):
        members = (labels == c).nonzero().squeeze(1)
        kept.append(members[torch.randperm(len(members), generator=generator)[:size]])
    return torch.cat(kept).sort().values
