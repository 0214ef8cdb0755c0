"""Metrix ("It Takes Two to Tango: Mixup for Deep Metric Learning", Venkataramanan et al., ICLR 2022): the pairs to
mix, their generalised labels, and the contrastive and multi-similarity losses on mixed embeddings."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from lit_tricks.functional.metric_losses import avg_nonzero, pair_masks, soft_hinge
from lit_tricks.functional.mixing import mixup_


def metrix_pairs(
    labels: Tensor, rng: np.random.Generator, sim: Tensor | None = None, top_k: int | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    r"""The anchors and the pairs Metrix mixes, ``(anchor, first, second)`` ``[M]`` each (indices into the batch).

    For every anchor :math:`a` and each of its negatives :math:`n` (or its ``top_k`` hardest: the most similar by
    ``sim``), the mixed sample is :math:`\lambda x_{\text{first}} + (1-\lambda) x_n` with ``first`` a positive of
    :math:`a` drawn uniformly from ``rng`` (positive-negative mixing), or :math:`a` itself when the batch holds no
    positive of :math:`a` (anchor-negative mixing), as the authors' two branches do.

    Example::

        >>> a, first, second = metrix_pairs(torch.tensor([0, 0, 1]), np.random.default_rng(0))
        >>> a.tolist(), first.tolist(), second.tolist()  # anchor 2 has no positive: it mixes with itself
        ([0, 1, 2, 2], [1, 0, 2, 2], [2, 2, 0, 1])
    """
    pos, neg = pair_masks(labels)
    if top_k is not None:
        if sim is None:
            raise ValueError("top_k needs sim, the [N, N] similarities that rank the negatives.")
        ranked = torch.where(neg, sim, -torch.inf)
        k = min(top_k, len(labels))
        hardest = torch.zeros_like(neg).scatter_(1, ranked.topk(k, dim=1).indices, True)
        neg = neg & hardest
    draw = torch.as_tensor(rng.random(pos.shape), dtype=torch.float32, device=labels.device)
    chosen = torch.where(pos, draw, -1.0).argmax(dim=1)  # a uniform positive per anchor, where there is one
    first_of = torch.where(pos.any(dim=1), chosen, torch.arange(len(labels), device=labels.device))
    anchor, second = neg.nonzero(as_tuple=True)
    return anchor, first_of[anchor], second


def pair_labels(anchor_labels: Tensor, first_labels: Tensor, second_labels: Tensor, lam: Tensor) -> Tensor:
    r"""The generalised pair label of a mixed sample to its anchor (the paper's Sec. 3.3):
    :math:`y(a, \tilde x) = \lambda\,[y_{\text{first}} = y_a] + (1 - \lambda)\,[y_{\text{second}} = y_a]`, in
    ``[0, 1]``: 1 is a positive pair, 0 a negative one; a positive mixed with a negative is positive by
    :math:`\lambda`.

    Example::

        >>> pair_labels(torch.tensor([0, 0]), torch.tensor([0, 1]), torch.tensor([1, 2]), torch.tensor(0.7))
        tensor([0.7000, 0.0000])
    """
    lam = lam.to(torch.float32)
    return lam * (first_labels == anchor_labels).float() + (1 - lam) * (second_labels == anchor_labels).float()


def mix_pairs(first: Tensor, second: Tensor, lam: Tensor) -> Tensor:
    r""":math:`\lambda\,\text{first} + (1 - \lambda)\,\text{second}` row by row (inputs, features or embeddings),
    through :func:`~lit_tricks.functional.mixing.mixup_` (the partners of the first half are the second half)."""
    m = len(first)
    stacked = torch.cat([first, second])
    perm = torch.cat([torch.arange(m, 2 * m), torch.arange(m)]).to(first.device)
    return mixup_(stacked, perm, lam)[:m]


def mixed_contrastive_loss(
    anchors: Tensor, mixed: Tensor, targets: Tensor, pos_margin: float = 0.0, neg_margin: float = 0.5
) -> Tensor:
    r"""The contrastive loss on mixed pairs, each term weighted by the pair label :math:`y` (:func:`pair_labels`):

    .. math:: \tilde{\mathcal L} = \operatorname{avg}_{\neq 0}\, y\,[d(a, \tilde x) - m^+]_+ +
        \operatorname{avg}_{\neq 0}\,(1 - y)\,[m^- - d(a, \tilde x)]_+ .

    Args:
        anchors, mixed: ``[M, D]`` L2-normalised embeddings of the anchors and of their mixed samples.
        targets: pair labels ``[M]`` in ``[0, 1]``.
        pos_margin, neg_margin: the margins of :func:`~lit_tricks.functional.metric_losses.contrastive_loss`.

    Example::

        >>> a = torch.tensor([[1.0, 0.0]]); m = torch.tensor([[0.8, 0.6]])  # d = 0.632
        >>> mixed_contrastive_loss(a, m, torch.tensor([0.7]))  # 0.7 * 0.632 (0.5 - 0.632 < 0)
        tensor(0.4427)
    """
    dist = (anchors - mixed).norm(dim=1)
    pos_loss = targets * (dist - pos_margin).clamp(min=0)
    neg_loss = (1 - targets) * (neg_margin - dist).clamp(min=0)
    return avg_nonzero(pos_loss) + avg_nonzero(neg_loss)


def mixed_multi_similarity_loss(
    anchor: Tensor,
    sim: Tensor,
    targets: Tensor,
    num_anchors: int,
    alpha: float = 2.0,
    beta: float = 50.0,
    base: float = 0.5,
) -> Tensor:
    r"""The multi-similarity loss on mixed pairs, each pair's exponential weighted by its label, averaged over the
    ``num_anchors`` anchors of the batch (the paper's Metrix/MS, mixed term):

    .. math:: \tilde{\mathcal L} = \frac{1}{N}\sum_a \frac{1}{\alpha}\log\Big(1 + \sum_{\tilde x} y\,
        e^{-\alpha (s_{a\tilde x} - \lambda)}\Big) + \frac{1}{\beta}\log\Big(1 + \sum_{\tilde x} (1-y)\,
        e^{\beta (s_{a\tilde x} - \lambda)}\Big).

    Args:
        anchor: the anchor index ``[M]`` of each mixed pair.
        sim: cosine similarity ``[M]`` of each anchor to its mixed sample.
        targets: pair labels ``[M]``.
        num_anchors: ``N``, the batch size.
        alpha, beta, base: as :func:`~lit_tricks.functional.metric_losses.multi_similarity_loss`.

    Example::

        >>> loss = mixed_multi_similarity_loss(torch.tensor([0]), torch.tensor([0.5]), torch.tensor([1.0]), 2)
        >>> round(loss.item(), 4)  # (1/2) log(1 + 1) / 2 anchors
        0.1733
    """
    rows = torch.arange(num_anchors, device=anchor.device).view(-1, 1) == anchor.view(1, -1)  # [N, M]
    values = sim.view(1, -1).expand(num_anchors, -1)
    pos = soft_hinge(base - values, rows & (targets > 0), alpha, targets.expand_as(values))
    neg = soft_hinge(values - base, rows & (targets < 1), beta, (1 - targets).expand_as(values))
    return (pos + neg).mean()
