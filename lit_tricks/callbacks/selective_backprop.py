"""Selective backprop: back-propagate only the highest-loss part of each batch, over a window of training."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch

from lit_tricks.core.batch import TrickBatch
from lit_tricks.core.checks import check_number
from lit_tricks.core.eval_mode import eval_mode
from lit_tricks.core.trick import Trick, logging_due
from lit_tricks.functional.selective_backprop import select_by_loss


class SelectiveBackprop(Trick):
    r"""Selective backprop ("Accelerating Deep Learning by Focusing on the Biggest Losers", Jiang et al., 2019),
    in the within-batch form of MosaicML Composer.

    While active, each training batch first goes through a **no-grad selection forward** (in eval mode, so
    batch-norm statistics and the dropout RNG are untouched); the samples are ranked by loss and
    :math:`\lfloor \kappa N \rfloor` of them are drawn with probability
    :math:`p_j \propto ((j + \tfrac12)/N)^{1/\kappa - 1}` (rank :math:`j`, ascending loss). Only those go
    through the training forward and backward pass, and every other trick sees only them.

    **Cost.** The selection forward costs about a third of a full training step (a forward is ~1/3 of
    forward + backward), so an active step costs :math:`\approx \tfrac13 + \kappa` of a plain one:
    ``keep=0.5`` saves at most ~1/6 of the time of the active steps, and ``keep >= 2/3`` saves nothing.
    The paper's gains are in examples back-propagated per unit of accuracy; measure wall time
    (``benchmarks/data_selection.py``).

    Args:
        keep: :math:`\kappa`, the fraction of each batch kept for the backward pass.
        start: fraction of training (optimizer steps / ``trainer.estimated_stepping_batches``) where it
            switches on (Composer: 0.5).
        end: fraction of training where it switches off (Composer: 0.9).
        interrupt: if > 0, every ``interrupt``-th batch inside the window is a normal, full batch
            (Composer: 2, i.e. alternate). 0 selects on every batch.
        seed: seed of the private generator of the draws (saved in checkpoints).

    Example::

        >>> import lightning as L
        >>> from lit_tricks import Classifier, SelectiveBackprop
        >>> from lit_tricks.data import DigitsDataModule
        >>> from lit_tricks.nets import MLP
        >>> trick = SelectiveBackprop(keep=0.5, start=0.0, end=1.0, interrupt=0)
        >>> trainer = L.Trainer(max_epochs=1, callbacks=[trick], logger=False, enable_checkpointing=False,
        ...                     enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=5)
        >>> trainer.fit(Classifier(MLP(64, 10), num_classes=10), DigitsDataModule(batch_size=64))
        >>> float(trainer.callback_metrics["tricks/SelectiveBackprop/kept_fraction"])
        0.5
    """

    order = -20  # first: the tricks after it work on the kept samples only

    def __init__(
        self, keep: float = 0.5, start: float = 0.5, end: float = 0.9, interrupt: int = 2, seed: int = 0
    ) -> None:
        if not 0.0 < keep <= 1.0:
            raise ValueError(f"keep must be in (0, 1], got {keep}.")
        if not 0.0 <= start < end <= 1.0:
            raise ValueError(f"start and end must satisfy 0 <= start < end <= 1, got start={start}, end={end}.")
        check_number("interrupt", interrupt, at_least=0, integer=True, hint="0: select on every batch.")
        self.keep, self.start, self.end, self.interrupt = keep, start, end, interrupt
        self._generator = torch.Generator().manual_seed(seed)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if math.isinf(trainer.estimated_stepping_batches):
            raise ValueError(
                "SelectiveBackprop's start/end are fractions of training, so the Trainer needs a finite length: "
                "set max_epochs or max_steps."
            )

    def is_active(self, trainer: pl.Trainer, batch_idx: int) -> bool:
        """Whether this batch is selected from: inside the window and not an interrupting full batch."""
        progress = trainer.global_step / trainer.estimated_stepping_batches
        interrupted = self.interrupt > 0 and (batch_idx + 1) % self.interrupt == 0
        return self.start <= progress < self.end and not interrupted

    def before_forward(self, trainer: pl.Trainer, module: pl.LightningModule, batch: TrickBatch) -> TrickBatch:
        if not self.is_active(trainer, trainer.fit_loop.epoch_loop.batch_idx):
            kept = batch
        else:
            with torch.no_grad(), eval_mode(module):
                losses = module.per_sample_loss(module(batch.inputs), batch.targets)
            kept = batch.select(select_by_loss(losses, self.keep, self._generator))
        if logging_due(trainer):
            module.log(self.tag("kept_fraction"), len(kept) / len(batch), batch_size=len(batch))
        return kept

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self._generator.get_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._generator.set_state(state_dict["generator"])
