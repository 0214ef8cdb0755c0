"""Classification metrics: accuracy, negative log-likelihood and expected calibration error."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError


class NegativeLogLikelihood(Metric):
    r"""Mean negative log-likelihood :math:`-\frac{1}{N}\sum_i \log p_{i, y_i}` of predicted probabilities.

    ``update(probs, target)`` takes probabilities ``[N, C]`` (as the other metrics of
    :func:`classification_metrics` do) and class ids ``[N]``; probabilities are clamped at the smallest
    positive float, so the NLL of a sample is at most about 87 in float32. Sums and counts are reduced over
    processes, so the value is exact under DDP.
    """

    is_differentiable = True
    higher_is_better = False
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, probs: Tensor, target: Tensor) -> None:
        picked = probs.gather(1, target.unsqueeze(1)).squeeze(1)
        self.total += -picked.clamp_min(torch.finfo(picked.dtype).tiny).log().sum().double()
        self.count += target.numel()

    def compute(self) -> Tensor:
        return (self.total / self.count).float()


def classification_metrics(num_classes: int, prefix: str, ece_bins: int = 15) -> MetricCollection:
    """``{prefix}acc``, ``{prefix}nll`` and ``{prefix}ece`` (top-label ECE with ``ece_bins`` equal-width
    bins, Guo et al. 2017), all updated with ``(probs [N, C], class ids [N])``."""
    return MetricCollection(
        {
            "acc": MulticlassAccuracy(num_classes=num_classes, average="micro"),
            "nll": NegativeLogLikelihood(),
            "ece": MulticlassCalibrationError(num_classes=num_classes, n_bins=ece_bins, norm="l1"),
        },
        prefix=prefix,
    )
