"""MEAL V2: distillation from a teacher ensemble's mean softmax plus a discriminator on the final outputs."""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lit_tricks.core.batch import StepOutput
from lit_tricks.core.checks import check_number
from lit_tricks.core.trick import logging_due
from lit_tricks.distill.base import TeacherLoss
from lit_tricks.functional.distillation import distillation_kl
from lit_tricks.functional.meal_v2 import discriminator_bce, reverse_grad

if TYPE_CHECKING:
    from lit_tricks.distill.teachers import Teacher


def _checked_widths(hidden: tuple[int, int]) -> tuple[int, int]:
    """``hidden`` as a tuple of two positive ints, or a ``ValueError``/``TypeError`` naming ``hidden``."""
    if not isinstance(hidden, (tuple, list)) or len(hidden) != 2:
        raise ValueError(f"hidden must be two widths (h1, h2), e.g. (16, 8), got {hidden!r}.")
    for width in hidden:
        check_number("hidden", width, at_least=1, integer=True)
    return int(hidden[0]), int(hidden[1])


class MEALV2Discriminator(nn.Sequential):
    r"""The authors' discriminator on a ``[N, C]`` output: ``C -> h_1 -> h_2 -> 2`` with a ReLU after every
    layer, the last one included (their 1x1 convolutions on a ``[N, C, 1, 1]`` tensor, which are these
    linear layers). It returns two logits per sample, ``(student, teacher)``.

    Args:
        num_classes: :math:`C`.
        hidden: :math:`(h_1, h_2)`.
        final_relu: the ReLU on the two output logits (the authors' code has it).
    """

    def __init__(self, num_classes: int, hidden: tuple[int, int], final_relu: bool = True) -> None:
        check_number("num_classes", num_classes, at_least=1, integer=True)
        h1, h2 = _checked_widths(hidden)
        layers: list[nn.Module] = [
            nn.Linear(num_classes, h1),
            nn.ReLU(),
            nn.Linear(h1, h2),
            nn.ReLU(),
            nn.Linear(h2, 2),
        ]
        super().__init__(*layers, *([nn.ReLU()] if final_relu else []))


