"""Early-learning regularisation: keep the model near its own early predictions, which noisy labels have not yet
corrupted."""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
import torch

from lit_tricks.core.batch import StepOutput, TrickBatch
from lit_tricks.core.checks import check_number
from lit_tricks.core.sample_table import SampleTable, TableDevice, check_table_options
from lit_tricks.core.trick import Trick, logging_due
from lit_tricks.functional.elr import elr_penalty, elr_probabilities, elr_targets


class ELR(Trick):
    r"""ELR ("Early-Learning Regularization Prevents Memorization of Noisy Labels", Liu et al., NeurIPS 2020).

    Networks fit the clean labels first and memorise the wrong ones later. ELR keeps, for every training
    sample, a running average of the model's predictions and adds a term that keeps the model close to it:

    .. math:: t_i \leftarrow \beta t_i + (1 - \beta)\,\hat p_i, \qquad
              \mathcal L = \frac1N \sum_i \mathrm{CE}(z_i, y_i)
                         + \lambda\,\frac1N \sum_i \log(1 - \langle t_i, p_i \rangle),

    with :math:`p_i = \mathrm{clamp}(\sigma(z_i), 10^{-4}, 1 - 10^{-4})`, :math:`\hat p_i` its renormalised
    copy without gradient, and :math:`t_i` starting at 0 (as in the authors' code). The targets live in a
    table indexed by dataset index (batches must carry ``index``), filled from all ranks under DDP and saved
    in checkpoints; a target that is not finite is never stored (``tricks/ELR/nonfinite`` counts them).

    The regulariser is the log of a number below 1, so it is never positive: it is logged as
    ``train/elr_log_regulariser`` and makes ``train/loss`` (task loss plus regulariser) smaller than
    ``train/task_loss``, even negative.

    Args:
        beta: :math:`\beta`, the momentum of the targets (paper: 0.7 for CIFAR-10, 0.9 for CIFAR-100).
        lam: :math:`\lambda`, the weight of the regulariser (paper: 3 for CIFAR-10, 7 for CIFAR-100).
        table_dtype: ``"float32"`` or ``"float16"`` storage of the targets.
        table_device: ``"module"`` (the model's device) or ``"cpu"`` (host memory) for the targets.
        num_samples: rows of the table (``None``: the index range of the training set).

    Example::

        >>> import lightning as L
        >>> from lit_tricks import ELR, Classifier
        >>> from lit_tricks.data import DigitsDataModule
        >>> from lit_tricks.nets import MLP
        >>> elr = ELR(beta=0.7, lam=3.0)
        >>> trainer = L.Trainer(max_epochs=1, callbacks=[elr], logger=False, enable_checkpointing=False,
        ...                     enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(Classifier(MLP(64, 10), num_classes=10), DigitsDataModule(label_noise=0.4))
        >>> float(trainer.callback_metrics["train/elr_log_regulariser"]) <= 0.0
        True
    """

    tunable = ("beta", "lam")  # PBT may change these mid-run (lit_tricks.tune)

    needs_index = True

    def __init__(
        self,
        beta: float = 0.7,
        lam: float = 3.0,
        table_dtype: Literal["float32", "float16"] = "float32",
        table_device: TableDevice = "module",
        num_samples: int | None = None,
    ) -> None:
        check_number("beta", beta, at_least=0.0, below=1.0, hint="The paper uses 0.7 (CIFAR-10) or 0.9 (CIFAR-100).")
        check_number("lam", lam, at_least=0.0, hint="The paper uses 3 (CIFAR-10) or 7 (CIFAR-100).")
        check_table_options(table_dtype, table_device, num_samples)
        self.beta, self.lam = beta, lam
        self.targets = SampleTable(getattr(torch, table_dtype), table_device, num_samples)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.targets.allocate(trainer, pl_module, owner="ELR")

    def after_loss(
        self, trainer: pl.Trainer, module: pl.LightningModule, batch: TrickBatch, out: StepOutput
    ) -> StepOutput:
        probs = elr_probabilities(out.probabilities())
        previous = self.targets.read(batch.index)  # 0 where never written, as in the authors' code
        targets = elr_targets(previous, probs, self.beta)
        self.targets.write(module, batch.index, targets)
        out.aux_losses["elr_log_regulariser"] = self.lam * elr_penalty(probs, targets).mean()
        if logging_due(trainer):
            module.log(self.tag("nonfinite"), self.targets.nonfinite.float())
        return out

    def state_dict(self) -> dict[str, Any]:
        return self.targets.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.targets.load_state_dict(state_dict)
