"""Recall@K of image retrieval, the deep-metric-learning evaluation: embeddings accumulated over batches and gathered
over processes, each sample the query against all the others."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat


def recall_at_k(embeddings: Tensor, labels: Tensor, ks: Sequence[int] = (1, 2, 4, 8), chunk: int = 1024) -> Tensor:
    r"""Recall@K ``[len(ks)]``: the fraction of queries with at least one sample of their class among their K nearest
    neighbours by cosine similarity, every sample the query in turn and excluded from its own neighbours (the
    protocol of the DML papers and of the Metrix code's ``evaluate_cos``). Ties go to the lower index.

    Example::

        >>> e = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [0.6, 0.8]])
        >>> recall_at_k(e, torch.tensor([0, 0, 1, 1]), ks=(1, 2))  # 1 and 3 are nearest each other, across classes
        tensor([0.5000, 1.0000], dtype=torch.float64)
    """
    if embeddings.ndim != 2 or labels.shape != embeddings.shape[:1]:
        raise ValueError(
            f"recall_at_k needs embeddings [N, D] and labels [N], got {tuple(embeddings.shape)} and "
            f"{tuple(labels.shape)}."
        )
    n = len(labels)
    if n < 2:
        raise ValueError(f"Recall@K needs at least 2 samples (a query and a neighbour), got {n}.")
    k_max = min(max(ks), n - 1)
    normed = F.normalize(embeddings.double(), dim=1)
    hits = torch.zeros(len(ks), dtype=torch.float64, device=embeddings.device)
    for start in range(0, n, chunk):  # [chunk, N] similarities at a time: memory grows with N, not N^2
        rows = torch.arange(start, min(start + chunk, n), device=embeddings.device)
        sim = normed[rows] @ normed.T
        sim[torch.arange(len(rows)), rows] = -torch.inf  # the query is not its own neighbour
        nearest = sim.topk(k_max, dim=1).indices  # sorted, ties to the lower index
        match = (labels[nearest] == labels[rows].view(-1, 1)).cummax(dim=1).values  # a hit within the first j
        hits += torch.stack([match[:, min(k, k_max) - 1].sum() for k in ks]).double()
    return hits / n


class RecallAtK(Metric):
    """Recall@K (:func:`recall_at_k`) over every batch seen: ``update(embeddings [N, D], labels [N])`` keeps them,
    gathered over processes, so ``compute()`` ranks each sample against the whole evaluation set, exactly under DDP.
    ``compute()`` returns ``{"recall@1": ..., "recall@2": ..., ...}``.

    Args:
        ks: the K values (positive integers), by default 1, 2, 4, 8 (CUB-200 and Cars-196).

    Example::

        >>> metric = RecallAtK(ks=(1, 2))
        >>> metric.update(torch.tensor([[1.0, 0.0], [0.8, 0.6]]), torch.tensor([0, 0]))
        >>> metric.update(torch.tensor([[0.0, 1.0], [0.6, 0.8]]), torch.tensor([1, 1]))
        >>> {k: round(float(v), 2) for k, v in metric.compute().items()}
        {'recall@1': 0.5, 'recall@2': 1.0}
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    def __init__(self, ks: Sequence[int] = (1, 2, 4, 8), **kwargs) -> None:
        super().__init__(**kwargs)
        ks = tuple(ks)
        if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
            raise ValueError(f"ks must be positive integers, e.g. (1, 2, 4, 8), got {ks!r}.")
        self.ks = ks
        self.add_state("embeddings", [], dist_reduce_fx="cat")
        self.add_state("labels", [], dist_reduce_fx="cat")

    def update(self, embeddings: Tensor, labels: Tensor) -> None:
        """Add a batch of embeddings ``[N, D]`` and their class ids ``[N]``."""
        if embeddings.ndim != 2 or labels.shape != embeddings.shape[:1]:
            raise ValueError(
                f"RecallAtK.update needs embeddings [N, D] and labels [N], got {tuple(embeddings.shape)} and "
                f"{tuple(labels.shape)}."
            )
        self.embeddings.append(embeddings.detach().float())
        self.labels.append(labels.detach())

    def compute(self) -> dict[str, Tensor]:
        recalls = recall_at_k(dim_zero_cat(self.embeddings), dim_zero_cat(self.labels), self.ks)
        return {f"recall@{k}": value for k, value in zip(self.ks, recalls, strict=True)}
