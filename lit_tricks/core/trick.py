"""The base class of every technique that shapes the training step."""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import RunningStage

from lit_tricks.core.batch import StepOutput, TrickBatch

if TYPE_CHECKING:
    from lit_tricks.core.module import TrickModule


def log_tag(part: object, name: str) -> str:
    """The logging name of a quantity of a lit_tricks part: ``tricks/<ClassName>/<name>``."""
    return f"tricks/{type(part).__name__}/{name}"


def logging_due(trainer: pl.Trainer) -> bool:
    """Whether Lightning writes this training step's logged values to the loggers.

    A step-level ``self.log`` value reaches TensorBoard only on such steps (every ``log_every_n_steps``
    optimizer steps, a stopping run's last step, every step under ``fast_dev_run``), while each call costs
    more than most tricks' own work, so values that only feed the loggers are logged only then. The answer
    is the same in every hook of one batch, before and after the optimizer step; in training it is worked out
    once per batch, however many tricks ask.
    """
    if trainer.state.stage is not RunningStage.TRAINING:
        return _lightning_writes(trainer)
    batch, stop = trainer.fit_loop.epoch_loop.batch_progress.total.ready, trainer.should_stop
    owner, memo_batch, memo_stop, answer = _memo
    if owner is None or owner() is not trainer or memo_batch != batch or memo_stop != stop:
        answer = _lightning_writes(trainer)
        _memo[:] = [weakref.ref(trainer), batch, stop, answer]
    return answer


_memo: list = [None, -1, False, False]  # (weak reference to the trainer, its training batch, should_stop), answer


def _lightning_writes(trainer: pl.Trainer) -> bool:
    # Lightning's own rule (LoggerConnector.should_update_logs), so the phase always matches its writes.
    return bool(trainer.fast_dev_run) or trainer._logger_connector.should_update_logs


class Trick(Callback):
    """A :class:`~lightning.pytorch.callbacks.Callback` that may also change the training step.

    A :class:`~lit_tricks.TrickModule` calls, inside its ``training_step``, every trick's
    :meth:`before_forward` (to change inputs, targets or weights) and :meth:`after_loss` (to change the
    per-sample loss or add named loss terms), in the order of ``order`` and then of ``trainer.callbacks``.
    Both default to doing nothing, so a trick overrides only what it needs.

    Class attributes a subclass sets:
        order: lower runs first (e.g. a trick that mixes targets runs before one that distils towards them).
        needs_index: the trick keeps a per-sample memory, so batches must carry dataset indices.
        needs_features: the trick reads ``StepOutput.features``; the module then calls ``forward_features``.
        works_without_trick_module: the trick can act through plain Lightning hooks, so a plain
            ``LightningModule`` is allowed.
        tunable: attributes read afresh every step, which Population Based Training (:mod:`lit_tricks.tune`)
            may change mid-run (any callback may declare it).

    Example::

        class ScaleLoss(Trick):
            def __init__(self, factor: float) -> None:
                self.factor = factor

            def after_loss(self, trainer, module, batch, out):
                out.per_sample_loss = out.per_sample_loss * self.factor
                return out

        trainer = L.Trainer(callbacks=[ScaleLoss(0.5)])
    """

    order: int = 0
    needs_index: bool = False
    needs_features: bool = False
    works_without_trick_module: bool = False
    tunable: tuple[str, ...] = ()

    def before_forward(self, trainer: pl.Trainer, module: TrickModule, batch: TrickBatch) -> TrickBatch:
        """Change the batch before the forward pass; return it (or a new one)."""
        return batch

    def after_loss(self, trainer: pl.Trainer, module: TrickModule, batch: TrickBatch, out: StepOutput) -> StepOutput:
        """Change the per-sample loss or add ``out.aux_losses[name]``; return ``out``."""
        return out

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Check that the module can run this trick; subclasses that override ``setup`` call ``super()``."""
        from lit_tricks.core.module import TrickModule

        if not self.works_without_trick_module and not isinstance(pl_module, TrickModule):
            raise TypeError(
                f"{type(self).__name__} shapes the training step, so the LightningModule must subclass "
                f"lit_tricks.TrickModule (got {type(pl_module).__name__}). Use lit_tricks.Classifier(backbone=...) "
                "or subclass TrickModule and implement forward()."
            )

    def tag(self, name: str) -> str:
        """The logging name of a quantity: ``tricks/<ClassName>/<name>``, e.g. ``module.log(self.tag("lam"), lam)``.

        (Lightning overwrites a callback's ``log`` attribute with the module's ``log``, so tricks log through
        the module.)
        """
        return log_tag(self, name)
