"""Out-of-distribution detection metrics: AUROC and the false-positive rate at 95% true-positive rate, from scores
accumulated over batches and gathered over processes (exact under DDP)."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from lit_tricks.core.checks import check_number


def _roc_counts(id_scores: Tensor, ood_scores: Tensor) -> tuple[Tensor, Tensor]:
    """True and false positives (in-distribution is positive) at each distinct score, thresholds descending:
    ``tps[k]``, ``fps[k]`` count the ID and OOD scores at or above the k-th highest distinct score."""
    scores = torch.cat([id_scores, ood_scores]).double()
    positive = torch.cat(
        [torch.ones_like(id_scores, dtype=torch.float64), torch.zeros_like(ood_scores, dtype=torch.float64)]
    )
    order = torch.sort(scores, descending=True, stable=True).indices
    scores, positive = scores[order], positive[order]
    last_of_value = torch.ones_like(scores, dtype=torch.bool)
    last_of_value[:-1] = scores[1:] != scores[:-1]
    tps = positive.cumsum(0)[last_of_value]
    fps = (1 - positive).cumsum(0)[last_of_value]
    return tps, fps


def _check_scores(id_scores: Tensor, ood_scores: Tensor) -> None:
    if id_scores.numel() == 0 or ood_scores.numel() == 0:
        raise ValueError(
            f"OOD metrics need in-distribution and OOD scores, got {id_scores.numel()} and {ood_scores.numel()}."
        )


def ood_auroc(id_scores: Tensor, ood_scores: Tensor) -> Tensor:
    r"""The area under the ROC curve of telling in-distribution (positive, higher score) from OOD samples: the
    probability that a random ID sample scores above a random OOD one, ties counting one half (sklearn's
    ``roc_auc_score``, which the OE code calls). Swapping the roles and negating the scores gives the same value.

    Example::

        >>> ood_auroc(torch.tensor([0.9, 0.8, 0.4]), torch.tensor([0.5, 0.1]))  # 5 of 6 pairs ordered
        tensor(0.8333, dtype=torch.float64)
    """
    _check_scores(id_scores, ood_scores)
    tps, fps = _roc_counts(id_scores.flatten(), ood_scores.flatten())
    tpr = torch.cat([tps.new_zeros(1), tps / tps[-1]])
    fpr = torch.cat([fps.new_zeros(1), fps / fps[-1]])
    return torch.trapezoid(tpr, fpr)


def fpr_at_tpr(id_scores: Tensor, ood_scores: Tensor, tpr: float = 0.95) -> Tensor:
    r"""FPR@95TPR: the fraction of OOD samples accepted at the threshold that keeps ``tpr`` of the in-distribution
    samples (those scoring at or above it).

    As ``fpr_and_fdr_at_recall`` of the OE code (hendrycks/outlier-exposure, ``utils/display_results.py``) with the
    in-distribution samples as positives (as MixOE's evaluation and later OOD work take them): among the distinct
    score thresholds up to the first that keeps every ID sample, the one whose ID recall is nearest ``tpr``; of two
    equally near, the lower threshold.

    Example::

        >>> ids = torch.arange(1.0, 21.0)  # keeping 19 of 20 ID scores (95%) means threshold 2
        >>> fpr_at_tpr(ids, torch.tensor([0.5, 2.5, 30.0]))  # OOD 2.5 and 30 pass it
        tensor(0.6667, dtype=torch.float64)
    """
    _check_scores(id_scores, ood_scores)
    tps, fps = _roc_counts(id_scores.flatten(), ood_scores.flatten())
    last = int(torch.searchsorted(tps, tps[-1]))  # the first threshold that keeps every ID sample
    gap = (tps[: last + 1] / tps[-1] - tpr).abs()
    nearest = last - int(torch.argmin(gap.flip(0)))  # argmin takes the first: from the end, the lowest threshold
    return fps[nearest] / fps[-1]


class _OODScores(Metric):
    """Accumulates in-distribution scores (higher: more in-distribution) and whether each sample is OOD."""

    full_state_update = False
    is_differentiable = False
    higher_is_better: bool

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("scores", [], dist_reduce_fx="cat")
        self.add_state("ood", [], dist_reduce_fx="cat")

    def update(self, scores: Tensor, ood: Tensor | bool) -> None:
        """Add a batch: scores ``[N]`` (e.g. :func:`~lit_tricks.functional.outlier_exposure.ood_score`) and whether
        each sample is OOD, a bool ``[N]`` or one bool for the whole batch."""
        if scores.ndim != 1:
            raise ValueError(f"scores must be [N], one per sample, got shape {tuple(scores.shape)}.")
        ood = torch.as_tensor(ood, device=scores.device).bool().expand(scores.shape)
        self.scores.append(scores.detach().double())
        self.ood.append(ood.clone())

    def _split(self) -> tuple[Tensor, Tensor]:
        scores, ood = dim_zero_cat(self.scores), dim_zero_cat(self.ood)
        return scores[~ood], scores[ood]


class OODAUROC(_OODScores):
    """AUROC of in-distribution vs OOD samples by their scores (:func:`ood_auroc`), exact under DDP (the scores are
    gathered, so ``compute()`` sees every rank's samples).

    Example::

        >>> metric = OODAUROC()
        >>> metric.update(torch.tensor([0.9, 0.8, 0.4]), False)
        >>> metric.update(torch.tensor([0.5, 0.1]), True)
        >>> metric.compute()
        tensor(0.8333, dtype=torch.float64)
    """

    higher_is_better = True

    def compute(self) -> Tensor:
        return ood_auroc(*self._split())


class FPRAtTPR(_OODScores):
    """The fraction of OOD samples accepted at ``tpr`` (0.95: FPR@95TPR) of in-distribution samples kept
    (:func:`fpr_at_tpr`), exact under DDP.

    Args:
        tpr: the fraction of in-distribution samples the threshold keeps.
    """

    higher_is_better = False

    def __init__(self, tpr: float = 0.95, **kwargs) -> None:
        super().__init__(**kwargs)
        check_number("tpr", tpr, above=0.0, at_most=1.0, hint="E.g. FPRAtTPR(tpr=0.95).")
        self.tpr = tpr

    def compute(self) -> Tensor:
        return fpr_at_tpr(*self._split(), self.tpr)
