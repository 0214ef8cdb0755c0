"""Dual-Head Knowledge Distillation: a logit-level loss on an auxiliary head, the label loss on the main head."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import lightning.pytorch as pl
from torch import Tensor, nn

from lit_tricks.core.batch import StepOutput
from lit_tricks.core.checks import check_number, classifier_layer
from lit_tricks.distill.base import TeacherLoss
from lit_tricks.functional.kd_losses import binary_kl, binary_kl_norm

if TYPE_CHECKING:
    from lit_tricks.distill.teachers import Teacher

_LOGIT_LOSSES = {"binary_kl_norm": binary_kl_norm, "binary_kl": binary_kl}


class DHKDLoss(TeacherLoss):
    r"""DHKD ("Dual-Head Knowledge Distillation: Enhancing Logits Utilization with an Auxiliary Head",
    Yang et al., arXiv 2411.08937; authors' code ``penghui-yang/DHKD``).

    A logit-level loss and the probability-level loss conflict in one linear classifier (it collapses), but
    not in the backbone. DHKD therefore adds a second, auxiliary head :math:`h_2` on the student's
    penultimate features :math:`f_i`: the main head :math:`h_1` gets only the label loss, the auxiliary
    head only the logit loss against the teacher, and the backbone gets both:

    .. math:: \mathcal L = \gamma\,\mathrm{CE}(h_1(f_i), y_i)
              + \alpha\, T^2 \sum_k \mathrm{KL}\big(\mathrm{Bern}(\tfrac12)\,\|\,
                \mathrm{Bern}(\sigma((h_2(f_i)_k - z^t_{ik})/T))\big)

    (BinaryKL-Norm, :func:`~lit_tricks.functional.binary_kl_norm`). This class is the second term; with
    :class:`~lit_tricks.Distill`, ``hard_weight`` is :math:`\gamma` (the module's cross-entropy on the main
    head) and ``weight`` is :math:`\alpha`. The main head alone predicts at evaluation. The auxiliary head
    is built in :meth:`setup` and lives in this loss, which Distill attaches to the student as
    ``distill_loss``: the student's optimizer trains it and its checkpoints hold it (load such a checkpoint
    into a model with the same Distill loss, or drop the ``distill_loss.`` keys).

    The authors' CIFAR-100 setting is a non-linear head, :math:`T = 2`, :math:`\gamma = \alpha = 1`;
    ImageNet: linear head, :math:`\alpha = 0.1`. Their optional gradient alignment (``--ga``, a PCGrad-like
    projection of the KD gradient) needs one backward pass per loss term and is not built here.

    Args:
        temperature: :math:`T` of the logit loss (the authors' ``--BinaryKL_T``, default 2).
        head: ``"linear"`` or ``"nonlinear"`` (``Linear(d, hidden) -> Dropout -> BatchNorm1d -> ReLU ->
            Linear(hidden, C)``, the authors' ``NonLinearClassifier``).
        logit_loss: ``"binary_kl_norm"`` (the authors' DHKD loss) or ``"binary_kl"`` (the plain BinaryKL).
        in_features: width :math:`d` of the student's features; ``None`` reads it from the student's last
            ``nn.Linear`` with ``num_classes`` outputs.
        hidden: hidden width of the non-linear head (authors: 200).
        dropout: dropout of the non-linear head (authors: 0.1).
    """

    needs_features = True

    def __init__(
        self,
        temperature: float = 2.0,
        head: Literal["linear", "nonlinear"] = "linear",
        logit_loss: Literal["binary_kl_norm", "binary_kl"] = "binary_kl_norm",
        in_features: int | None = None,
        hidden: int = 200,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        check_number("temperature", temperature, above=0.0, hint="The authors use 2.")
        if head not in ("linear", "nonlinear"):
            raise ValueError(f"head must be 'linear' or 'nonlinear', got {head!r}.")
        if logit_loss not in _LOGIT_LOSSES:
            raise ValueError(f"logit_loss must be one of {sorted(_LOGIT_LOSSES)}, got {logit_loss!r}.")
        if in_features is not None:
            check_number("in_features", in_features, at_least=1, integer=True)
        check_number("hidden", hidden, at_least=1, integer=True)
        check_number("dropout", dropout, at_least=0.0, below=1.0)
        self.temperature, self.head, self.logit_loss = temperature, head, logit_loss
        self.in_features, self.hidden, self.dropout = in_features, hidden, dropout
        self.aux_head: nn.Module | None = None

    def setup(self, trainer: pl.Trainer, module: pl.LightningModule, teacher: Teacher) -> None:
        num_classes = getattr(module, "num_classes", None)
        if not isinstance(num_classes, int):
            raise TypeError(f"DHKDLoss needs a module with an integer num_classes, got {type(module).__name__}.")
        if self.aux_head is not None:
            return
        classifier = classifier_layer(module, num_classes)
        width = self.in_features or (classifier[1].in_features if classifier else None)
        if width is None:
            raise ValueError(
                f"DHKDLoss could not find the student's classifier (an nn.Linear with {num_classes} outputs) "
                "to read the feature width from: pass in_features=<width of forward_features' output>."
            )
        if self.head == "linear":
            aux: nn.Module = nn.Linear(width, num_classes)
        else:
            aux = nn.Sequential(
                nn.Linear(width, self.hidden),
                nn.Dropout(self.dropout),
                nn.BatchNorm1d(self.hidden),
                nn.ReLU(),
                nn.Linear(self.hidden, num_classes),
            )
        self.aux_head = aux.to(next(module.parameters()).device)

    def forward(
        self, student: StepOutput, teacher_logits: Tensor, teacher_features: Tensor | None, targets: Tensor
    ) -> Tensor:
        if self.aux_head is None:
            raise RuntimeError(
                "DHKDLoss.setup(trainer, module, teacher) must run before the loss (it builds the head)."
            )
        if student.features is None:
            raise ValueError("DHKDLoss needs the student's features: the module must implement forward_features.")
        aux_logits = self.aux_head(student.features.flatten(1))
        return _LOGIT_LOSSES[self.logit_loss](aux_logits, teacher_logits, self.temperature)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, head={self.head!r}, logit_loss={self.logit_loss!r}"
