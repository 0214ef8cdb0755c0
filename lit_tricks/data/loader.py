"""A training DataLoader that resumes mid-epoch: Lightning checkpoints how many batches it has served."""

from __future__ import annotations

from collections.abc import Iterator
from itertools import islice
from typing import Any

from torch.utils.data import DataLoader


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` whose position in the epoch is saved in mid-epoch checkpoints and restored on resume.

    Lightning saves ``state_dict()`` of each training loader that has one (``{"epoch", "batches"}``: the sampler's
    epoch and the batches served in it) and, on resume, calls :meth:`load_state_dict` before iterating. The order of
    every training sampler of ours is a function of ``(seed, epoch)`` (:class:`~lit_tricks.data.EpochRandomSampler`,
    :class:`~lit_tricks.data.RS2Sampler`, and Lightning's ``DistributedSampler`` under DDP), so the resumed epoch
    skips the batches already served and continues with exactly the next one; a checkpoint from an earlier epoch
    (an end-of-epoch checkpoint) skips nothing. Skipped batches are read and dropped (about a millisecond per batch
    for in-memory data), which works unchanged with any sampler, distributed wrapper and number of workers.

    Iteration starts at the first ``next()``, after Lightning has called the sampler's ``set_epoch``: so on resume
    the workers, if any, also draw the resumed epoch's order. With a sampler that has no ``epoch`` (e.g. the
    sequential one ``Trainer(overfit_batches=...)`` installs) nothing is skipped, as with a plain ``DataLoader``.
    """

    _resume: dict[str, int | None] | None = None
    _epoch: int | None = None
    _served = 0

    def state_dict(self) -> dict[str, int | None]:
        """``{"epoch", "batches"}``: the current (or last) epoch and how many of its batches were served."""
        if self._resume is not None:  # loaded, not yet iterated
            return dict(self._resume)
        return {"epoch": self._epoch, "batches": self._served}

    def load_state_dict(self, state_dict: dict[str, int | None]) -> None:
        """Skip ``state_dict["batches"]`` batches when the next iteration is of epoch ``state_dict["epoch"]``."""
        if not isinstance(state_dict, dict) or set(state_dict) != {"epoch", "batches"}:
            raise ValueError(
                f"state_dict must be a ResumableDataLoader state {{'epoch', 'batches'}}, got {state_dict!r}: resume "
                "with the data module (and loaders) the checkpoint was saved with."
            )
        self._resume = dict(state_dict)

    def __iter__(self) -> Iterator[Any]:
        return self._serve()

    def _serve(self) -> Iterator[Any]:
        # a generator: this runs at the first next(), once the sampler knows its epoch
        epoch = getattr(self.sampler, "epoch", None)
        resume, self._resume = self._resume, None
        skip = resume["batches"] if resume is not None and epoch is not None and resume["epoch"] == epoch else 0
        self._epoch, self._served = epoch, skip
        for batch in islice(super().__iter__(), skip, None):
            self._served += 1
            yield batch
