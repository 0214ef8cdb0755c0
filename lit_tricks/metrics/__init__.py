"""torchmetrics ``Metric`` subclasses, correct under DDP by construction."""

from lit_tricks.metrics.classification import NegativeLogLikelihood, classification_metrics

__all__ = ["NegativeLogLikelihood", "classification_metrics"]
