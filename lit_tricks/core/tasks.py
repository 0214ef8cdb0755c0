"""The task a continual-learning batch belongs to, agreed on by every rank."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from torch import Tensor

from lit_tricks.core.batch import TrickBatch


def batch_task(trainer: pl.Trainer, module: pl.LightningModule, batch: Any, reader: str | None) -> int | None:
    """The task of a training batch: the largest id in ``batch['task']``, and under DDP the largest over the ranks,
    so that every rank switches tasks at the same step. Without task ids: ``None`` when ``reader`` is ``None``, else
    a ``ValueError`` that names ``reader`` (the part that needs them) and the fix."""
    tasks = TrickBatch.from_batch(batch).extras.get("task")
    if not isinstance(tasks, Tensor):
        if reader is None:
            return None
        raise ValueError(
            f"{reader} reads the current task from batch['task']: use lit_tricks.data.ContinualDataModule or add a "
            "'task' key (a task id per sample) to your batches."
        )
    task = tasks.max()
    if trainer.world_size > 1:
        task = module.all_gather(task).max()
    return int(task)
