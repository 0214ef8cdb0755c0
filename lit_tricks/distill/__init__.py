"""Teacher-to-student knowledge distillation: teachers, the objective interface and the losses."""

from lit_tricks.distill.base import LOSSES, KDLoss, TeacherLoss, build_loss
from lit_tricks.distill.nd import NDLoss
from lit_tricks.distill.teachers import Teacher, load_teacher

__all__ = ["LOSSES", "KDLoss", "NDLoss", "Teacher", "TeacherLoss", "build_loss", "load_teacher"]
