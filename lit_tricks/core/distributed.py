"""Gather per-sample rows from every rank when the ranks' batches may differ in size."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import Tensor


def all_gather_rows(module: pl.LightningModule, *tensors: Tensor) -> tuple[list[Tensor], list[int]]:
    """The rows of ``tensors`` from every rank, concatenated in rank order, and the number of rows of each rank
    (this rank's rows start at ``sum(sizes[:rank])``).

    All tensors have the same number of rows on one rank; ranks may differ (an uneven last batch, rank-local
    shards). Each rank pads its rows to the longest batch, one ``all_gather`` per tensor moves them, and the
    padding is dropped again. Knowing the lengths costs one more ``all_gather`` of a single number (read on the
    host). On one process the tensors come back as they are.
    """
    trainer = module.trainer
    if trainer.world_size == 1:
        return list(tensors), [len(tensors[0])]
    n = tensors[0].shape[0]
    if any(t.shape[0] != n for t in tensors):
        raise ValueError(f"all_gather_rows needs tensors of equal length, got {[len(t) for t in tensors]} rows.")
    sizes = module.all_gather(torch.tensor(n, device=module.device)).tolist()
    longest = max(sizes)
    gathered = []
    for tensor in tensors:
        padded = torch.cat([tensor, tensor.new_zeros(longest - n, *tensor.shape[1:])]) if n < longest else tensor
        everything = module.all_gather(padded)  # [world, longest, ...]
        gathered.append(torch.cat([everything[rank, :size] for rank, size in enumerate(sizes)]))
    return gathered, sizes
