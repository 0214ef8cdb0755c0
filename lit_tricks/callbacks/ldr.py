"""LDR-KL and ALDR-KL: label distributionally robust losses in place of the cross-entropy."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Literal

import lightning.pytorch as pl
import torch

from lit_tricks.core.batch import StepOutput, TrickBatch
from lit_tricks.core.checks import check_number
from lit_tricks.core.sample_table import SampleTable, TableDevice, check_table_options
from lit_tricks.core.trick import Trick, logging_due
from lit_tricks.functional.ldr import aldr_kl_loss, aldr_lambdas, ldr_kl_loss, ldr_logits


class LDRLoss(Trick):
    r"""LDR-KL and ALDR-KL ("Label Distributionally Robust Losses for Multi-class Classification: Consistency,
    Robustness and Adaptivity", Zhu, Ying & Yang, ICML 2023), following the authors' ``LDRLoss_V1`` and
    ``ALDRLoss_V1`` (``DixianZhu/LDR``, ``loss.py``).

    Replaces ``StepOutput.per_sample_loss`` by

    .. math:: \ell_i = \lambda \log \frac1C \sum_k \exp\!\Big(\frac{c\,[k \ne y_i] + z_{ik} - z_{iy_i}}{\lambda}\Big)

    on the scores :math:`z = \mathrm{softplus}(\text{logits})` divided by their mean over classes
    (:func:`~lit_tricks.functional.ldr.ldr_logits`). With ``adaptive=True`` (ALDR-KL) every training sample has its
    own :math:`\lambda_i`, updated each time the sample is seen (:func:`~lit_tricks.functional.ldr.aldr_lambdas`)
    from the KL divergence to uniform of :math:`\mathrm{softmax}(z_i/\lambda_i)`:
    :math:`\lambda_i \leftarrow \lambda_0 - \lambda_0 \mathrm{KL}_i / (\alpha \log C)`, and the loss adds the
    constant :math:`-\frac{\alpha\log C}{2\lambda_0}(\lambda_i - \lambda_0)^2`. The :math:`\lambda_i` live in a
    table indexed by dataset index (batches must carry ``index``), filled from every rank under DDP and saved in
    checkpoints; their batch mean is logged as ``tricks/LDRLoss/lambda``.

    Runs early among the tricks (``order = -50``), so loss weights and added terms compose with it.

    Args:
        lam: :math:`\lambda` (LDR-KL) or :math:`\lambda_0` (ALDR-KL); the authors pick it from {0.1, 1, 10} by
            5-fold cross-validation.
        margin: :math:`c`, the margin added to every non-label class (authors: 0.1).
        adaptive: ALDR-KL's per-sample :math:`\lambda_i`.
        alpha: :math:`\alpha > 1` of ALDR-KL (authors: 2); :math:`\lambda_i` stays above
            :math:`\lambda_0(1 - 1/\alpha)`.
        softplus: apply softplus to the logits first; ``None``: the authors' choice, on for LDR-KL, off for ALDR-KL
            (they turn it on for CIFAR-100).
        normalise: divide the scores by :math:`\lVert z \rVert_1 / C` (the authors always do).
        table_dtype, table_device, num_samples: storage of the :math:`\lambda_i` table (see ``ELR``).

    Example::

        >>> import lightning as L
        >>> from lit_tricks import Classifier
        >>> from lit_tricks.callbacks.ldr import LDRLoss
        >>> from lit_tricks.data import DigitsDataModule
        >>> from lit_tricks.nets import MLP
        >>> trainer = L.Trainer(max_steps=5, callbacks=[LDRLoss(adaptive=True)], logger=False,
        ...                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(Classifier(MLP(64, 10), num_classes=10), DigitsDataModule(label_noise=0.4))
        >>> trainer.callback_metrics["train/loss"].isfinite().item()
        True
    """

    order = -50

    def __init__(
        self,
        lam: float = 1.0,
        margin: float = 0.1,
        adaptive: bool = False,
        alpha: float = 2.0,
        softplus: bool | None = None,
        normalise: bool = True,
        table_dtype: Literal["float32", "float16"] = "float32",
        table_device: TableDevice = "module",
        num_samples: int | None = None,
    ) -> None:
        check_number("lam", lam, above=0.0, hint="The authors choose it from {0.1, 1, 10} by cross-validation.")
        check_number("margin", margin, at_least=0.0, hint="The authors use 0.1.")
        check_number("alpha", alpha, above=1.0, hint="ALDR-KL needs alpha > 1 to keep every lambda_i positive; 2.")
        for name, value in (("adaptive", adaptive), ("normalise", normalise)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be True or False, got {value!r}.")
        if softplus is not None and not isinstance(softplus, bool):
            raise TypeError(f"softplus must be True, False or None (the authors' choice), got {softplus!r}.")
        check_table_options(table_dtype, table_device, num_samples)
        self.lam, self.margin, self.adaptive, self.alpha = float(lam), float(margin), adaptive, float(alpha)
        self.softplus = (not adaptive) if softplus is None else softplus
        self.normalise = normalise
        self.needs_index = adaptive
        self.lambdas = SampleTable(getattr(torch, table_dtype), table_device, num_samples) if adaptive else None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.lambdas is not None:  # one column per sample (SampleTable sizes its rows by module.num_classes)
            one_column = SimpleNamespace(num_classes=1, device=pl_module.device, all_gather=pl_module.all_gather)
            self.lambdas.allocate(trainer, one_column, owner="LDRLoss")

    def after_loss(
        self, trainer: pl.Trainer, module: pl.LightningModule, batch: TrickBatch, out: StepOutput
    ) -> StepOutput:
        z = ldr_logits(out.logits, self.softplus, self.normalise)
        if self.lambdas is None:
            out.per_sample_loss = ldr_kl_loss(z, batch.targets, self.lam, self.margin)
            return out
        previous = self.lambdas.read(batch.index, default=self.lam)[:, 0]
        lambdas = aldr_lambdas(z, previous, self.lam, self.alpha)
        self.lambdas.write(module, batch.index, lambdas[:, None])
        out.per_sample_loss = aldr_kl_loss(z, batch.targets, lambdas, self.lam, self.alpha, self.margin)
        if logging_due(trainer):
            module.log(self.tag("lambda"), lambdas.mean(), batch_size=len(batch))
            module.log(self.tag("nonfinite"), self.lambdas.nonfinite.float())
        return out

    def state_dict(self) -> dict[str, Any]:
        return self.lambdas.state_dict() if self.lambdas is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.lambdas is not None:
            self.lambdas.load_state_dict(state_dict)
