"""EnsLoss: train on a fresh random convex, calibrated margin loss every batch."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch

from lit_tricks.core.batch import StepOutput, TrickBatch
from lit_tricks.core.checks import check_number
from lit_tricks.core.trick import Trick
from lit_tricks.functional.ensloss import ensloss_loss, ensloss_margins


class EnsLoss(Trick):
    r"""EnsLoss ("EnsLoss: Stochastic Calibrated Loss Ensembles for Preventing Overfitting in Classification",
    Ben Dai, ICML 2025), following the authors' ``losses.ensLoss``.

    Every batch draws a new convex, classification-calibrated margin loss through its derivatives
    (:func:`~lit_tricks.functional.ensloss.ensloss_derivatives`): :math:`\varepsilon_j \sim \mathcal N(0, 1)`,
    magnitudes :math:`\min(\mathrm{BoxCox}^{-1}_\lambda(\varepsilon_j), 1)` matched in reverse order to the
    sorted margins :math:`s_i = y_i f(x_i)`, divided by :math:`s_i` where :math:`s_i > 1`, minus
    :math:`10^{-6}`, so that

    .. math:: g_i < 0, \qquad s_i \le s_j \Rightarrow g_i \le g_j, \qquad
              \ell_i = \mathrm{sg}(g_i)\, s_i \quad (\partial \ell_i / \partial s_i = g_i).

    It replaces ``StepOutput.per_sample_loss`` (per sample, so loss weights and ELR still compose) and runs
    early among the tricks (``order = -50``) on the model's logits and class-id targets. The per-sample
    values are surrogates with the right gradient, not loss levels: ``train/loss`` falls below 0 once most
    margins are positive.

    The paper is for binary classification and gives no multiclass rule. Two classes: the binary margin
    :math:`y (z_1 - z_0)`. More classes: one-vs-rest, every class column a binary problem with its own draw,
    :math:`\ell_i = \sum_k \mathrm{sg}(g_{ik})\, y_{ik} z_{ik}` (our generalisation). Probability targets
    (Mixup, CutMix, label smoothing) use the expected loss under the label distribution,
    :math:`p\,\phi(z) + (1 - p)\,\phi(-z)`, with one draw for the margins :math:`\pm z` (also ours).

    The draws come from a private generator saved in checkpoints (resume is bit-exact); under DDP every rank
    draws the same numbers and matches them to the ranks of its own batch's margins, as the authors match
    them within a batch.

    Args:
        boxcox_lambda: :math:`\lambda` of the inverse Box-Cox transform of the normal draws; 0 (log-normal
            magnitudes) is what every run of the authors uses, their code draws other values in [-1, 1].
        seed: seed of the private generator.

    Example::

        >>> import lightning as L
        >>> from lit_tricks import Classifier
        >>> from lit_tricks import EnsLoss
        >>> from lit_tricks.data import DigitsDataModule
        >>> from lit_tricks.nets import MLP
        >>> trainer = L.Trainer(max_epochs=1, callbacks=[EnsLoss()], logger=False, enable_checkpointing=False,
        ...                     enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(Classifier(MLP(64, 10), num_classes=10), DigitsDataModule(label_noise=0.4))
        >>> trainer.callback_metrics["train/loss"].isfinite().item()
        True
    """

    order = -50

    def __init__(self, boxcox_lambda: float = 0.0, seed: int = 0) -> None:
        check_number(
            "boxcox_lambda", boxcox_lambda, at_least=-1.0, at_most=1.0, hint="0 (log-normal) is the authors' choice."
        )
        check_number("seed", seed, integer=True)
        self.boxcox_lambda = float(boxcox_lambda)
        self._generator = torch.Generator().manual_seed(seed)

    def after_loss(
        self, trainer: pl.Trainer, module: pl.LightningModule, batch: TrickBatch, out: StepOutput
    ) -> StepOutput:
        margins, weights = ensloss_margins(out.logits, batch.targets)
        noise = torch.randn(margins.shape, generator=self._generator)
        out.per_sample_loss = ensloss_loss(margins, noise, self.boxcox_lambda, weights)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self._generator.get_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._generator.set_state(state_dict["generator"])
