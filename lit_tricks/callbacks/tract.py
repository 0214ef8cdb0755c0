"""Switch a model's first layer to TrAct at setup, so a YAML snippet turns it on."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from lit_tricks.core.checks import check_number
from lit_tricks.layers.tract import tract


class ApplyTrAct(Callback):
    """TrAct (Petersen et al., NeurIPS 2024): the first layer is trained on its pre-activations.

    At ``setup`` (before the optimizer is built and before a checkpoint is restored) it calls
    :func:`lit_tricks.layers.tract.tract` on the module: the layer becomes its ``TrAct*`` subclass in place, so
    in training its weight gradient is ``dW' = G^T A (A^T A / n + lam I)^-1`` (``A``: the ``n`` input rows or conv
    patches of the batch, ``G``: the gradients of its pre-activations) and whatever optimizer follows uses it.
    Forward, inference, parameters and state-dict keys are unchanged, so checkpoints load with or without it.
    Works with any ``LightningModule``.

    Args:
        lam: the regulariser ``lambda`` (the paper: 0.1 for every model and dataset it reports).
        layer: dotted name of the first layer in the module (e.g. ``"backbone.body.0.0"`` for a
            :class:`~lit_tricks.Classifier` around ``CNN2D``); default: the first ``Linear``/``Conv1d``/``Conv2d``
            in ``named_modules()`` order (registration order; name the layer when the module registers another
            Linear or Conv before the one the input meets first).
    """

    def __init__(self, lam: float = 0.1, layer: str | None = None) -> None:
        check_number("lam", lam, above=0.0, hint="The paper's default is 0.1.")
        if layer is not None and (not isinstance(layer, str) or not layer):
            raise TypeError(f"layer must be the dotted name of a submodule (a str) or None, got {layer!r}.")
        self.lam = lam
        self.layer = layer

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        tract(pl_module, self.lam, self.layer)
