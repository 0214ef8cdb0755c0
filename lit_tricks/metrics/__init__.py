"""torchmetrics ``Metric`` subclasses, correct under DDP by construction."""

from lit_tricks.metrics.classification import NegativeLogLikelihood, classification_metrics
from lit_tricks.metrics.concepts import ConceptExistence, ConceptGlobalImportance, ConceptLocation
from lit_tricks.metrics.long_tail import ClassGroupAccuracy, long_tail_metrics, shot_groups
from lit_tricks.metrics.neural_collapse import NeuralCollapseMetrics
from lit_tricks.metrics.ood import OODAUROC, FPRAtTPR, fpr_at_tpr, ood_auroc
from lit_tricks.metrics.retrieval import RecallAtK, recall_at_k
from lit_tricks.metrics.sample_quality import (
    EnergyDistance,
    FrechetDistance,
    KernelInceptionDistance,
    MaximumMeanDiscrepancy,
    SlicedWasserstein,
    digits_features,
)

__all__ = [
    "ClassGroupAccuracy",
    "ConceptExistence",
    "ConceptGlobalImportance",
    "ConceptLocation",
    "EnergyDistance",
    "FPRAtTPR",
    "FrechetDistance",
    "KernelInceptionDistance",
    "MaximumMeanDiscrepancy",
    "NegativeLogLikelihood",
    "NeuralCollapseMetrics",
    "OODAUROC",
    "RecallAtK",
    "SlicedWasserstein",
    "classification_metrics",
    "digits_features",
    "fpr_at_tpr",
    "long_tail_metrics",
    "ood_auroc",
    "recall_at_k",
    "shot_groups",
]
