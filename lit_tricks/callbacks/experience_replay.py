"""Experience replay: a reservoir memory of past samples, replayed beside every new batch."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from lit_tricks.core.batch import TrickBatch
from lit_tricks.core.checks import check_number
from lit_tricks.core.distributed import all_gather_rows
from lit_tricks.core.trick import Trick, logging_due


def reservoir_slots(seen: int, n: int, capacity: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    r"""Reservoir sampling (Vitter's algorithm R) for a batch of ``n`` new samples after ``seen`` earlier ones.

    Sample :math:`j` (the :math:`(s + j + 1)`-th overall) goes to slot :math:`s + j` while the memory fills,
    then replaces slot :math:`r \sim U\{0, \dots, s + j\}` if :math:`r <` ``capacity``, so every sample seen so
    far is in memory with equal probability. When two samples of a batch pick the same slot the later wins,
    as in the sequential algorithm. Returns ``(rows, slots)``: which new samples go where.
    """
    positions = seen + torch.arange(n)
    draws = (torch.rand(n, generator=generator, dtype=torch.float64) * (positions + 1)).long()
    slots = torch.where(positions < capacity, positions, draws)
    rows = torch.arange(n)
    keep = slots < capacity
    rows, slots = rows[keep], slots[keep]
    last = torch.full((capacity,), -1, dtype=torch.long).scatter_reduce(0, slots, rows, "amax")
    winners = last >= 0
    return last[winners], winners.nonzero().flatten()


class ExperienceReplay(Trick):
    r"""Experience replay with a reservoir memory (as in the stability-gap paper's ER baseline).

    Every step, a replay batch is drawn uniformly from the memory and trained beside the new batch with

    .. math:: \mathcal L = w\,\overline{\ell}_{\text{new}} + (1 - w)\,\overline{\ell}_{\text{memory}},

    (:math:`w` = ``new_weight``; plain :math:`\overline{\ell}_{\text{new}}` while the memory is empty); then the
    new samples enter the memory by reservoir sampling, so it holds a uniform sample of everything seen. Under
    DDP the new samples of all ranks enter one memory, identical on every rank (the ranks' batches may differ
    in size), and each rank replays its own slice of one global draw. Fine-tuning is the same run without this trick.

    Memory (inputs, class-id targets and, when the batch has them, ``task`` and ``index``) lives on the
    module's device and in checkpoints. It runs first (``order = -30``) so that the tricks after it (e.g.
    Mixup) treat replayed and new samples alike.

    Args:
        memory_size: capacity in samples (the authors' Split-MNIST config: 2000).
        replay_batch_size: samples replayed per step and rank (``None``: the new batch's size).
        new_weight: :math:`w`, the weight of the new batch's loss (the authors' config: 0.3; 0.5 is equal).
        seed: seed of the reservoir and replay draws.

    Example::

        >>> import lightning as L
        >>> from lit_tricks import Classifier, ExperienceReplay
        >>> from lit_tricks.data import ContinualDataModule, DigitsDataModule
        >>> from lit_tricks.nets import MLP
        >>> replay = ExperienceReplay(memory_size=100)
        >>> trainer = L.Trainer(max_epochs=1, callbacks=[replay], logger=False, enable_checkpointing=False,
        ...                     enable_progress_bar=False, enable_model_summary=False)
        >>> stream = ContinualDataModule(DigitsDataModule(val_fraction=0.0), num_tasks=5)
        >>> trainer.fit(Classifier(MLP(64, 10), num_classes=10), stream)
        >>> replay.seen, len(replay.memory["inputs"])
        (1438, 100)
    """

    order = -30

    def __init__(
        self, memory_size: int = 2000, replay_batch_size: int | None = None, new_weight: float = 0.5, seed: int = 0
    ) -> None:
        check_number("memory_size", memory_size, at_least=1, integer=True)
        if replay_batch_size is not None:
            check_number(
                "replay_batch_size", replay_batch_size, at_least=1, integer=True, hint="Or None: the batch size."
            )
        check_number("new_weight", new_weight, above=0.0, at_most=1.0)
        self.memory_size, self.replay_batch_size, self.new_weight = memory_size, replay_batch_size, new_weight
        self._generator = torch.Generator().manual_seed(seed)
        self.memory: dict[str, Tensor] = {}
        self.seen = 0

    def before_forward(self, trainer: pl.Trainer, module: pl.LightningModule, batch: TrickBatch) -> TrickBatch:
        if batch.targets.ndim != 1:
            raise ValueError("ExperienceReplay stores class ids: run it before tricks that make soft targets.")
        new = self._fields(batch)
        names = list(new)
        gathered, sizes = all_gather_rows(module, *new.values())  # one memory, identical on every rank
        combined = self._with_replay(trainer, batch, new, sizes) if self.seen else batch
        self._remember(dict(zip(names, gathered, strict=True)))
        if logging_due(trainer):
            module.log(self.tag("memory_fill"), min(self.seen, self.memory_size) / self.memory_size)
        return combined

    def _fields(self, batch: TrickBatch) -> dict[str, Tensor]:
        fields = {"inputs": batch.inputs, "targets": batch.targets}
        if batch.index is not None:
            fields["index"] = batch.index
        if isinstance(batch.extras.get("task"), Tensor):
            fields["task"] = batch.extras["task"]
        return fields

    def _with_replay(
        self, trainer: pl.Trainer, batch: TrickBatch, new: dict[str, Tensor], sizes: list[int]
    ) -> TrickBatch:
        n = len(batch)
        replay_sizes = [self.replay_batch_size or size for size in sizes]  # of every rank
        filled = min(self.seen, self.memory_size)
        draw = torch.randint(filled, (sum(replay_sizes),), generator=self._generator)  # same on every rank
        start, r = sum(replay_sizes[: trainer.global_rank]), replay_sizes[trainer.global_rank]
        rows = draw[start : start + r].to(batch.inputs.device)
        if set(new) != set(self.memory):
            raise ValueError(f"Batches changed fields ({sorted(new)} vs the memory's {sorted(self.memory)}).")
        replay = {name: self.memory[name][rows] for name in new}
        weight = torch.cat(
            [
                torch.full((n,), self.new_weight * (n + r) / n, device=batch.inputs.device),
                torch.full((r,), (1 - self.new_weight) * (n + r) / r, device=batch.inputs.device),
            ]
        )
        if batch.weight is not None:
            weight[:n] *= batch.weight
        joined = {name: torch.cat([new[name], replay[name]]) for name in new}
        extras = {key: value for key, value in batch.extras.items() if not isinstance(value, Tensor)}
        if "task" in joined:
            extras["task"] = joined["task"]
        return TrickBatch(joined["inputs"], joined["targets"], joined.get("index"), weight, extras)

    def _remember(self, new: dict[str, Tensor]) -> None:
        if not self.memory:
            self.memory = {
                name: torch.zeros(self.memory_size, *value.shape[1:], dtype=value.dtype, device=value.device)
                for name, value in new.items()
            }
        n = len(new["inputs"])
        rows, slots = reservoir_slots(self.seen, n, self.memory_size, self._generator)
        device = new["inputs"].device
        rows, slots = rows.to(device), slots.to(device)
        for name, value in new.items():
            self.memory[name][slots] = value[rows].detach()
        self.seen += n

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.memory = {name: value.to(pl_module.device) for name, value in self.memory.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"memory": self.memory, "seen": self.seen, "generator": self._generator.get_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.memory, self.seen = dict(state_dict["memory"]), state_dict["seen"]
        self._generator.set_state(state_dict["generator"])
