"""Callbacks and tricks: one file per technique."""

from lit_tricks.callbacks.elr import ELR
from lit_tricks.callbacks.ema_teacher import EMATeacher
from lit_tricks.callbacks.mixup import CutMix, Mixup
from lit_tricks.callbacks.sample_reweighting import SampleReweighting
from lit_tricks.callbacks.self_distill import SelfDistill

__all__ = ["ELR", "CutMix", "EMATeacher", "Mixup", "SampleReweighting", "SelfDistill"]
