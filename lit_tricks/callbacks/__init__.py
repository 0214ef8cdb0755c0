"""Callbacks and tricks: one file per technique."""

from lit_tricks.callbacks.ema_teacher import EMATeacher
from lit_tricks.callbacks.mixup import CutMix, Mixup
from lit_tricks.callbacks.self_distill import SelfDistill

__all__ = ["CutMix", "EMATeacher", "Mixup", "SelfDistill"]
