"""Neural collapse metrics (NC1-NC4) of penultimate features, accumulated in one pass and exact under DDP."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from lit_tricks.core.checks import check_number
from lit_tricks.functional.neural_collapse import class_means, cosines, nearest_class_centre, neural_collapse


class NeuralCollapseMetrics(Metric):
    """NC1-NC4 (Papyan, Han & Donoho, 2020; :mod:`lit_tricks.functional.neural_collapse`) of penultimate features.

    ``update(features [N, D], targets [N], logits [N, C])`` sums, in float64, the per-class counts, the per-class
    feature sums and the total second moment (``sum_i h_i h_i^T``), from which NC1-NC3 follow without a second pass;
    the sums are added over processes, so the values are exact under DDP. NC4 compares each sample with the
    final class means, so the features (float32) and the network's predictions are also kept (``N x D`` floats,
    gathered over processes). Set :attr:`weight` (the classifier's ``[C, D]`` weight) before ``compute()`` to add
    the classifier's NC2 terms and NC3. Classes without samples are left out of every term; with fewer than two
    classes present every value is NaN.

    ``compute()`` returns a dict of scalars: ``nc1``, ``nc2_equinorm_means``, ``nc2_cos_std_means``,
    ``nc2_equiangular_means``, ``nc4_ncc_agreement`` and, with :attr:`weight`, ``nc2_equinorm_classifier``,
    ``nc2_cos_std_classifier``, ``nc2_equiangular_classifier``, ``nc3_self_duality``. It also keeps the cosines
    of the centred class means (and of the classifier rows) of the present classes in :attr:`mean_cosines`
    (:attr:`classifier_cosines`), for a figure.

    Example::

        >>> metric = NeuralCollapseMetrics(num_classes=3, num_features=2)
        >>> etf = torch.tensor([[1.0, 0.0], [-0.5, 3**0.5 / 2], [-0.5, -(3**0.5) / 2]])
        >>> targets = torch.arange(3).repeat(4)
        >>> metric.update(etf[targets], targets, etf[targets] @ etf.T)
        >>> values = metric.compute()
        >>> round(float(values["nc1"]), 6), float(values["nc4_ncc_agreement"])
        (0.0, 1.0)
    """

    full_state_update = False
    is_differentiable = False

    def __init__(self, num_classes: int, num_features: int, **kwargs) -> None:
        super().__init__(**kwargs)
        check_number("num_classes", num_classes, at_least=2, integer=True)
        check_number("num_features", num_features, at_least=1, integer=True)
        self.num_classes, self.num_features = num_classes, num_features
        f64 = torch.float64
        self.add_state("counts", torch.zeros(num_classes, dtype=f64), dist_reduce_fx="sum")
        self.add_state("sums", torch.zeros(num_classes, num_features, dtype=f64), dist_reduce_fx="sum")
        self.add_state("second_moment", torch.zeros(num_features, num_features, dtype=f64), dist_reduce_fx="sum")
        self.add_state("features", [], dist_reduce_fx="cat")
        self.add_state("predictions", [], dist_reduce_fx="cat")
        self.weight: Tensor | None = None
        self.mean_cosines: Tensor | None = None
        self.classifier_cosines: Tensor | None = None

    def update(self, features: Tensor, targets: Tensor, logits: Tensor) -> None:
        """Add a batch: penultimate ``features [N, D]``, class ids ``targets [N]``, the network's ``logits [N, C]``."""
        if features.ndim != 2 or features.shape[1] != self.num_features:
            raise ValueError(f"features must be [N, {self.num_features}], got {tuple(features.shape)}.")
        if targets.shape != features.shape[:1] or logits.shape != (features.shape[0], self.num_classes):
            raise ValueError(
                f"targets must be [N] class ids and logits [N, {self.num_classes}] for features [N, D], got "
                f"{tuple(targets.shape)} and {tuple(logits.shape)}."
            )
        h = features.detach().double()
        targets = targets.long()
        self.counts += torch.bincount(targets, minlength=self.num_classes).to(self.counts.dtype)
        self.sums.index_add_(0, targets, h)
        self.second_moment += h.T @ h
        self.features.append(features.detach().float())
        self.predictions.append(logits.detach().argmax(dim=1))

    def compute(self) -> dict[str, Tensor]:
        present = self.counts > 0
        if int(present.sum()) < 2:
            keys = ["nc1", "nc2_equinorm_means", "nc2_cos_std_means", "nc2_equiangular_means", "nc4_ncc_agreement"]
            if self.weight is not None:
                keys += ["nc2_equinorm_classifier", "nc2_cos_std_classifier", "nc2_equiangular_classifier"]
                keys.append("nc3_self_duality")
            return {key: torch.tensor(float("nan"), device=self.counts.device) for key in keys}
        counts, sums = self.counts[present], self.sums[present]
        weight = None
        if self.weight is not None:
            if self.weight.shape != (self.num_classes, self.num_features):
                raise ValueError(
                    f"weight must be the classifier's [num_classes, num_features] = "
                    f"[{self.num_classes}, {self.num_features}] weight, got {tuple(self.weight.shape)}."
                )
            weight = self.weight.detach().to(sums)[present]
        values = neural_collapse(counts, sums, self.second_moment, weight)
        means, mu_g = class_means(counts, sums)
        self.mean_cosines = cosines(means - mu_g)
        self.classifier_cosines = cosines(weight) if weight is not None else None
        nearest = torch.nonzero(present).squeeze(1)[nearest_class_centre(dim_zero_cat(self.features), means)]
        values["nc4_ncc_agreement"] = (nearest == dim_zero_cat(self.predictions)).double().mean()
        return values
