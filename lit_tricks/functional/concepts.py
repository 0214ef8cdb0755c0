r"""Concept bottlenecks: interventions, their policies, and the Sparse-CBM / CMS pieces, as pure functions.

An intervention replaces predicted concepts by true ones (Koh et al., ICML 2020). For a probability
bottleneck the true value is 0 or 1; for a logit bottleneck it is the 5th / 95th percentile of that concept's
predicted logits (so it stays in the range the task head was trained on).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Policy = Literal["random", "uncertainty", "fixed"]


def intervene(
    bottleneck: Tensor, true_concepts: Tensor, mask: Tensor, low: Tensor | None = None, high: Tensor | None = None
) -> Tensor:
    r"""The bottleneck ``[N, k]`` with the concepts where ``mask`` is True set to their true values:
    :math:`c_j` itself (probability / hard bottlenecks) or, with ``low``/``high`` (``[k]``, logit bottlenecks),
    :math:`c_j \cdot \text{high}_j + (1 - c_j)\,\text{low}_j`."""
    target = true_concepts.to(bottleneck.dtype)
    if low is not None and high is not None:
        target = target * high + (1 - target) * low
    return torch.where(mask, target, bottleneck)


def logit_percentiles(logits: Tensor, low: float = 0.05, high: float = 0.95) -> tuple[Tensor, Tensor]:
    """Per-concept ``low`` and ``high`` quantiles ``[k]`` of predicted logits ``[N, k]`` (Koh: 5th / 95th)."""
    q = torch.tensor([low, high], dtype=logits.dtype, device=logits.device)
    values = torch.quantile(logits.detach(), q, dim=0)
    return values[0], values[1]


def group_matrix(n_concepts: int, groups: Sequence[Sequence[int]] | None) -> Tensor:
    """``[G, k]`` boolean membership of concepts in groups (each concept its own group if ``groups`` is None)."""
    if groups is None:
        return torch.eye(n_concepts, dtype=torch.bool)
    matrix = torch.zeros(len(groups), n_concepts, dtype=torch.bool)
    for g, members in enumerate(groups):
        matrix[g, list(members)] = True
    if not matrix.any(dim=0).all():
        raise ValueError("concept_groups must cover every concept.")
    return matrix


def intervention_mask(
    probs: Tensor,
    n_groups: int,
    policy: Policy,
    groups: Tensor,
    generator: torch.Generator | None = None,
    order: Sequence[int] | None = None,
) -> Tensor:
    r"""``[N, k]`` mask of the concepts to intervene on: ``n_groups`` groups per sample, chosen by ``policy``:

    - ``"random"``: uniformly, independently per sample;
    - ``"uncertainty"``: the groups whose most uncertain concept is closest to :math:`p = 0.5` first
      (score :math:`\max_{j \in g} 1/(|p_j - 0.5| + \epsilon)`);
    - ``"fixed"``: the groups in ``order`` (e.g. by validation concept accuracy), the same for every sample.

    ``groups`` is the ``[G, k]`` membership from :func:`group_matrix` (one concept per group: concept-wise).
    """
    n, g = probs.shape[0], groups.shape[0]
    if not 0 <= n_groups <= g:
        raise ValueError(f"n_groups must be in [0, {g}], got {n_groups}.")
    groups = groups.to(probs.device)
    if policy == "random":
        scores = torch.rand(n, g, generator=generator).to(probs.device)
    elif policy == "uncertainty":
        per_concept = 1.0 / ((probs.detach() - 0.5).abs() + 1e-6)  # [N, k]
        scores = (per_concept.unsqueeze(1) * groups).amax(dim=-1)  # [N, G]
    elif policy == "fixed":
        if order is None or sorted(order) != list(range(g)):
            raise ValueError(f"policy='fixed' needs order, a permutation of the {g} groups.")
        scores = torch.empty(g, device=probs.device)
        scores[torch.as_tensor(list(order), device=probs.device)] = torch.arange(g, 0, -1, device=probs.device).float()
        scores = scores.expand(n, g)
    else:
        raise ValueError(f"policy must be 'random', 'uncertainty' or 'fixed', got {policy!r}.")
    chosen = torch.zeros(n, g, dtype=torch.bool, device=probs.device)
    if n_groups:
        chosen.scatter_(1, scores.topk(n_groups, dim=1).indices, True)
    return (chosen.float() @ groups.float()) > 0


def gumbel_contrastive_loss(z: Tensor, tau: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
    r"""Sparse-CBM's concept loss (Semenov et al., 2024): with :math:`G_0, G_1` Gumbel-softmax of the concept
    activations ``z`` ``[B, k]`` over the batch and over the concepts,
    :math:`\mathcal L = \tfrac12[\overline{-\log G_0} + \overline{-\log G_1}]`, averaged over **all** entries (as the
    authors' code does). Soft samples (``hard=False``; hard ones give :math:`\log 0`)."""

    def soft_gumbel(dim: int) -> Tensor:
        u = torch.rand(z.shape, generator=generator).to(z.device).clamp(1e-10, 1 - 1e-10)
        return F.softmax((z - torch.log(-torch.log(u))) / tau, dim=dim)

    return 0.5 * (-(soft_gumbel(0) + 1e-10).log().mean() - (soft_gumbel(1) + 1e-10).log().mean())


def concept_matrix_search(
    image_concept: Tensor, class_concept: Tensor, rule: Literal["similarity", "max"] = "similarity"
) -> Tensor:
    r"""Training-free prediction (Concept Matrix Search, Semenov et al., 2024) from image-concept similarities
    :math:`V` ``[N, k]`` and class-concept similarities :math:`T` ``[C, k]``, rows normalised to sum 1:
    ``"similarity"`` :math:`\hat y = \arg\max_c \cos(V_i, T_c)`; ``"max"`` takes the image's strongest concept
    :math:`j^* = \arg\max_j V_{ij}` and :math:`\hat y = \arg\max_c T_{c j^*}`. Returns class ids ``[N]``."""
    v = image_concept / (image_concept.sum(dim=1, keepdim=True) + 1e-8)
    t = class_concept / (class_concept.sum(dim=1, keepdim=True) + 1e-8)
    if rule == "similarity":
        return (F.normalize(v, dim=1) @ F.normalize(t, dim=1).T).argmax(dim=1)
    if rule == "max":
        return t[:, v.argmax(dim=1)].argmax(dim=0)
    raise ValueError(f"rule must be 'similarity' or 'max', got {rule!r}.")


def concept_only_accuracy(train_concepts: Tensor, train_targets: Tensor, concepts: Tensor, targets: Tensor) -> float:
    """The best accuracy any function of the **true** (binary) concepts reaches on ``(concepts, targets)``: each
    concept vector predicts the majority class it had in training (unseen vectors: the overall majority).

    A model that beats this ceiling with its predicted concepts, but falls to it when every concept is replaced
    by its true value, leaks task information through its soft concepts (the leakage check)."""
    weights = 2 ** torch.arange(train_concepts.shape[1], device=train_concepts.device)
    codes = (train_concepts > 0.5).long() @ weights
    n_classes = int(max(train_targets.max(), targets.max())) + 1
    counts = torch.zeros(int(weights.sum()) + 1, n_classes, device=codes.device)
    counts.index_put_((codes, train_targets), torch.ones_like(codes, dtype=counts.dtype), accumulate=True)
    fallback = train_targets.bincount(minlength=n_classes).argmax()
    prediction = torch.where(counts.sum(dim=1) > 0, counts.argmax(dim=1), fallback)
    test_codes = (concepts > 0.5).long() @ weights
    return (prediction[test_codes] == targets).float().mean().item()
