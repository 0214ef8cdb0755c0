"""The sampler of hard mini-batches: fixed batches, each epoch (round) the ones of highest last loss."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DistributedSampler

from lit_tricks.core.checks import check_number
from lit_tricks.functional.hard_batches import fixed_batches, hard_batch_round
from lit_tricks.functional.loss_ranking import kept_count


class HardBatchSampler(DistributedSampler):
    r"""Sample the training set as the fixed mini-batches of :func:`~lit_tricks.functional.hard_batch_round`: epoch
    0 trains all :math:`b` of them, every later epoch (a *round*) the :math:`\max(1, \lfloor\delta b\rfloor)` of
    highest last loss, in batch order ("Can we learn better with hard samples?", Sahayam et al., arXiv 2304.03486).

    The losses come from :class:`~lit_tricks.HardBatches`, which records each batch's mean training loss here
    (:meth:`record`); without it the sampler refuses to start round 1. ``ArrayDataModule(hard_batches=delta)`` builds
    it; with your own ``DataLoader``, pass it as ``sampler=`` with ``batch_size=batch_size`` (the default
    ``drop_last=False`` is fine: every epoch is a whole number of batches).

    **Budget.** An epoch is a round, so epochs after the first are shorter; the paper trains the baseline's number
    of iterations: set ``Trainer(max_steps=E * b)`` for the budget of ``E`` plain epochs (``b = len(loader)`` in
    epoch 0, :attr:`num_batches`), and validate every ``b`` steps with ``val_check_interval=b,
    check_val_every_n_epoch=None`` (Lightning sizes epochs once, from epoch 0, so end-of-epoch validation would
    only run after epoch 0, unless ``reload_dataloaders_every_n_epochs=1``).

    **DDP.** The sampler shards itself (it is a ``DistributedSampler``, so Lightning does not wrap it, and its
    epochs may change length): a batch is a *global* batch of ``batch_size * num_replicas`` samples, of which rank
    ``r`` takes every ``num_replicas``-th from position ``r``, so the shards are disjoint; all ranks record the same
    all-reduced losses and choose the same batches.

    **Resuming.** The losses and the current round's choice are state (:meth:`state_dict`, saved in the checkpoint
    by :class:`~lit_tricks.HardBatches`): a resumed epoch replays the same round, and
    :class:`~lit_tricks.data.ResumableDataLoader` skips its batches already trained.

    Args:
        num_samples: size of the training set.
        batch_size: samples per batch and rank (the loader's ``batch_size``).
        delta: :math:`\delta`, the fraction of the batches trained in each round after the first (paper: 0.5
            by default; 1 is plain training in a fixed order).
        seed: seed of the permutation that cuts the fixed batches.
        num_replicas: number of DDP ranks (default: ``torch.distributed``'s world size, 1 without it).
        rank: this rank (default: ``torch.distributed``'s rank, 0 without it).

    Example::

        >>> sampler = HardBatchSampler(num_samples=10, batch_size=2, delta=0.4)
        >>> len(sampler), sampler.num_batches
        (10, 5)
        >>> for j, loss in enumerate([0.1, 0.9, 0.2, 0.8, 0.3]):
        ...     sampler.record(sampler.batches[j], torch.tensor(loss))
        >>> sampler.set_epoch(1)
        >>> sampler.round_batches().tolist(), len(sampler)
        ([1, 3], 4)
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        delta: float = 0.5,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        num_replicas = (
            num_replicas if num_replicas is not None else torch.distributed.get_world_size() if distributed else 1
        )
        rank = rank if rank is not None else torch.distributed.get_rank() if distributed else 0
        check_number("batch_size", batch_size, at_least=1, integer=True)
        check_number("num_replicas", num_replicas, at_least=1, integer=True)
        check_number("rank", rank, at_least=0, below=num_replicas, integer=True)
        check_number("delta", delta, above=0.0, at_most=1.0, hint="1 is plain training in a fixed order.")
        # DistributedSampler.__init__ needs a dataset and a process group: set its attributes here instead
        self.num_replicas, self.rank, self.seed, self.epoch = num_replicas, rank, seed, 0
        self.shuffle, self.drop_last = False, True
        self.batch_size, self.delta = batch_size, delta
        self.batches = fixed_batches(num_samples, batch_size * num_replicas, seed)  # [b, global batch]
        self.batch_of = torch.full((num_samples,), -1, dtype=torch.long)  # sample -> batch id (-1: dropped)
        self.batch_of[self.batches.flatten()] = torch.arange(self.num_batches).repeat_interleave(self.batches.shape[1])
        self.losses = torch.full((self.num_batches,), float("inf"))  # never trained: the hardest
        self._round: tuple[int, Tensor] | None = None  # (epoch, batch ids) of the current round

    @property
    def num_batches(self) -> int:
        """:math:`b`, the number of fixed (global) batches: the steps of epoch 0."""
        return self.batches.shape[0]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        rounds = self.num_batches if self.epoch == 0 else kept_count(self.num_batches, self.delta, "delta")
        return rounds * self.batch_size

    def round_batches(self) -> Tensor:
        """The batch ids of this epoch's round, chosen from the losses at its start and kept for the epoch."""
        if self._round is None or self._round[0] != self.epoch:
            losses = self.losses.cpu()
            if self.epoch > 0 and losses.isinf().all():
                raise RuntimeError(
                    "HardBatchSampler has no batch losses to choose round 1 from: add the lit_tricks.HardBatches "
                    "callback to the Trainer, which records them."
                )
            self._round = (self.epoch, hard_batch_round(losses, self.delta, self.epoch))
        return self._round[1]

    def __iter__(self) -> Iterator[int]:
        shards = self.batches[self.round_batches()][:, self.rank :: self.num_replicas]
        yield from shards.flatten().tolist()

    def record(self, index: Tensor, loss: Tensor) -> None:
        """Set the last loss of the batch that holds the samples ``index`` (any of them) to the scalar ``loss``.

        On the loss's device, with no host synchronisation: the tables move there at the first call.
        """
        if self.losses.device != loss.device:
            self.losses, self.batch_of = self.losses.to(loss.device), self.batch_of.to(loss.device)
        self.losses.index_copy_(0, self.batch_of[index[:1]], loss.detach().reshape(1).to(self.losses.dtype))

    def state_dict(self) -> dict[str, Any]:
        """The last losses and the current round (the cut of the batches is a function of the arguments)."""
        round_ = (-1, torch.empty(0, dtype=torch.long)) if self._round is None else self._round
        return {"losses": self.losses.cpu(), "round_epoch": round_[0], "round_batches": round_[1].clone()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        losses = state_dict["losses"]
        if losses.shape != self.losses.shape:
            raise ValueError(
                f"The state holds losses of {losses.numel()} batches but this sampler has {self.num_batches}: resume "
                "with the same data, batch size, number of devices and seed."
            )
        self.losses = losses.to(self.losses.device, self.losses.dtype)
        epoch = state_dict["round_epoch"]
        self._round = None if epoch < 0 else (epoch, state_dict["round_batches"].clone())
