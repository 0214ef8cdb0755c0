"""Mixture Outlier Exposure: train on mixtures of in-distribution samples and outliers, with targets that decay from
the label to the uniform distribution as the outlier's share grows."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import numpy as np

from lit_tricks.callbacks.outlier_exposure import OutlierExposure, OutlierSource
from lit_tricks.core.batch import StepOutput, TrickBatch
from lit_tricks.core.checks import check_number
from lit_tricks.core.module import TrickModule
from lit_tricks.core.trick import logging_due
from lit_tricks.functional.losses import soft_target_cross_entropy
from lit_tricks.functional.outlier_exposure import MixOp, mixoe_inputs, mixoe_targets


class MixOE(OutlierExposure):
    r"""Mixture Outlier Exposure (Zhang, Inkawhich, Linderman, Chen & Li, WACV 2023).

    Each step, a batch of outliers :math:`x_{out}` as large as the in-distribution batch is drawn, sample :math:`i`
    is mixed with outlier :math:`i` by one :math:`\lambda \sim \mathrm{Beta}(\alpha, \alpha)` per batch, and the
    mixtures go through the network (a second forward pass) with soft targets that decay linearly towards the uniform
    distribution :math:`u = \mathbf 1 / C`:

    .. math:: \tilde x = \mathrm{mix}_\lambda(x, x_{out}), \qquad \tilde y = \lambda\, y + (1 - \lambda)\, u, \qquad
              \mathcal L = \ell_{CE}(f(x), y) + \beta\, \ell_{CE}(f(\tilde x), \tilde y),

    where ``op="mixup"`` mixes :math:`\lambda x + (1-\lambda) x_{out}` and ``op="cutmix"`` pastes a box of the outlier
    into the in-distribution sample, :math:`\lambda` corrected to the kept area
    (:func:`~lit_tricks.functional.outlier_exposure.mixoe_inputs`). As in the authors' ``train_mixoe.py`` there is no
    plain OE term; the mixed term is logged as ``train/mixoe``. The in-distribution batch is whatever the earlier
    tricks made of it (with :class:`~lit_tricks.Mixup` before it, its mixed inputs and soft targets). Outliers come
    from a seeded, checkpointed :class:`~lit_tricks.callbacks.outlier_exposure.OutlierBatches`; :math:`\lambda` and
    the boxes from a private generator, also checkpointed.

    Args:
        outliers: the auxiliary outliers (:data:`~lit_tricks.callbacks.outlier_exposure.OutlierSource`), shaped like
            the training inputs.
        op: ``"mixup"`` or ``"cutmix"``.
        alpha: :math:`\alpha` of the Beta distribution (authors' default 1.0; their car script: 1.0 for mixup,
            2.0 for cutmix).
        beta: :math:`\beta`, the weight of the mixed term (authors' default 1.0; 5.0 in their car script).
        seed: seed of the outlier order, :math:`\lambda` and the boxes.

    Example::

        >>> import lightning as L
        >>> import torch
        >>> from lit_tricks import Classifier
        >>> from lit_tricks.data import DigitsDataModule
        >>> from lit_tricks.nets import MLP
        >>> trainer = L.Trainer(max_steps=3, callbacks=[MixOE(torch.rand(500, 64))], log_every_n_steps=1, logger=False,
        ...                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(Classifier(MLP(64, 10), num_classes=10), DigitsDataModule())
        >>> 0.0 <= float(trainer.callback_metrics["tricks/MixOE/lam"]) <= 1.0
        True
    """

    tunable = ("alpha", "beta")

    def __init__(
        self, outliers: OutlierSource, op: MixOp = "mixup", alpha: float = 1.0, beta: float = 1.0, seed: int = 0
    ) -> None:
        if op not in ("mixup", "cutmix"):
            raise ValueError(f"op must be 'mixup' or 'cutmix', got {op!r}.")
        check_number("alpha", alpha, above=0.0, hint="The authors use 1.0 (mixup) and 2.0 (cutmix).")
        super().__init__(outliers, beta, None, seed)
        self.op, self.alpha = op, alpha
        self._rng = np.random.default_rng(seed)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self.num_classes = pl_module.num_classes

    def after_loss(self, trainer: pl.Trainer, module: TrickModule, batch: TrickBatch, out: StepOutput) -> StepOutput:
        outliers = self.draw(trainer, batch, len(batch))
        if self.op == "mixup" and not batch.inputs.is_floating_point():
            raise TypeError(f"MixOE(op='mixup') blends inputs, but they are {batch.inputs.dtype}: use float inputs.")
        lam = float(self._rng.beta(self.alpha, self.alpha))
        mixed, lam = mixoe_inputs(batch.inputs.detach(), outliers, lam, self.op, self._rng)
        targets = mixoe_targets(batch.targets, lam, self.num_classes)
        loss = soft_target_cross_entropy(module(mixed), targets).mean()
        out.aux_losses["mixoe"] = self.beta * loss
        if logging_due(trainer):
            module.log(self.tag("lam"), lam, batch_size=len(batch))
            module.log(self.tag("loss"), loss.detach(), batch_size=len(batch))
        return out

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "rng": self._rng.bit_generator.state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._rng.bit_generator.state = state_dict["rng"]
