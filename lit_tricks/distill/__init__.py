"""Teacher-to-student knowledge distillation: teachers, the objective interface and the losses."""

from lit_tricks.distill.base import LOSSES, KDLoss, TeacherLoss, build_loss

__all__ = ["LOSSES", "KDLoss", "TeacherLoss", "build_loss"]
