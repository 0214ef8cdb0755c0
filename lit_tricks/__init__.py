"""lit_tricks: training techniques from recent deep-learning papers as PyTorch Lightning parts."""

from lit_tricks.callbacks import (
    ELR,
    ContinualEvaluation,
    CutMix,
    DataDietScores,
    EMATeacher,
    ExperienceReplay,
    Mixup,
    SampleReweighting,
    SelectiveBackprop,
    SelfDistill,
)
from lit_tricks.core import StepOutput, Trick, TrickBatch, TrickModule
from lit_tricks.modules import (
    Classifier,
    ConceptBottleneckModel,
    ConceptEmbeddingModel,
    ConsistencyModel,
    PostHocCBM,
)
from lit_tricks.modules.tta import RMT, AdaNPC, BNAdapt, EcoTTA, Tent

__version__ = "0.1.0"

__all__ = [
    "AdaNPC",
    "BNAdapt",
    "Classifier",
    "ConceptBottleneckModel",
    "ConceptEmbeddingModel",
    "ConsistencyModel",
    "ContinualEvaluation",
    "CutMix",
    "DataDietScores",
    "EcoTTA",
    "ELR",
    "EMATeacher",
    "ExperienceReplay",
    "Mixup",
    "PostHocCBM",
    "RMT",
    "SampleReweighting",
    "SelectiveBackprop",
    "SelfDistill",
    "StepOutput",
    "Tent",
    "Trick",
    "TrickBatch",
    "TrickModule",
]
