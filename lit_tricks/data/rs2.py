"""RS2, repeated random sampling: each epoch trains on a fresh random subset, without replacement across epochs."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sized

import torch
from torch import Tensor
from torch.utils.data import Sampler


def rs2_indices(num_samples: int, fraction: float, epoch: int, seed: int = 0) -> Tensor:
    r"""The sample indices of ``epoch`` under RS2 without replacement (Okanovic et al., ICLR 2024).

    With :math:`K = \mathrm{round}(rN)` and :math:`m = \lceil N / K \rceil` epochs per cycle, epoch
    :math:`e` is round :math:`j = e \bmod m` of cycle :math:`c = \lfloor e / m \rfloor`: the slice
    :math:`[jK, (j+1)K)` of a permutation :math:`\pi_c` drawn from ``(seed, c)``, wrapping round to its start
    in the last round when :math:`K` does not divide :math:`N`. So every sample is seen once in each cycle of
    :math:`m` epochs, an epoch never repeats a sample, and the result depends only on its arguments.

    Example::

        >>> sorted(torch.cat([rs2_indices(10, 0.5, e) for e in (0, 1)]).tolist()) == list(range(10))
        True
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}.")
    size = max(1, round(fraction * num_samples))
    rounds = math.ceil(num_samples / size)
    cycle, round_ = divmod(epoch, rounds)
    permutation = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed * 1_000_003 + cycle))
    return permutation[(round_ * size + torch.arange(size)) % num_samples]


class RS2Sampler(Sampler[int]):
    """A sampler of ``round(fraction * N)`` samples per epoch by :func:`rs2_indices`; Lightning calls
    :meth:`set_epoch` each epoch.

    The order is a function of ``(seed, epoch)`` only, so a resumed run sees the same subsets, and under DDP
    Lightning's ``DistributedSamplerWrapper`` shards the same subset on every rank (it forwards
    ``set_epoch``). One epoch is ``fraction`` of the data, so ``max_epochs`` counts RS2 rounds and learning-rate
    schedules sized from ``trainer.estimated_stepping_batches`` follow the reduced budget, as in the paper.

    Args:
        data_source: the (training) dataset.
        fraction: :math:`r`, the fraction of the data per epoch (the paper sweeps 0.01-0.9; 0.1 by default).
        seed: seed of the permutations.
    """

    def __init__(self, data_source: Sized, fraction: float = 0.1, seed: int = 0) -> None:
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}.")
        self.data_source, self.fraction, self.seed = data_source, fraction, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return max(1, round(self.fraction * len(self.data_source)))

    def __iter__(self) -> Iterator[int]:
        yield from rs2_indices(len(self.data_source), self.fraction, self.epoch, self.seed).tolist()
