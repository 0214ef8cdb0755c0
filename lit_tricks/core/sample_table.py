"""A per-sample memory indexed by dataset index, identical on every rank (for PS-KD, ELR, ...)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor


class SampleTable:
    """Rows ``[N, C]`` indexed by dataset index, with a ``seen`` mask, on the module's device.

    :meth:`write` gathers the rows of every rank under DDP, so every rank holds the whole table; the table
    travels in the owning callback's ``state_dict``.
    """

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        self.dtype = dtype
        self.values: Tensor | None = None
        self.seen: Tensor | None = None

    def allocate(self, trainer: pl.Trainer, module: pl.LightningModule, owner: str) -> None:
        """One row of ``module.num_classes`` per training sample, on the module's device: zero rows, or the
        restored ones after checking their shape. Logs the table's memory once."""
        num_samples, width, device = len(trainer.train_dataloader.dataset), module.num_classes, module.device
        if self.values is None:
            self.values = torch.zeros(num_samples, width, dtype=self.dtype, device=device)
            self.seen = torch.zeros(num_samples, dtype=torch.bool, device=device)
        elif self.values.shape != (num_samples, width):
            raise ValueError(
                f"The {owner} table in the checkpoint is {tuple(self.values.shape)} but the data has {num_samples} "
                f"samples of {width} classes: resume with the same training set."
            )
        else:
            self.values, self.seen = self.values.to(device), self.seen.to(device)
        megabytes = self.values.numel() * self.values.element_size() / 2**20
        rank_zero_info(f"{owner}: per-sample table {num_samples} x {width} {self.dtype}, {megabytes:.1f} MiB")

    def write(self, module: pl.LightningModule, index: Tensor, rows: Tensor) -> None:
        """Store ``rows`` at ``index``, from every rank under DDP."""
        if module.trainer.world_size > 1:
            index, rows = module.all_gather(index).flatten(), module.all_gather(rows).flatten(0, 1)
        self.values[index] = rows.to(self.values.dtype)
        self.seen[index] = True

    def state_dict(self) -> dict[str, Any]:
        return {} if self.values is None else {"values": self.values, "seen": self.seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.values, self.seen = state["values"], state["seen"]
