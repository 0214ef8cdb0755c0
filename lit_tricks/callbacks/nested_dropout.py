"""Put nested dropout before a module's head at setup, so a YAML snippet turns it on."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from lit_tricks.core.trick import logging_due
from lit_tricks.layers.nested_dropout import Distribution, NestedDropout, nested_dropout


class ApplyNestedDropout(Callback):
    """Nested dropout on the penultimate features (Chen et al., "Compressing Features for Learning with Noisy
    Labels", TNNLS 2022), the first stage of their recipe.

    At ``setup`` (before the optimizer is built and before a checkpoint is restored) it calls
    :func:`lit_tricks.layers.nested_dropout`: the module's ``head`` becomes
    ``nn.Sequential(NestedDropout(...), head)``. In each training step one ``k ~ P(k) ∝ exp(-(k / std)^2)`` on
    ``1..D`` is drawn and the features' units ``k..D-1`` are zeroed before the head (no rescaling); evaluation
    keeps every unit, or the first ``eval_units``. Works with any ``LightningModule`` whose forward calls the
    ``head`` submodule on the features (``backbone.head`` for a :class:`~lit_tricks.Classifier` around our nets).
    The generator state lives in the model's state dict, so this callback holds no state of its own.

    Args:
        std: width of the half-Gaussian over kept units (the authors: 10 for 10 classes, 100 for 14-100 classes).
        distribution: ``"gaussian"`` (the authors' code) or ``"geometric"`` (Rippel et al., with ``p``).
        p: parameter of the geometric distribution.
        per_sample: one ``k`` per sample instead of one per batch (the authors: per batch).
        eval_units: units kept in eval mode (``None``: all); pick it with
            :func:`lit_tricks.layers.truncation_accuracy` on clean validation data, as the authors do.
        seed: seed of the layer's private generator (``None``: the global one).
        head: dotted name of the layers after the features, called by the module's forward.
    """

    def __init__(
        self,
        std: float = 10.0,
        distribution: Distribution = "gaussian",
        p: float = 0.1,
        per_sample: bool = False,
        eval_units: int | None = None,
        seed: int | None = None,
        head: str = "backbone.head",
    ) -> None:
        if not isinstance(head, str) or not head:
            raise TypeError(f"head must be the dotted name of a submodule, e.g. 'backbone.head', got {head!r}.")
        self._settings: dict[str, Any] = dict(
            std=std, distribution=distribution, p=p, per_sample=per_sample, eval_units=eval_units, seed=seed
        )
        NestedDropout(**self._settings)  # validates the arguments now, not at setup
        self.head = head
        self._layer: NestedDropout | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        nested_dropout(pl_module, head=self.head, **self._settings)
        self._layer = pl_module.get_submodule(self.head)[0]

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if logging_due(trainer) and self._layer is not None and self._layer.last_units is not None:
            kept = self._layer.last_units.float().mean()
            pl_module.log("tricks/NestedDropout/kept_units", kept, on_step=True, on_epoch=False)
