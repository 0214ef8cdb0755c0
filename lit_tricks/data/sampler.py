"""A shuffling sampler whose order depends only on (seed, epoch), so resumed runs see the same batches."""

from __future__ import annotations

from collections.abc import Iterator, Sized

import torch
from torch.utils.data import RandomSampler


class EpochRandomSampler(RandomSampler):
    """Shuffle with a permutation drawn from ``seed + epoch``; Lightning calls :meth:`set_epoch` each epoch.

    A plain shuffling ``DataLoader`` draws its order from the global RNG, which a resumed run does not
    restore; this sampler makes the order a function of the epoch, so ``ckpt_path=`` resumes exactly. Under
    DDP Lightning replaces it (it is a ``RandomSampler``) by a ``DistributedSampler``, which is also
    seeded per epoch.
    """

    def __init__(self, data_source: Sized, seed: int = 0) -> None:
        super().__init__(data_source)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        yield from torch.randperm(len(self.data_source), generator=generator).tolist()