class MEALV2Loss(TeacherLoss):
    r"""MEAL V2 ("MEAL V2: Boosting Vanilla ResNet-50 to 80%+ Top-1 Accuracy on ImageNet without Tricks",
    Shen & Savvides 2020; authors' code ``szq0214/MEAL-V2``): the KD term against the teacher (an ensemble's
    mean softmax) plus the loss of a discriminator :math:`D` that tells the student's final outputs
    :math:`s_i` from the teacher's :math:`t_i`,

    .. math:: \ell_i = T^2\,\mathrm{KL}\big(\sigma(z^t_i/T)\,\|\,\sigma(z^s_i/T)\big)
              + \lambda_D\,\tfrac14 \sum_k \big[\mathrm{BCE}(D(s_i)_k, \delta_{k1})
              + \mathrm{BCE}(D(t_i)_k, \delta_{k2})\big]

    (:func:`~lit_tricks.functional.meal_v2.discriminator_bce`). With :class:`~lit_tricks.Distill`: a list of teachers,
    ``hard_weight=0.0`` (MEAL V2 uses no hard labels) and ``weight=1.0``. At :math:`T = 1` the KL term has the
    gradients of the authors' soft-label cross-entropy (they differ by the teacher's entropy, a constant).

    **How the authors train** :math:`D` (``train.py``, ``loss.py``, ``models/discriminator.py``): its
    parameters are a second parameter group of the student's single SGD optimizer, and one backward of
    ``kd_loss + d_loss`` trains both; the group's ``--d_lr`` is overwritten by the student's learning rate at
    every epoch (``_set_learning_rate`` sets every group), so :math:`D` trains at the student's rate. Here
    :math:`D` is built in :meth:`setup` and lives in this loss, which Distill attaches to the student as
    ``distill_loss``: the student's optimizer holds it (same learning rate, momentum and weight decay) and the
    module's one backward trains it: the same update as the authors'. There the student also *minimises* the
    discriminator's loss (no gradient reversal, no sign flip), which is what ``adversarial=False`` does;
    ``adversarial=True`` puts a gradient reversal (:func:`~lit_tricks.functional.meal_v2.reverse_grad`) on
    the student's outputs, so :math:`D` minimises and the student maximises it (a GAN-style minimax, not in
    the authors' code), still in one backward. The teacher's outputs carry no gradient in either case.

    ``inputs="logits"`` is ``train.py`` (the discriminator sees logits; with one teacher exactly the authors',
    with an ensemble it sees :math:`\log \bar p_t`, the log of the mean softmax the
    :class:`~lit_tricks.distill.Teacher` returns, where the authors feed the mean of the teachers' logits);
    ``inputs="probs"`` is ``FKD_train.py`` (the student's softmax against the teacher's mean softmax).
    :math:`D`'s parameters are saved in the student's checkpoint under ``distill_loss.``.

    Args:
        temperature: :math:`T` of the KD term (MEAL V2: 1).
        d_weight: :math:`\lambda_D` (authors: 1).
        inputs: ``"logits"`` or ``"probs"``, what the discriminator sees.
        hidden: :math:`D`'s hidden widths; ``None``: the authors' ``(C // 8, C // 64)`` (125 and 15 for
            ImageNet's 1000 classes), at least ``(16, 8)`` (their rule gives zero widths for few classes).
        final_relu: the ReLU on :math:`D`'s two logits (the authors'; it keeps them :math:`\ge 0`).
        adversarial: reverse the gradient from :math:`D` into the student.
    """

    def __init__(
        self,
        temperature: float = 1.0,
        d_weight: float = 1.0,
        inputs: Literal["logits", "probs"] = "logits",
        hidden: tuple[int, int] | None = None,
        final_relu: bool = True,
        adversarial: bool = False,
    ) -> None:
        super().__init__()
        check_number("temperature", temperature, above=0.0, hint="MEAL V2 uses 1.")
        check_number("d_weight", d_weight, at_least=0.0, hint="MEAL V2 uses 1.")
        if inputs not in ("logits", "probs"):
            raise ValueError(f"inputs must be 'logits' (authors' train.py) or 'probs' (FKD_train.py), got {inputs!r}.")
        if hidden is not None:
            hidden = _checked_widths(hidden)
        self.temperature, self.d_weight, self.inputs = temperature, d_weight, inputs
        self.hidden, self.final_relu, self.adversarial = hidden, final_relu, adversarial
        self.discriminator: MEALV2Discriminator | None = None
        self._links: tuple[weakref.ref[pl.Trainer], weakref.ref[pl.LightningModule]] | None = None

    def setup(self, trainer: pl.Trainer, module: pl.LightningModule, teacher: Teacher) -> None:
        num_classes = getattr(module, "num_classes", None)
        if not isinstance(num_classes, int):
            raise TypeError(f"MEALV2Loss needs a module with an integer num_classes, got {type(module).__name__}.")
        self._links = (weakref.ref(trainer), weakref.ref(module))  # for logging, without owning either
        if self.discriminator is not None:
            return
        hidden = self.hidden or (max(16, num_classes // 8), max(8, num_classes // 64))
        device = next(module.parameters()).device
        self.discriminator = MEALV2Discriminator(num_classes, hidden, self.final_relu).to(device)

    def forward(
        self, student: StepOutput, teacher_logits: Tensor, teacher_features: Tensor | None, targets: Tensor
    ) -> Tensor:
        if self.discriminator is None:
            raise RuntimeError("MEALV2Loss.setup(trainer, module, teacher) must run before the loss (it builds D).")
        kd = distillation_kl(student.logits, teacher_logits, self.temperature)
        s, t = student.logits, teacher_logits.detach()
        if self.inputs == "probs":
            s, t = s.softmax(dim=-1), t.softmax(dim=-1)
        if self.adversarial:
            s = reverse_grad(s)
        scores = self.discriminator(torch.cat([s, t]))
        student_scores, teacher_scores = scores.chunk(2)
        d_loss = discriminator_bce(student_scores, teacher_scores)
        trainer, module = (link() for link in self._links) if self._links else (None, None)
        if (
            module is not None
            and trainer is not None
            and self.training
            and torch.is_grad_enabled()
            and logging_due(trainer)
        ):
            told = torch.cat([student_scores.argmax(dim=1) == 0, teacher_scores.argmax(dim=1) == 1])
            module.log("tricks/Distill/meal_v2_d_loss", d_loss.detach().mean(), batch_size=len(d_loss))
            module.log("tricks/Distill/meal_v2_d_acc", told.float().mean(), batch_size=len(d_loss))
        return kd + self.d_weight * d_loss

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_links": None}  # weak references do not pickle; setup sets them again

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, d_weight={self.d_weight}, inputs={self.inputs!r}, "
            f"adversarial={self.adversarial}"
        )
