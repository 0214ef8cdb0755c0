"""LightningModules: one file per family."""

from lit_tricks.modules.classifier import Classifier
from lit_tricks.modules.consistency import ConsistencyModel
from lit_tricks.modules.edm import EDMDiffusion
from lit_tricks.modules.generative import GenerativeModule

__all__ = ["Classifier", "ConsistencyModel", "EDMDiffusion", "GenerativeModule"]
