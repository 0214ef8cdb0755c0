"""Deep-metric-learning pair losses on L2-normalised embeddings: contrastive and multi-similarity (with its mining)."""

from __future__ import annotations

import torch
from torch import Tensor


def pair_masks(labels: Tensor) -> tuple[Tensor, Tensor]:
    """Positive and negative pairs of a batch, ``[N, N]`` bool each: same label (not the diagonal), other label.

    Example::

        >>> pos, neg = pair_masks(torch.tensor([0, 0, 1]))
        >>> pos.int().tolist(), neg.int().tolist()
        ([[0, 1, 0], [1, 0, 0], [0, 0, 0]], [[0, 0, 1], [0, 0, 1], [1, 1, 0]])
    """
    same = labels.view(-1, 1) == labels.view(1, -1)
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    return same & ~eye, ~same


def avg_nonzero(losses: Tensor) -> Tensor:
    """The mean of the strictly positive entries (0 when there are none): the reduction of the Metrix code
    (pytorch-metric-learning's ``AvgNonZeroReducer``), so that pairs already beyond their margin do not dilute it."""
    positive = losses > 0
    return losses.sum() / positive.sum().clamp(min=1)


def contrastive_loss(embeddings: Tensor, labels: Tensor, pos_margin: float = 0.0, neg_margin: float = 0.5) -> Tensor:
    r"""Contrastive loss (Hadsell et al., 2006) over every pair of the batch, as the Metrix code uses it:

    .. math:: \mathcal L = \operatorname{avg}_{\neq 0}\big[d(a,p) - m^+\big]_+ +
        \operatorname{avg}_{\neq 0}\big[m^- - d(a,n)\big]_+ ,

    with :math:`d` the Euclidean distance (not squared) between the embeddings, the averages over the positive
    pairs :math:`(a, p)` and the negative pairs :math:`(a, n)` (ordered, so each pair counts twice) whose loss is
    positive (:func:`avg_nonzero`).

    Args:
        embeddings: ``[N, D]`` (L2-normalised by the caller).
        labels: class ids ``[N]``.
        pos_margin, neg_margin: :math:`m^+` and :math:`m^-` (the Metrix code: 0 and 0.5).

    Example::

        >>> e = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
        >>> contrastive_loss(e, torch.tensor([0, 0, 1]))  # d(0,1) = 0.894, d(1,2) = 0.632 and d(0,2) = 1.414 > 0.5
        tensor(0.8944)
    """
    pos, neg = pair_masks(labels)
    dist = torch.cdist(embeddings, embeddings)
    pos_loss = (dist - pos_margin).clamp(min=0) * pos
    neg_loss = (neg_margin - dist).clamp(min=0) * neg
    return avg_nonzero(pos_loss) + avg_nonzero(neg_loss)


def multi_similarity_mining(sim: Tensor, labels: Tensor, epsilon: float = 0.1) -> tuple[Tensor, Tensor]:
    r"""The pair mining of the multi-similarity loss (Wang et al., 2019): for anchor :math:`a`, keep the negatives
    with :math:`s_{an} + \epsilon > \min_{p} s_{ap}` and the positives with :math:`s_{ap} - \epsilon < \max_n s_{an}`.
    An anchor without positives or without negatives keeps nothing. Returns the kept ``(pos_mask, neg_mask)``.

    Example::

        >>> sim = torch.tensor([[1.0, 0.9, 0.85, 0.2], [0.9, 1.0, 0.1, 0.0], [0.85, 0.1, 1.0, 0.3],
        ...                     [0.2, 0.0, 0.3, 1.0]])
        >>> pos, neg = multi_similarity_mining(sim, torch.tensor([0, 0, 1, 1]))
        >>> pos.int().tolist()  # anchor 0 keeps its positive 1 (0.8 < its hardest negative 0.85); anchor 1 nothing
        [[0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0]]
        >>> neg.int().tolist()  # anchor 0 keeps its hard negative 2 (0.95 > 0.9), not 3 (0.3)
        [[0, 0, 1, 0], [0, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
    """
    pos, neg = pair_masks(labels)
    inf = torch.tensor(torch.inf, dtype=sim.dtype, device=sim.device)
    min_pos = torch.where(pos, sim, inf).amin(dim=1, keepdim=True)
    max_neg = torch.where(neg, sim, -inf).amax(dim=1, keepdim=True)
    return pos & (sim - epsilon < max_neg), neg & (sim + epsilon > min_pos)


def soft_hinge(values: Tensor, mask: Tensor, scale: float, weights: Tensor | None = None) -> Tensor:
    r"""Per row, :math:`\frac{1}{\gamma}\log\big(1 + \sum_{j \in \text{mask}} w_j e^{\gamma v_j}\big)` ``[N]`` (0 for a
    row with an empty mask), computed stably as a log-sum-exp with the ``1`` as an extra zero term."""
    logits = scale * values
    if weights is not None:
        logits = logits + weights.clamp(min=torch.finfo(values.dtype).tiny).log()
    logits = logits.masked_fill(~mask, -torch.inf)
    zeros = logits.new_zeros(len(logits), 1)
    return torch.logsumexp(torch.cat([logits, zeros], dim=1), dim=1) / scale


def multi_similarity_loss(
    embeddings: Tensor,
    labels: Tensor,
    alpha: float = 2.0,
    beta: float = 50.0,
    base: float = 0.5,
    epsilon: float = 0.1,
) -> Tensor:
    r"""Multi-similarity loss (Wang et al., CVPR 2019) with its mining (:func:`multi_similarity_mining`), on cosine
    similarities :math:`s` of the embeddings, averaged over all anchors of the batch:

    .. math:: \mathcal L = \frac{1}{N}\sum_a \frac{1}{\alpha}\log\Big(1 + \sum_{p \in \mathcal P_a}
        e^{-\alpha (s_{ap} - \lambda)}\Big) + \frac{1}{\beta}\log\Big(1 + \sum_{n \in \mathcal N_a}
        e^{\beta (s_{an} - \lambda)}\Big).

    Args:
        embeddings: ``[N, D]`` L2-normalised.
        labels: class ids ``[N]``.
        alpha, beta: the scales :math:`\alpha` (positives) and :math:`\beta` (negatives).
        base: the similarity offset :math:`\lambda`.
        epsilon: the mining margin :math:`\epsilon`.

    Example::

        >>> e = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.8, 0.6]])
        >>> round(multi_similarity_loss(e, torch.tensor([0, 0, 1])).item(), 4)
        0.4527
    """
    sim = embeddings @ embeddings.T
    pos, neg = multi_similarity_mining(sim.detach(), labels, epsilon)
    pos_loss = soft_hinge(base - sim, pos, alpha)
    neg_loss = soft_hinge(sim - base, neg, beta)
    return (pos_loss + neg_loss).mean()
