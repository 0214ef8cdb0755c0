"""The ready-made TrickModule: any backbone that maps inputs to logits."""

from __future__ import annotations

from typing import Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lit_tricks.core.module import TrickModule
from lit_tricks.functional.prior_correction import class_priors, prior_correction
from lit_tricks.metrics.long_tail import long_tail_metrics


class Classifier(TrickModule):
    """A classifier around any ``nn.Module`` that maps inputs to logits, ready for every trick.

    Args:
        backbone: the network, ``inputs -> logits [N, num_classes]``. If it also has ``forward_features``
            and ``forward_head`` (as our ``lit_tricks.nets`` and timm models do), tricks that need
            penultimate features get them without a second forward pass.
        num_classes: number of classes.
        optimizer: a callable ``params -> Optimizer``, e.g. ``functools.partial(torch.optim.SGD, lr=0.1)``;
            in YAML a ``class_path`` with ``init_args``. Default: Adam with lr 1e-3.
        lr_scheduler: optional callable ``optimizer -> LRScheduler``.
        scheduler_interval: step the scheduler every ``"epoch"`` or every ``"step"``.
        scheduler_monitor: the metric ``ReduceLROnPlateau`` watches.
        ece_bins: bins of the expected calibration error.
        on_nonfinite: what a NaN/inf training loss does: ``"warn"`` once and train on, ``"raise"``, or
            ``"skip_step"`` (see :class:`~lit_tricks.TrickModule`).
        loss: ``"cross_entropy"`` or ``"stablemax"`` (StableMax cross-entropy; see :class:`~lit_tricks.TrickModule`).
        many_shot, few_shot: the training-count thresholds of the many-shot (more than ``many_shot``) and few-shot
            (fewer than ``few_shot``) classes (:func:`~lit_tricks.metrics.long_tail.shot_groups`).
        prior_correction: thresholding (Buda et al., 2018): divide the validation, test and predict probabilities
            by the training class frequencies (the counts over their sum) and renormalise
            (:func:`~lit_tricks.functional.prior_correction.prior_correction`), so that the decisions stop leaning
            towards the frequent classes. The counts are the data module's ``train_class_counts`` (the real
            samples of a long-tailed :class:`~lit_tricks.data.ArrayDataModule`), read at ``setup``; the priors
            are the buffer ``class_prior``, saved in checkpoints (a loaded checkpoint's priors replace them).
            Training is unchanged.

    When the data module is long-tailed (it has ``train_class_counts``, e.g. an
    :class:`~lit_tricks.data.ArrayDataModule` with ``imbalance_ratio``), validation and test also log
    ``{stage}/balanced_acc`` (mean per-class recall) and ``{stage}/many_acc``, ``medium_acc``, ``few_acc``.

    Example::

        >>> import lightning as L
        >>> from lit_tricks import Classifier
        >>> from lit_tricks.data import DigitsDataModule
        >>> from lit_tricks.nets import MLP
        >>> model = Classifier(MLP(in_features=64, num_classes=10), num_classes=10)
        >>> trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False,
        ...                     enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(model, DigitsDataModule())
        >>> trainer.callback_metrics["val/acc"] > 0.5
        tensor(True)
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: Literal["epoch", "step"] = "epoch",
        scheduler_monitor: str = "val/nll",
        ece_bins: int = 15,
        on_nonfinite: Literal["warn", "raise", "skip_step"] = "warn",
        loss: Literal["cross_entropy", "stablemax"] = "cross_entropy",
        many_shot: int = 100,
        few_shot: int = 20,
        prior_correction: bool = False,
    ) -> None:
        super().__init__(num_classes=num_classes, ece_bins=ece_bins, on_nonfinite=on_nonfinite, loss=loss)
        if not isinstance(backbone, nn.Module):
            raise TypeError(f"backbone must be a torch.nn.Module, got {type(backbone).__name__}.")
        if scheduler_interval not in ("epoch", "step"):
            raise ValueError(f"scheduler_interval must be 'epoch' or 'step', got {scheduler_interval!r}.")
        if not 0 < few_shot <= many_shot:
            raise ValueError(
                f"the shot thresholds must satisfy 0 < few_shot <= many_shot, got {few_shot}, {many_shot}."
            )
        if not isinstance(prior_correction, bool):
            raise TypeError(f"prior_correction must be True or False, got {prior_correction!r}.")
        self.save_hyperparameters(ignore=["backbone", "optimizer", "lr_scheduler"])
        if prior_correction:  # NaN until setup finds the training counts (or a checkpoint brings them)
            self.register_buffer("class_prior", torch.full((num_classes,), float("nan")))
        self.backbone = backbone
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler

    def forward(self, inputs: Tensor) -> Tensor:
        return self.backbone(inputs)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        counts = getattr(getattr(self._trainer, "datamodule", None), "train_class_counts", None)
        if self.hparams.prior_correction:
            if counts is not None:
                self.class_prior.copy_(class_priors(counts))
            elif stage == "fit":
                raise ValueError(
                    "prior_correction=True needs the training class counts: use a data module with "
                    "train_class_counts (e.g. an ArrayDataModule with imbalance_ratio=...)."
                )
        if counts is not None:
            many, few = self.hparams.many_shot, self.hparams.few_shot
            self.val_metrics.add_metrics(long_tail_metrics(self.num_classes, counts, many, few))
            self.test_metrics.add_metrics(long_tail_metrics(self.num_classes, counts, many, few))

    def eval_probabilities(self, logits: Tensor) -> Tensor:
        probs = super().eval_probabilities(logits)
        return prior_correction(probs, self.class_prior) if self.hparams.prior_correction else probs

    def on_validation_start(self) -> None:
        self._check_priors()

    def on_test_start(self) -> None:
        self._check_priors()

    def on_predict_start(self) -> None:
        self._check_priors()

    def _check_priors(self) -> None:
        """Once per evaluation, after a checkpoint is loaded: the priors must be known."""
        if self.hparams.prior_correction and self.class_prior.isnan().any():
            raise ValueError(
                "prior_correction=True has no class priors: evaluate with a data module that has "
                "train_class_counts, or load a checkpoint trained with prior_correction=True."
            )

    def forward_features(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        if not (hasattr(self.backbone, "forward_features") and hasattr(self.backbone, "forward_head")):
            return super().forward_features(inputs)
        features = self.backbone.forward_features(inputs)
        return self.backbone.forward_head(features), features

    def configure_optimizers(self):
        # None, not Adam, as the default: jsonargparse would carry a default class's arguments (Adam's betas,
        # eps) into another optimizer named in YAML that has arguments of the same names
        optimizer = (self.optimizer or torch.optim.Adam)(self.parameters())
        if self.lr_scheduler is None:
            return optimizer
        scheduler = {
            "scheduler": self.lr_scheduler(optimizer),
            "interval": self.hparams.scheduler_interval,
            "monitor": self.hparams.scheduler_monitor,
        }
        return {"optimizer": optimizer, "lr_scheduler": scheduler}
