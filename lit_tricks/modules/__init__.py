"""LightningModules: one file per family."""

from lit_tricks.modules.classifier import Classifier

__all__ = ["Classifier"]
