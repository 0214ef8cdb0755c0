"""Callbacks and tricks: one file per technique."""

from lit_tricks.callbacks.ema_teacher import EMATeacher

__all__ = ["EMATeacher"]
