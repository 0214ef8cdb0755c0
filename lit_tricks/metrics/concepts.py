"""Concept metrics ("Concept-Based Explainable Artificial Intelligence: Metrics and Benchmarks", Aysel et al.,
2025): global importance (CGIM), existence (CEM) and location (CLM), as torchmetrics ``Metric`` subclasses whose
states are sums, so DDP gives the values of the whole evaluation set. The math is in
:mod:`lit_tricks.functional.concept_metrics`; :class:`~lit_tricks.callbacks.concept_metrics.ConceptMetrics` feeds
them from any concept model."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor
from torchmetrics import Metric

from lit_tricks.core.checks import check_number
from lit_tricks.functional import concept_metrics as cmf

Variant = Literal["weights", "mean_prediction", "weighted"]
VARIANTS = ("weights", "mean_prediction", "weighted")


def _check_rows(name: str, tensor: Tensor, n: int, width: int | None = None) -> None:
    if tensor.shape[0] != n or (width is not None and (tensor.ndim != 2 or tensor.shape[1] != width)):
        wanted = f"[{n}, {width}]" if width is not None else f"{n} rows"
        raise ValueError(f"{name} must be {wanted}, got shape {tuple(tensor.shape)}.")


class ConceptGlobalImportance(Metric):
    r"""CGIM: per concept :math:`j`, the cosine :math:`\phi(\Theta(j,:), V(j,:))` between the concept's importance
    for each class and its ground-truth presence in each class (:func:`~lit_tricks.functional.concept_metrics.
    concept_global_importance`). :math:`V` is the fraction of each class's evaluated samples with the concept;
    :math:`\Theta` is, by ``variant``:

    - ``"weights"`` (CGIM1): :math:`\theta`, the mean over the evaluated samples of
      :math:`\partial z_k / \partial \hat u_j` (exactly the head's weights for a linear head);
    - ``"mean_prediction"`` (CGIM2): :math:`\hat U^*`, each class's mean concept activation over its correctly
      classified samples (needs no head, so it works on any model that outputs concept probabilities);
    - ``"weighted"`` (CGIM3): :math:`\theta \odot \hat U^*`.

    ``update(activations [N, L], concepts [N, L], logits [N, K], targets [N], jacobian [N, L, K] | None)``;
    ``compute()`` returns the mean over the concepts whose cosine is defined (``average="macro"``) or the ``[L]``
    vector (``average="none"``; ``nan`` for a concept never present or never important).

    Example::

        >>> metric = ConceptGlobalImportance(2, 2, variant="mean_prediction")
        >>> metric.update(torch.tensor([[0.9, 0.1], [0.2, 0.7]]), torch.tensor([[1., 0.], [0., 1.]]),
        ...               torch.tensor([[2., 0.], [0., 2.]]), torch.tensor([0, 1]))
        >>> round(metric.compute().item(), 4)  # mean of cos((.9, .2), (1, 0)) and cos((.1, .7), (0, 1))
        0.9831
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(
        self,
        n_concepts: int,
        n_classes: int,
        variant: Variant = "weights",
        average: Literal["macro", "none"] = "macro",
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        check_number("n_concepts", n_concepts, at_least=1, integer=True)
        check_number("n_classes", n_classes, at_least=2, integer=True)
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS} (CGIM1, CGIM2, CGIM3), got {variant!r}.")
        if average not in ("macro", "none"):
            raise ValueError(
                f"average must be 'macro' (mean over concepts) or 'none' (one per concept), got {average!r}."
            )
        self.n_concepts, self.n_classes, self.variant, self.average = n_concepts, n_classes, variant, average
        shape = (n_concepts, n_classes)
        self.add_state("concept_sum", default=torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("class_count", default=torch.zeros(n_classes, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("activation_sum", default=torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("correct_count", default=torch.zeros(n_classes, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("jacobian_sum", default=torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("samples", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(
        self, activations: Tensor, concepts: Tensor, logits: Tensor, targets: Tensor, jacobian: Tensor | None = None
    ) -> None:
        n = activations.shape[0]
        _check_rows("activations", activations, n, self.n_concepts)
        _check_rows("concepts", concepts, n, self.n_concepts)
        _check_rows("logits", logits, n, self.n_classes)
        _check_rows("targets", targets, n)
        if jacobian is None and self.variant != "mean_prediction":
            raise ValueError(
                f"variant={self.variant!r} needs the jacobian dz/du [N, L, K] of the task head; pass it, or use "
                "variant='mean_prediction', which needs no head."
            )
        targets = targets.long()
        correct = logits.argmax(dim=-1) == targets
        self.concept_sum += self._class_sums(concepts, targets)
        self.class_count += torch.bincount(targets, minlength=self.n_classes)
        self.activation_sum += self._class_sums(activations[correct], targets[correct])
        self.correct_count += torch.bincount(targets[correct], minlength=self.n_classes)
        if jacobian is not None:
            if jacobian.shape != (n, self.n_concepts, self.n_classes):
                raise ValueError(
                    f"jacobian must be [{n}, {self.n_concepts}, {self.n_classes}], got {tuple(jacobian.shape)}."
                )
            self.jacobian_sum += jacobian.double().sum(dim=0)
            self.samples += n

    def _class_sums(self, values: Tensor, targets: Tensor) -> Tensor:
        sums = values.new_zeros(self.n_classes, self.n_concepts, dtype=torch.float64)
        return sums.index_add_(0, targets, values.double()).T

    def importance(self) -> Tensor:
        r""":math:`\Theta` ``[L, K]`` of this ``variant`` from the states so far."""
        mean_correct = self.activation_sum / self.correct_count.clamp(min=1)
        if self.variant == "mean_prediction":
            return mean_correct
        theta = self.jacobian_sum / self.samples.clamp(min=1)
        return theta if self.variant == "weights" else theta * mean_correct

    def compute(self) -> Tensor:
        v = self.concept_sum / self.class_count.clamp(min=1)
        rho = cmf.concept_global_importance(self.importance(), v).float()
        return rho if self.average == "none" else rho.nanmean()


class _TopConceptMetric(Metric):
    """A mean of per-sample scores over the evaluated (optionally: correctly classified) samples."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, top_l: int = 1, correct_only: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        check_number("top_l", top_l, at_least=1, integer=True, hint="(the number of top concepts per sample)")
        if not isinstance(correct_only, bool):
            raise TypeError(f"correct_only must be True or False, got {correct_only!r}.")
        self.top_l, self.correct_only = top_l, correct_only
        self.add_state("score_sum", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def _add(self, scores: Tensor, keep: Tensor, logits: Tensor | None, targets: Tensor | None) -> None:
        if self.correct_only:
            if logits is None or targets is None:
                raise ValueError("correct_only=True needs logits and targets in update().")
            keep = keep & (logits.argmax(dim=-1) == targets)
        self.score_sum += scores[keep].double().sum()
        self.count += keep.sum()

    def compute(self) -> Tensor:
        return (self.score_sum / self.count).float() if self.count > 0 else torch.tensor(float("nan"))


class ConceptExistence(_TopConceptMetric):
    r"""CEM: the fraction of each sample's ``top_l`` most important concepts (by ``importance``, e.g. the local
    importance :math:`\theta_{jk}\hat u_{ij}` for the predicted class :math:`k`) that are present in the sample,
    averaged over samples (only the correctly classified ones if ``correct_only``; the paper reports both).

    ``update(importance [N, L], concepts [N, L], logits [N, K] | None, targets [N] | None)``.

    Example::

        >>> metric = ConceptExistence(top_l=1)
        >>> metric.update(torch.tensor([[0.9, 0.1], [0.2, 0.7]]), torch.tensor([[1., 0.], [1., 0.]]))
        >>> metric.compute()
        tensor(0.5000)
    """

    def update(
        self, importance: Tensor, concepts: Tensor, logits: Tensor | None = None, targets: Tensor | None = None
    ) -> None:
        if importance.ndim != 2 or concepts.shape != importance.shape:
            raise ValueError(
                f"importance and concepts must both be [N, L], got {tuple(importance.shape)} and "
                f"{tuple(concepts.shape)}."
            )
        scores = cmf.concept_existence(importance, concepts, self.top_l)
        self._add(scores, torch.ones_like(scores, dtype=torch.bool), logits, targets)


class ConceptLocation(_TopConceptMetric):
    r"""CLM: for the ``top_l`` most important concepts **present** in each sample, the fraction whose ground-truth
    point lies in the :math:`\lceil\alpha HW/12\rceil` most activated pixels of the concept's map
    (:func:`~lit_tricks.functional.concept_metrics.concept_location`), averaged over samples with a located
    concept (only correctly classified ones if ``correct_only``). A random map scores about :math:`\alpha / 12`.

    ``update(importance [N, L], maps [N, L, H, W], points [N, L, 2], logits | None, targets | None)``.

    Args:
        top_l: concepts per sample (the paper: 1, 3, 5).
        alpha: region size :math:`\alpha` in twelfths of the image (the paper varies it; 1 here).
        correct_only: only correctly classified samples.
    """

    def __init__(self, top_l: int = 1, alpha: float = 1.0, correct_only: bool = False, **kwargs) -> None:
        super().__init__(top_l, correct_only, **kwargs)
        check_number("alpha", alpha, above=0.0, at_most=12.0, hint="(the region is alpha/12 of the image)")
        self.alpha = alpha

    def update(
        self,
        importance: Tensor,
        maps: Tensor,
        points: Tensor,
        logits: Tensor | None = None,
        targets: Tensor | None = None,
    ) -> None:
        scores, valid = cmf.concept_location(importance, maps, points, self.top_l, self.alpha)
        self._add(scores, valid, logits, targets)
