"""ND: knowledge distillation with the student's feature norm and direction regularised (KD++)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor, nn

from lit_tricks.core.batch import StepOutput, TrickBatch
from lit_tricks.core.checks import check_number
from lit_tricks.core.eval_mode import eval_mode
from lit_tricks.distill.base import TeacherLoss
from lit_tricks.functional.distillation import distillation_kl
from lit_tricks.functional.teacher_kd import class_mean_directions, nd_loss

if TYPE_CHECKING:
    from lit_tricks.distill.teachers import Teacher


def _emb_trans(student_width: int, teacher_width: int) -> nn.Sequential:
    """The authors' ``EmbTrans`` projection of student features to the teacher's width (Linear bias 0)."""
    linear = nn.Linear(student_width, teacher_width)
    nn.init.zeros_(linear.bias)
    return nn.Sequential(nn.BatchNorm1d(student_width), nn.Dropout(0.5), linear)


class NDLoss(TeacherLoss):
    r"""KD++ of "Improving Knowledge Distillation via Regularizing Feature Norm and Direction" (Wang et al.,
    2023): Hinton's KD plus the ND term on penultimate features,

    .. math:: \ell_i = \lambda_{kd}\,T^2\,\mathrm{KL}\big(\sigma(z^t_i/T)\,\|\,\sigma(z^s_i/T)\big)
              + \lambda_{nd}\Big(1 - \frac{\langle s_i, \hat e_{y_i}\rangle}{\max(\|s_i\|_2, \|t_i\|_2)}\Big),

    :math:`\hat e_c` the unit mean of the teacher's features of class :math:`c` over the training set
    (computed once at setup, teacher in eval mode, from ``trainer.datamodule.train_dataloader()``; a buffer,
    so saved with the student). When the student's feature width differs from the teacher's, :math:`s_i` is
    the student's features through the authors' ``EmbTrans`` projection,
    ``BatchNorm1d -> Dropout(0.5) -> Linear`` (bias 0), trained with the student and used only by this term.

    Args:
        temperature: :math:`T` of the KD part (paper: 4).
        kd_weight: :math:`\lambda_{kd}` (paper: 1 to 4 per pair; 0 leaves the ND term alone).
        nd_weight: :math:`\lambda_{nd}` (paper: 0.5 to 2 per pair).
    """

    needs_features = True
    needs_teacher_features = True

    def __init__(self, temperature: float = 4.0, kd_weight: float = 1.0, nd_weight: float = 1.0) -> None:
        super().__init__()
        check_number("temperature", temperature, above=0.0)
        check_number("kd_weight", kd_weight, at_least=0.0)
        check_number("nd_weight", nd_weight, at_least=0.0)
        self.temperature, self.kd_weight, self.nd_weight = temperature, kd_weight, nd_weight
        self.projection: nn.Module = nn.Identity()
        self.register_buffer("directions", torch.empty(0))

    @torch.no_grad()
    def setup(self, trainer: pl.Trainer, module: pl.LightningModule, teacher: Teacher) -> None:
        if trainer.state.fn != TrainerFn.FITTING:
            return  # evaluating a trained student: the directions and projection come from its checkpoint
        datamodule = trainer.datamodule
        if datamodule is None:
            raise ValueError(
                "NDLoss computes the teacher's class means over the training set at setup, so it needs the data "
                "as a LightningDataModule: trainer.fit(model, datamodule=...)."
            )
        num_classes = module.num_classes
        sums = counts = None
        student_width = None
        device = next(iter(teacher.models[0].parameters()), torch.empty(0)).device
        with torch.random.fork_rng(devices=[]):  # a shuffling loader draws from the global RNG: keep the run's
            for raw in datamodule.train_dataloader():
                batch = TrickBatch.from_batch(raw)
                inputs, labels = batch.inputs.to(device), batch.hard_targets.to(device)
                _, features = teacher(inputs, features=True)
                if sums is None:
                    sums = features.new_zeros(num_classes, features.shape[1])
                    counts = torch.zeros(num_classes, dtype=torch.long, device=device)
                    with eval_mode(module):
                        _, student_features = module.forward_features(inputs[:2].to(module.device))
                    student_width = student_features.shape[1]
                sums.index_add_(0, labels, features)
                counts += torch.bincount(labels, minlength=num_classes)
        if sums is None:
            raise ValueError("NDLoss found no batch in the training dataloader to compute the class means from.")
        self.directions = class_mean_directions(sums, counts).to(module.device)
        teacher_width = sums.shape[1]
        same = student_width == teacher_width
        self.projection = nn.Identity() if same else _emb_trans(student_width, teacher_width).to(module.device)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # outside a fit (validate/test from a checkpoint) setup has not run: take the shapes the checkpoint holds
        directions = state_dict.get(prefix + "directions")
        if directions is not None and directions.shape != self.directions.shape:
            self.directions = torch.empty_like(directions, device=self.directions.device)
        weight = state_dict.get(prefix + "projection.2.weight")
        if weight is not None and not isinstance(self.projection, nn.Sequential):
            self.projection = _emb_trans(weight.shape[1], weight.shape[0]).to(self.directions.device)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def forward(
        self, student: StepOutput, teacher_logits: Tensor, teacher_features: Tensor | None, targets: Tensor
    ) -> Tensor:
        if self.directions.numel() == 0:
            raise RuntimeError("NDLoss was not set up: use it through lit_tricks.Distill(loss='nd').")
        term = self.nd_weight * nd_loss(self.projection(student.features), teacher_features, self.directions, targets)
        if self.kd_weight:
            term = term + self.kd_weight * distillation_kl(student.logits, teacher_logits, self.temperature)
        return term

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, kd_weight={self.kd_weight}, nd_weight={self.nd_weight}"
