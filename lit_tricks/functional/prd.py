r"""Prototype-sample relation distillation (PRD, Asadi et al., ICML 2023): the prototype scores, the prototype
loss and the relation-distillation loss.

Class prototypes :math:`p_c` live in the feature space of the backbone. A new task's prototypes are pulled towards
its samples' (detached) features by a cosine loss; the old tasks' prototypes are kept relevant, without any stored
sample, by making the current model's prototype-sample similarity distribution over each old task's classes match
the one of the model frozen at the last task switch, on the new task's samples. The contrastive part of PRD is
SupCon (:func:`~lit_tricks.functional.sbcl.sbcl_loss` with the labels as subclasses and ``class_weight=0``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def prototype_scores(features: Tensor, prototypes: Tensor) -> Tensor:
    r"""``[N, C]`` scores :math:`s_{ic} = f_i \cdot p_c / \lVert p_c \rVert` of ``features`` ``[N, d]`` against
    ``prototypes`` ``[C, d]``: unit prototypes, features **not** normalised (the authors' ``_get_scores``).

    Example::

        >>> prototype_scores(torch.tensor([[2.0, 0.0]]), torch.tensor([[3.0, 0.0], [0.0, 1.0]]))
        tensor([[2., 0.]])
    """
    return features @ F.normalize(prototypes, dim=1).T


def prototype_loss(features: Tensor, prototypes: Tensor, labels: Tensor) -> Tensor:
    r"""The prototype loss of each sample ``[N]``: :math:`1 - \cos(f_i, p_{y_i})`.

    The authors (``linear_loss``) pass detached features, so that only the prototypes learn from it; the caller
    detaches them likewise.

    Example::

        >>> prototype_loss(torch.tensor([[1.0, 1.0]]), torch.tensor([[1.0, 0.0]]), torch.tensor([0]))
        tensor([0.2929])
    """
    return 1 - F.cosine_similarity(features, prototypes[labels], dim=1)


def relation_distillation_loss(scores: Tensor, old_scores: Tensor, groups: Tensor, temperature: float = 1.0) -> Tensor:
    r"""The relation-distillation loss of each sample ``[N]``.

    ``scores`` and ``old_scores`` ``[N, C]`` are the :func:`prototype_scores` of the current model and of the model
    frozen at the last task switch (its own features and prototypes) on the same inputs; ``groups`` ``[C]`` gives the
    old task of each class (``-1``: a class of the current task or an unseen one, not distilled). Over the classes
    :math:`\mathcal C_t` of each old task :math:`t`, with temperature :math:`T`,

    .. math:: q_{ic} = \frac{e^{s^{\mathrm{old}}_{ic}/T}}{\sum_{c' \in \mathcal C_t} e^{s^{\mathrm{old}}_{ic'}/T}},
              \quad p_{ic} = \frac{e^{s_{ic}/T}}{\sum_{c' \in \mathcal C_t} e^{s_{ic'}/T}}, \qquad
              \ell_i = \sum_t \sum_{c \in \mathcal C_t} q_{ic} \log \frac{q_{ic}}{p_{ic}},

    so the batch mean of :math:`\ell` is the authors' sum over old tasks of ``KLDivLoss(reduction="batchmean")``.
    ``old_scores`` gets no gradient.

    Example::

        >>> s = torch.tensor([[1.0, 0.0, 5.0]])
        >>> relation_distillation_loss(s, s, torch.tensor([0, 0, -1]))
        tensor([0.])
    """
    n, c = scores.shape
    keep = groups >= 0
    slot = torch.where(keep, groups, c).expand(n, c)  # the not-distilled columns form one ignored group
    logp = _group_log_softmax(scores / temperature, slot, c + 1)
    logq = _group_log_softmax(old_scores.detach() / temperature, slot, c + 1)
    return (logq.exp() * (logq - logp) * keep).sum(dim=1)


def _group_log_softmax(x: Tensor, slot: Tensor, num_groups: int) -> Tensor:
    """Log-softmax of each row of ``x`` within the column groups ``slot`` ``[N, C]``."""
    top = x.new_full((len(x), num_groups), float("-inf")).scatter_reduce(1, slot, x.detach(), "amax")
    shifted = x - top.gather(1, slot)
    total = x.new_zeros(len(x), num_groups).scatter_add(1, slot, shifted.exp())
    return shifted - total.gather(1, slot).log()
