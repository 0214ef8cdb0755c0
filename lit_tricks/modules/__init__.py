"""LightningModules: one file per family."""

from lit_tricks.modules.classifier import Classifier
from lit_tricks.modules.concept_bottleneck import (
    ConceptBottleneckModel,
    ConceptEmbeddingModel,
    PostHocCBM,
    SparseCBM,
)
from lit_tricks.modules.consistency import ConsistencyModel
from lit_tricks.modules.edm import EDMDiffusion
from lit_tricks.modules.generative import GenerativeModule
from lit_tricks.modules.tta import RMT, AdaNPC, BNAdapt, EcoTTA, Tent, TTAModule

__all__ = [
    "Classifier",
    "ConceptBottleneckModel",
    "ConceptEmbeddingModel",
    "ConsistencyModel",
    "EDMDiffusion",
    "GenerativeModule",
    "PostHocCBM",
    "SparseCBM",
    "TTAModule",
    "AdaNPC",
    "BNAdapt",
    "EcoTTA",
    "RMT",
    "Tent",
]
