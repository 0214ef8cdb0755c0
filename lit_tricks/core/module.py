"""The LightningModule base class that runs tricks inside its training step."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lit_tricks.core.batch import StepOutput, TrickBatch
from lit_tricks.core.rng import RestoresRNG
from lit_tricks.core.trick import Trick, logging_due
from lit_tricks.functional.losses import soft_target_cross_entropy, weighted_mean
from lit_tricks.functional.stablemax import stablemax_cross_entropy
from lit_tricks.metrics.classification import classification_metrics

_LOSSES = {"cross_entropy": soft_target_cross_entropy, "stablemax": stablemax_cross_entropy}


class TrickModule(RestoresRNG, pl.LightningModule):
    """A classification ``LightningModule`` whose training step runs every :class:`~lit_tricks.Trick`.

    ``training_step`` is: batch -> :class:`~lit_tricks.TrickBatch` -> each trick's ``before_forward`` ->
    forward -> :meth:`per_sample_loss` -> each trick's ``after_loss`` -> weighted mean + auxiliary losses.
    It logs ``train/loss`` (the total) every step; ``train/task_loss`` (the weighted mean), every auxiliary term
    as ``train/<name>`` and ``train/acc`` only on the steps Lightning writes to the loggers (every
    ``log_every_n_steps``) and on each epoch's last step, since a ``self.log`` call costs more than a small
    model's whole step. Validation and test log ``val/acc``, ``val/nll``, ``val/ece`` (``test/...`` likewise)
    through torchmetrics; ``predict_step`` returns class probabilities.

    Subclass it and implement ``forward(inputs) -> logits`` and ``configure_optimizers``; implement
    ``forward_features(inputs) -> (logits, features)`` too if a trick needs features.
    :class:`~lit_tricks.Classifier` is the ready-made subclass that wraps any backbone.

    Batches may be dicts with ``inputs``, ``targets`` and optionally ``index``/``weight`` (other keys reach
    tricks as ``TrickBatch.extras``), or ``(inputs, targets)`` / ``(inputs, targets, index)`` sequences.
    Targets are class ids ``[N]`` or probabilities ``[N, C]``. The first batch of each stage is checked
    against ``num_classes`` and the tricks' needs, with a clear error.

    The checkpoint also holds the global random-number-generator states, restored when training resumes,
    so dropout and other randomness in the model continue exactly as in an uninterrupted run.

    A non-finite training loss (NaN or inf, from the data or a blown-up step) is never silent: it is counted
    (``train/nonfinite_steps``) and, by ``on_nonfinite``, warned about once with its step, raised, or skipped.

    Args:
        num_classes: number of classes ``C``.
        ece_bins: number of equal-width confidence bins of the expected calibration error.
        loss: the per-sample loss: ``"cross_entropy"`` (softmax, soft targets allowed) or ``"stablemax"``
            (StableMax cross-entropy, Prieto et al. 2025, :func:`~lit_tricks.functional.stablemax_cross_entropy`;
            evaluation metrics still read softmax probabilities). A subclass may override :meth:`per_sample_loss`.
        on_nonfinite: what a non-finite training loss does. ``"warn"`` (default): train on, warn once with the
            first such step; on an accelerator counted on the device and read at the logging interval, so it
            costs no host sync.
            ``"raise"``: stop with a ``FloatingPointError`` at that step. ``"skip_step"``: skip that step's
            backward pass and optimizer step (all ranks together under DDP). Both read the loss on the host every
            step (one device synchronisation per step, free on CPU).
    """

    def __init__(
        self,
        num_classes: int,
        ece_bins: int = 15,
        on_nonfinite: Literal["warn", "raise", "skip_step"] = "warn",
        loss: Literal["cross_entropy", "stablemax"] = "cross_entropy",
    ) -> None:
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}.")
        if not isinstance(ece_bins, int) or ece_bins < 1:
            raise ValueError(f"ece_bins must be a positive integer, got {ece_bins!r}.")
        if on_nonfinite not in ("warn", "raise", "skip_step"):
            raise ValueError(f"on_nonfinite must be 'warn', 'raise' or 'skip_step', got {on_nonfinite!r}.")
        if loss not in _LOSSES:
            raise ValueError(f"loss must be one of {sorted(_LOSSES)}, got {loss!r}.")
        self.on_nonfinite, self.loss = on_nonfinite, loss
        # [count of steps with a non-finite loss, first such step or -1], kept on the model's device
        self.register_buffer("_nonfinite", torch.tensor([0, -1]), persistent=False)
        self._nonfinite_warned = False
        self.num_classes = num_classes
        self.val_metrics = classification_metrics(num_classes, "val/", ece_bins)
        self.test_metrics = classification_metrics(num_classes, "test/", ece_bins)
        self._tricks: list[Trick] = []
        self._needs_features = False
        self._checked_stages: set[str] = set()

    # ------------------------------------------------------------------ model interface
    def forward_features(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(logits, features)``; needed only by tricks with ``needs_features = True``."""
        raise NotImplementedError(
            f"A trick needs features, but {type(self).__name__} does not implement forward_features(inputs) "
            "-> (logits, features)."
        )

    def per_sample_loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Loss of each sample ``[N]`` (class ids or probabilities): the ``loss`` chosen at construction."""
        return _LOSSES[self.loss](logits, targets)

    def eval_probabilities(self, logits: Tensor) -> Tensor:
        """The class probabilities ``[N, C]`` validation, test and predict use: the softmax of the logits. A subclass
        may adjust them (``Classifier(prior_correction=True)`` divides them by the training class priors)."""
        return logits.softmax(dim=-1)

    @property
    def tricks(self) -> list[Trick]:
        """The tricks this module runs, in the order it runs them."""
        return self._tricks

    # ------------------------------------------------------------------ lightning hooks
    def setup(self, stage: str) -> None:
        trainer = self._trainer
        callbacks = trainer.callbacks if trainer is not None else []
        # `sorted` is stable, so tricks with equal `order` keep the order of trainer.callbacks.
        self._tricks = sorted((cb for cb in callbacks if isinstance(cb, Trick)), key=lambda trick: trick.order)
        self._needs_features = any(trick.needs_features for trick in self._tricks)
        self._checked_stages.clear()
        data_classes = getattr(getattr(trainer, "datamodule", None), "num_classes", None)
        if isinstance(data_classes, int) and data_classes != self.num_classes:
            raise ValueError(
                f"The data module has {data_classes} classes but {type(self).__name__} was built with "
                f"num_classes={self.num_classes}: make them agree."
            )

    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        tb = TrickBatch.from_batch(batch)
        self._check_first_batch(tb, "train")
        with self._labels_explain_errors(batch):
            return self._training_step(tb)

    def _training_step(self, tb: TrickBatch) -> Tensor | None:
        trainer = self._trainer
        for trick in self._tricks:
            tb = trick.before_forward(trainer, self, tb)
        if self._needs_features:
            logits, features = self.forward_features(tb.inputs)
        else:
            logits, features = self(tb.inputs), None
        out = StepOutput(logits, features, self.per_sample_loss(logits, tb.targets))
        for trick in self._tricks:
            out = trick.after_loss(trainer, self, tb, out)

        task_loss = weighted_mean(out.per_sample_loss, tb.weight)
        loss = sum(out.aux_losses.values(), task_loss)  # no `+ 0` op when there are none
        n = len(tb)
        keep = self._count_nonfinite(loss, trainer.global_step)
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        # The other terms only feed the loggers: log them when Lightning writes, and on an epoch's last step
        # so that callbacks monitoring them at the epoch's end (ModelCheckpoint, EarlyStopping) see them.
        if logging_due(trainer) or trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            logits = logits.detach()
            terms = {"train/acc": (logits.argmax(dim=-1) == tb.hard_targets).float().mean()}
            if out.aux_losses:
                terms["train/task_loss"] = task_loss
                terms.update({f"train/{name}": value for name, value in out.aux_losses.items()})
            terms["train/nonfinite_steps"] = self._nonfinite[0].float()
            self.log_dict(terms, batch_size=n)
            self._warn_nonfinite()
        return loss if keep else None

    def on_train_end(self) -> None:
        self._warn_nonfinite()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, self.val_metrics, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Class probabilities ``[N, C]``; the batch may be a dict, a sequence or a bare input tensor."""
        if isinstance(batch, Mapping):
            inputs = batch["inputs"]
        elif isinstance(batch, Sequence):
            inputs = batch[0]
        else:
            inputs = batch
        return self.eval_probabilities(self(inputs))

    # ------------------------------------------------------------------ helpers
    def _evaluate(self, batch: Any, metrics: torch.nn.Module, stage: str) -> None:
        tb = TrickBatch.from_batch(batch)
        self._check_first_batch(tb, stage)
        probs = self.eval_probabilities(self(tb.inputs).float())
        with self._labels_explain_errors(batch):
            metrics.update(probs, tb.hard_targets)
        self.log_dict(metrics, batch_size=len(tb))

    @contextmanager
    def _labels_explain_errors(self, batch: Any) -> Iterator[None]:
        """Labels are checked on each stage's first batch only (a check costs a host sync); when a later
        batch fails, raise the check's clear ``ValueError`` if its labels are the cause."""
        try:
            yield
        except (IndexError, RuntimeError, ValueError):
            TrickBatch.from_batch(batch).check(self.num_classes)
            raise

    def _count_nonfinite(self, loss: Tensor, step: int) -> bool:
        """Count a non-finite loss; return whether to train on this step (``False`` only for ``skip_step``)."""
        loss = loss.detach()
        on_host = loss.device.type == "cpu" and (self.on_nonfinite == "warn" or self._trainer.world_size == 1)
        if on_host and math.isfinite(loss):
            return True  # the common case, told apart by one read of the host number
        bad = ~torch.isfinite(loss)
        if self.on_nonfinite != "warn" or bad.device.type == "cpu":  # on the CPU reading it is free
            if self._trainer.world_size > 1 and self.on_nonfinite != "warn":
                bad = self.all_gather(bad).any()  # every rank skips or raises together
            if not bad:  # the host synchronisation "raise" and "skip_step" pay on an accelerator
                return True
            if self.on_nonfinite == "raise":
                raise FloatingPointError(
                    f"The training loss is {loss.item()} at step {step}: look for NaN/inf in the inputs or a too "
                    "high learning rate, or pass on_nonfinite='skip_step' (skip such steps) or 'warn' (train on)."
                )
        count, first = self._nonfinite
        count += bad
        first.copy_(torch.where(bad & (first < 0), step, first))
        if self.on_nonfinite == "skip_step":
            self._warn_nonfinite()
        return self.on_nonfinite == "warn"

    def _warn_nonfinite(self) -> None:
        """Warn once, when the count shows a non-finite loss (reads the device count: call it when logging)."""
        if self._nonfinite_warned:
            return
        count, first = self._nonfinite.tolist()
        if count:
            self._nonfinite_warned = True
            action = "those steps were skipped" if self.on_nonfinite == "skip_step" else "training went on"
            rank_zero_warn(
                f"The training loss was not finite (NaN or inf) first at step {first}, {count} step(s) so far; "
                f"{action}. Logged as train/nonfinite_steps; on_nonfinite='raise' stops at the first one."
            )

    def _check_first_batch(self, tb: TrickBatch, stage: str) -> None:
        if stage in self._checked_stages:
            return
        tb.check(self.num_classes)
        if stage == "train" and tb.index is None:
            needing = [type(t).__name__ for t in self._tricks if t.needs_index]
            if needing:
                raise ValueError(
                    f"{', '.join(needing)} keep per-sample memories and need dataset indices, but the batches "
                    "carry no 'index': use a lit_tricks data module, wrap your dataset in "
                    "lit_tricks.data.IndexedDataset, or return (inputs, targets, index)."
                )
        self._checked_stages.add(stage)
