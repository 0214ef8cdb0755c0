"""Switch a model's BatchNorm layers to Ghost BatchNorm at setup, so a YAML snippet turns it on."""

from __future__ import annotations

from typing import Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch.nn.modules.batchnorm import _BatchNorm

from lit_tricks.core.checks import check_number
from lit_tricks.layers.ghost_batch_norm import ghost_batch_norm


class ApplyGhostBatchNorm(Callback):
    """Ghost Batch Normalization (Hoffer et al., NeurIPS 2017) on every ``BatchNorm1d/2d/3d`` of the module.

    At ``setup`` (before the optimizer is built and before a checkpoint is restored) it calls
    :func:`lit_tricks.layers.ghost_batch_norm`: in training each BatchNorm normalises chunks of
    ``virtual_batch_size`` samples with their own statistics, ``y = (x - mu_g) / sqrt(var_g + eps) * w + b``,
    and updates its running statistics once per chunk; evaluation is unchanged. Parameters, buffers and
    state-dict keys stay those of the BatchNorm layers, so checkpoints load with or without it.
    Works with any ``LightningModule``.

    Args:
        virtual_batch_size: samples per ghost batch (the paper: 128 on MNIST, 256 on CIFAR/ImageNet, with
            batches of 4096 and 2048 and more).
        if_missing: what a module without BatchNorm does: ``"raise"`` a ``ValueError`` (default) or ``"warn"``
            and train on unchanged (for a snippet stacked on any recipe).
    """

    def __init__(self, virtual_batch_size: int = 32, if_missing: Literal["raise", "warn"] = "raise") -> None:
        check_number("virtual_batch_size", virtual_batch_size, at_least=1, integer=True)
        if if_missing not in ("raise", "warn"):
            raise ValueError(f"if_missing must be 'raise' or 'warn', got {if_missing!r}.")
        self.virtual_batch_size = virtual_batch_size
        self.if_missing = if_missing

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.if_missing == "warn" and not any(isinstance(m, _BatchNorm) for m in pl_module.modules()):
            rank_zero_warn(
                f"ApplyGhostBatchNorm: {type(pl_module).__name__} has no BatchNorm layer, so training runs "
                "unchanged; use a network with BatchNorm (e.g. lit_tricks.nets.CNN2D) for Ghost BatchNorm."
            )
            return
        ghost_batch_norm(pl_module, self.virtual_batch_size)
