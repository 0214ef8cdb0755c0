"""Teacher-to-student knowledge distillation: teachers, the objective interface and the losses."""

from lit_tricks.distill.base import LOSSES, KDLoss, TeacherLoss, build_loss
from lit_tricks.distill.dhkd import DHKDLoss
from lit_tricks.distill.meal_v2 import MEALV2Loss
from lit_tricks.distill.nd import NDLoss
from lit_tricks.distill.teachers import Teacher, load_teacher
from lit_tricks.distill.tgeo import TGeoLoss

__all__ = [
    "LOSSES",
    "DHKDLoss",
    "KDLoss",
    "MEALV2Loss",
    "NDLoss",
    "TGeoLoss",
    "Teacher",
    "TeacherLoss",
    "build_loss",
    "load_teacher",
]
