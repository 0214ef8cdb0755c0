"""The interface of a teacher-to-student distillation objective, the name registry, and Hinton's KD."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

import lightning.pytorch as pl
from torch import Tensor, nn

from lit_tricks.core.batch import StepOutput
from lit_tricks.core.checks import check_number
from lit_tricks.functional.distillation import distillation_kl

if TYPE_CHECKING:
    from lit_tricks.distill.teachers import Teacher


class TeacherLoss(nn.Module):
    """One distillation objective, given the student's step output and the teacher's outputs on the same inputs.

    :class:`~lit_tricks.Distill` attaches it to the student at setup as ``module.distill_loss``, so its
    learnable parts (projections, extra heads) are trained by the student's optimizer and saved in the
    student's checkpoint, and its buffers (e.g. class means) are restored on resume. A loss built by name is
    constructed as ``cls(temperature=...)``, so every registered class accepts that keyword.

    Class attributes a subclass sets:
        needs_features: the student's penultimate features (``StepOutput.features``) are needed.
        needs_teacher_features: the teacher's penultimate features are needed (``teacher_features`` is given).
        replaces_hard_loss: the term already holds the hard-label loss (e.g. on another head), so Distill
            drops the module's per-sample cross-entropy instead of weighting it by ``hard_weight``.
    """

    needs_features: bool = False
    needs_teacher_features: bool = False
    replaces_hard_loss: bool = False

    def setup(self, trainer: pl.Trainer, module: pl.LightningModule, teacher: Teacher) -> None:
        """Prepare (infer widths, build heads or projections, compute teacher statistics).

        Runs in the setup of every stage, before the optimizer is built and before a checkpoint is restored, so
        that a student's checkpoint loads with the loss's state; work only training needs (e.g. a pass over the
        training set) checks ``trainer.state.fn``. The teacher is on the training device only when fitting.
        """

    def forward(
        self, student: StepOutput, teacher_logits: Tensor, teacher_features: Tensor | None, targets: Tensor
    ) -> Tensor:
        """The per-sample term ``[N]``, already scaled by its own factors (e.g. :math:`T^2`), not by ``weight``.

        ``targets`` are the batch's targets (class ids ``[N]`` or probabilities ``[N, C]``, e.g. after Mixup).
        """
        raise NotImplementedError(f"{type(self).__name__} must implement forward().")


class KDLoss(TeacherLoss):
    r"""Hinton et al. (2015): :math:`T^2\,\mathrm{KL}\big(\sigma(z_t/T)\,\|\,\sigma(z_s/T)\big)` per sample.

    Args:
        temperature: the softmax temperature :math:`T`.
    """

    def __init__(self, temperature: float = 4.0) -> None:
        super().__init__()
        check_number("temperature", temperature, above=0.0)
        self.temperature = temperature

    def forward(
        self, student: StepOutput, teacher_logits: Tensor, teacher_features: Tensor | None, targets: Tensor
    ) -> Tensor:
        return distillation_kl(student.logits, teacher_logits, self.temperature)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"


#: Loss names accepted by ``Distill(loss=...)``, each the import path of its :class:`TeacherLoss` class.
LOSSES: dict[str, str] = {
    "kd": "lit_tricks.distill.base.KDLoss",
    "nd": "lit_tricks.distill.nd.NDLoss",
    "dhkd": "lit_tricks.distill.dhkd.DHKDLoss",
    "tgeo": "lit_tricks.distill.tgeo.TGeoLoss",
    "meal_v2": "lit_tricks.distill.meal_v2.MEALV2Loss",
}


def check_loss_name(name: str) -> None:
    """Raise a ``ValueError`` naming the registered losses unless ``name`` is one of them."""
    if name not in LOSSES:
        raise ValueError(
            f"loss must be one of {sorted(LOSSES)} or a lit_tricks.distill.TeacherLoss instance, got {name!r}."
        )


def build_loss(name: str, temperature: float | None = None) -> TeacherLoss:
    """Construct the registered loss ``name`` as ``cls(temperature=temperature)``, or with the loss's own
    (the authors') default temperature when ``temperature`` is None."""
    check_loss_name(name)
    module_name, _, class_name = LOSSES[name].rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls() if temperature is None else cls(temperature=temperature)
