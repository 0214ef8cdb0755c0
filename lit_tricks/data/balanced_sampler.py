"""Class-balanced random over- and under-sampling (Buda et al., 2018), drawn afresh each epoch."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import torch
from torch import Tensor
from torch.utils.data import Sampler

BalanceMode = Literal["over", "under"]


def class_balanced_indices(labels: Tensor, mode: BalanceMode, epoch: int, seed: int = 0) -> Tensor:
    r"""A shuffled index list of ``epoch`` in which every class present in ``labels`` occurs equally often.

    - ``"over"``: every class reaches :math:`n = \max_c n_c` samples: all of its own once, plus
      :math:`n - n_c` drawn uniformly with replacement from it (random over-sampling of the minority classes).
    - ``"under"``: every class keeps :math:`n = \min_c n_c` samples drawn without replacement (random
      under-sampling of the majority classes).

    The list has :math:`K n` entries for :math:`K` present classes and depends only on ``(seed, epoch)``.

    Example::

        >>> labels = torch.tensor([0, 0, 0, 1])
        >>> labels[class_balanced_indices(labels, "over", epoch=0)].bincount().tolist()
        [3, 3]
    """
    if mode not in ("over", "under"):
        raise ValueError(f"mode must be 'over' or 'under', got {mode!r}.")
    labels = torch.as_tensor(labels)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    members = [(labels == c).nonzero().squeeze(1) for c in labels.unique().tolist()]
    if mode == "over":
        size = max(len(m) for m in members)
        extra = [m[torch.randint(len(m), (size - len(m),), generator=generator)] for m in members]
        chosen = torch.cat(members + extra)
    else:
        size = min(len(m) for m in members)
        chosen = torch.cat([m[torch.randperm(len(m), generator=generator)[:size]] for m in members])
    return chosen[torch.randperm(len(chosen), generator=generator)]


class ClassBalancedSampler(Sampler[int]):
    """A sampler of a class-balanced epoch by :func:`class_balanced_indices`; Lightning calls :meth:`set_epoch`.

    The order is a function of ``(seed, epoch)`` only, so a resumed run (also mid-epoch, with
    :class:`~lit_tricks.data.ResumableDataLoader`) sees the same batches. Under DDP Lightning wraps it in its
    ``DistributedSamplerWrapper``, which forwards ``set_epoch`` and gives each rank a disjoint, equally long shard
    of the same epoch list, as with :class:`~lit_tricks.data.RS2Sampler`. An epoch is :meth:`__len__` samples:
    over-sampling lengthens it (``C * max count``), under-sampling shortens it (``C * min count``).

    Args:
        labels: the training labels ``[N]`` (the observed ones: noisy labels if the data are noisy).
        mode: ``"over"`` or ``"under"``.
        seed: seed of the draws.
    """

    def __init__(self, labels: Tensor, mode: BalanceMode = "over", seed: int = 0) -> None:
        labels = torch.as_tensor(labels)
        if labels.ndim != 1 or labels.numel() == 0 or labels.dtype.is_floating_point:
            raise ValueError(f"labels must be a non-empty [N] tensor of class ids, got shape {tuple(labels.shape)}.")
        if mode not in ("over", "under"):
            raise ValueError(f"mode must be 'over' or 'under', got {mode!r}.")
        self.labels, self.mode, self.seed = labels, mode, seed
        self.epoch = 0
        counts = labels.unique(return_counts=True)[1]
        self._length = len(counts) * int(counts.max() if mode == "over" else counts.min())

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self._length

    def __iter__(self) -> Iterator[int]:
        yield from class_balanced_indices(self.labels, self.mode, self.epoch, self.seed).tolist()
