"""Bias loss: weight each sample's loss by the variance of its features."""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning.pytorch as pl
import torch

from lit_tricks.core.batch import StepOutput, TrickBatch
from lit_tricks.core.checks import check_number
from lit_tricks.core.trick import Trick, logging_due
from lit_tricks.functional.bias_loss import bias_weights, feature_variance, normalise_variance


class BiasLoss(Trick):
    r"""Bias loss ("Bias Loss for Mobile Neural Networks", Abrahamyan, Ziatchin, Chen, Bochkov & Deligiannis,
    ICCV 2021), following the authors' ``BiasLoss`` (``lusinlu/bias-loss-skipblocknet``, ``bias_loss/biasloss.py``).

    Multiplies each sample's loss by

    .. math:: w_i = \exp(\alpha \hat v_i) - \beta, \qquad
              \hat v_i = \frac{v_i - m}{\max_j v_j - \min_j v_j}, \qquad v_i = \mathrm{Var}(\text{features}_i),

    where the features are the module's ``forward_features`` output (detached), :math:`\max_j, \min_j` run over
    the batch and :math:`m` is, in ``"global"`` mode (the authors' default), the smallest variance seen since
    training began (so :math:`\hat v` may exceed 1), in ``"local"`` mode the batch minimum. The running minimum is
    saved in checkpoints. Under DDP the batch minimum and maximum are those of the global batch (gathered from
    every rank), so every rank keeps the same running minimum and the weights equal a single process's on the
    whole batch. The mean weight is logged as ``tricks/BiasLoss/weight``.

    Args:
        alpha: :math:`\alpha`, the scale of the normalised variance in the exponent (authors: 0.3).
        beta: :math:`\beta`, subtracted from the exponential (authors: 0.3); weights lie in
            :math:`[1 - \beta, e^{\alpha} - \beta]` when :math:`0 \le \hat v \le 1`.
        normalisation: ``"global"`` (running minimum) or ``"local"`` (batch minimum).

    Example::

        >>> import lightning as L
        >>> from lit_tricks import Classifier
        >>> from lit_tricks.callbacks.bias_loss import BiasLoss
        >>> from lit_tricks.data import DigitsDataModule
        >>> from lit_tricks.nets import MLP
        >>> trainer = L.Trainer(max_steps=5, callbacks=[BiasLoss()], logger=False, enable_checkpointing=False,
        ...                     enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(Classifier(MLP(64, 10), num_classes=10), DigitsDataModule())
        >>> trainer.callback_metrics["train/loss"].isfinite().item()
        True
    """

    needs_features = True

    def __init__(
        self, alpha: float = 0.3, beta: float = 0.3, normalisation: Literal["global", "local"] = "global"
    ) -> None:
        check_number("alpha", alpha, at_least=0.0, hint="The authors use 0.3.")
        check_number("beta", beta, below=1.0, hint="The authors use 0.3; beta < 1 keeps every weight positive.")
        if normalisation not in ("global", "local"):
            raise ValueError(
                f"normalisation must be 'global' (running minimum, the authors' default) or 'local' (batch "
                f"minimum), got {normalisation!r}."
            )
        self.alpha, self.beta, self.normalisation = float(alpha), float(beta), normalisation
        self.global_min = torch.tensor(math.inf)

    def after_loss(
        self, trainer: pl.Trainer, module: pl.LightningModule, batch: TrickBatch, out: StepOutput
    ) -> StepOutput:
        variance = feature_variance(out.features)
        extremes = torch.stack([variance.min(), -variance.max()])
        if trainer.world_size > 1:  # the global batch's minimum and maximum, identical on every rank
            extremes = module.all_gather(extremes).reshape(-1, 2).min(dim=0).values
        batch_min, batch_max = extremes[0], -extremes[1]
        if self.normalisation == "global":
            self.global_min = torch.minimum(self.global_min.to(batch_min.device), batch_min)
            low = self.global_min
        else:
            low = batch_min
        weights = bias_weights(normalise_variance(variance, low, batch_min, batch_max), self.alpha, self.beta)
        out.per_sample_loss = weights.to(out.per_sample_loss.dtype) * out.per_sample_loss
        if logging_due(trainer):
            module.log(self.tag("weight"), weights.mean(), batch_size=len(batch))
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"global_min": self.global_min.detach().cpu()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.global_min = state_dict["global_min"].clone()
