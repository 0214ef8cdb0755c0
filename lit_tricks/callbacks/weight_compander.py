"""Reparametrize a model's Linear/Conv weights with the weight compander at setup, so a YAML snippet turns it on."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from lit_tricks.layers.weight_compander import _check, _companded, weight_compander


class ApplyWeightCompander(Callback):
    """Weight Compander (Cakaj, Mehnert and Yang, 2023) on every ``nn.Linear`` and ``nn.Conv*d`` weight.

    At ``setup`` it calls :func:`lit_tricks.layers.weight_compander.weight_compander`: each weight becomes
    ``w = sign(v) * ((|v| + beta)^alpha - beta^alpha)`` of a free tensor ``v`` (registered with
    ``torch.nn.utils.parametrize``, ``v`` initialised so ``w`` keeps its value). Lightning calls callbacks'
    ``setup`` before ``configure_optimizers`` and before a checkpoint is restored, so the optimizer trains
    ``v`` and checkpoints hold ``...parametrizations.weight.original``. Export plain weights with
    :func:`lit_tricks.layers.weight_compander.remove_weight_compander`. Works with any ``LightningModule``.

    The map and the defaults are not verified against the paper or the authors' code (none was found).

    Args:
        alpha: exponent in ``(0, 1]``; ``1`` is the identity.
        beta: positive offset; the slope at zero is ``alpha * beta^(alpha - 1)``.
    """

    def __init__(self, alpha: float = 0.5, beta: float = 0.01) -> None:
        _check(alpha, beta)
        self.alpha = alpha
        self.beta = beta

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not any(_companded(m) for m in pl_module.modules()):  # a later stage (test after fit) keeps it
            weight_compander(pl_module, self.alpha, self.beta)
