r"""LaBo ("Language in a Bottle", Yang et al., CVPR 2023): submodular selection of concepts per class from
language-model candidates, and the class-concept weight initialisation from the language prior.

Notation (as the authors' code, ``YueYANG1996/LaBo``: ``models/select_concept/select_algo.py`` ``mi_score``,
``submodular_select``; ``models/asso_opt/asso_opt.py`` ``init_weight_concept``): :math:`x_i` image embeddings with
labels :math:`y_i` among :math:`C` classes, :math:`t_c` the text embeddings of :math:`M` candidate concepts, each
written for one class :math:`\kappa(c)` (``concept_classes``). Embeddings are used as given (the authors' default
``use_img_norm = use_txt_norm = False``).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from lit_tricks.functional.vl_embeddings import check_embedding_pair


def labo_class_similarity(
    image_embeddings: Tensor, labels: Tensor, concept_embeddings: Tensor, num_classes: int
) -> Tensor:
    r"""``Sim(c, y)`` ``[M, C]``: the mean of :math:`t_c \cdot x_i` over the images of class :math:`y`
    (the code's ``clip_score``)."""
    check_embedding_pair(image_embeddings, concept_embeddings)
    if labels.shape != (len(image_embeddings),):
        raise ValueError(f"labels must be [N] = [{len(image_embeddings)}], got shape {tuple(labels.shape)}.")
    counts = torch.bincount(labels, minlength=num_classes)
    if len(counts) != num_classes or bool((counts == 0).any()):
        raise ValueError(f"every class in 0..{num_classes - 1} needs at least one image; got counts {counts.tolist()}.")
    sums = torch.zeros(num_classes, image_embeddings.shape[1], dtype=image_embeddings.dtype)
    sums = sums.to(image_embeddings.device).index_add_(0, labels, image_embeddings)
    return concept_embeddings @ (sums / counts[:, None]).T


def labo_discriminability(
    image_embeddings: Tensor, labels: Tensor, concept_embeddings: Tensor, num_classes: int
) -> Tensor:
    r"""LaBo's discriminability score ``[M]`` as the authors' ``mi_score``: with
    :math:`\bar S(c, y) = \mathrm{Sim}(c, y) / (C \sum_{c'} \mathrm{Sim}(c', y))` (a joint over concepts and
    classes with uniform :math:`p(y) = 1/C`),

    .. math:: D(c) = \sum_y \bar S(c, y) \log \frac{\bar S(c, y)}{\tfrac1C \sum_{y'} \bar S(c, y')},

    concept :math:`c`'s share of the mutual information between concepts and classes: high when :math:`c`
    matches the images of few classes. The normaliser sums over all :math:`M` candidates. Class-mean similarities
    must be positive (raw CLIP similarities are).

    Example::

        >>> import torch
        >>> x, t = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.1], [1.0, 1.0]])
        >>> [round(d, 3) for d in labo_discriminability(x, torch.tensor([0, 1]), t, 2).tolist()]
        [0.078, 0.03]
    """
    sim = labo_class_similarity(image_embeddings, labels, concept_embeddings, num_classes)
    if bool((sim <= 0).any()):
        raise ValueError(
            "class-mean similarities Sim(c, y) must be positive for the discriminability score's logarithm; "
            "use raw CLIP-like embeddings or shift the similarities (e.g. append a constant feature to both)."
        )
    joint = sim / (sim.sum(0, keepdim=True) * num_classes)
    marginal = joint.sum(1, keepdim=True)
    return (joint * torch.log(joint / (marginal / num_classes))).sum(1)


def labo_select(
    image_embeddings: Tensor,
    labels: Tensor,
    concept_embeddings: Tensor,
    concept_classes: Tensor,
    num_classes: int,
    k: int,
    discriminability_weight: float = 1e7,
    coverage_weight: float = 1.0,
    coverage: Literal["cosine", "released"] = "cosine",
    strict: bool = True,
) -> Tensor:
    r"""LaBo's submodular selection: for each class :math:`y`, the naive greedy maximisation (the code's
    ``apricot`` ``MixtureSelection(optimizer="naive")``, first index on ties) over its candidates
    :math:`V_y = \{c : \kappa(c) = y\}` of

    .. math:: F(S) = \alpha \sum_{c \in S} D(c) + \beta\, \mathrm{Cov}(S), \qquad |S| = k,

    :math:`\alpha` = ``discriminability_weight`` (the code's ``submodular_weights[0]`` = 1e7 in every config),
    :math:`\beta` = ``coverage_weight`` (``submodular_weights[1]``: 0 to 10 by dataset and shots, 1 on
    CUB 16-shot). ``coverage="cosine"`` is the facility location the paper and the code's
    ``FacilityLocationSelection(metric="cosine")`` state, :math:`\mathrm{Cov}(S) = \sum_{r \in V_y}
    \max(0, \max_{c \in S} \cos(t_r, t_c))`. ``coverage="released"`` reproduces what the released code computes
    with ``apricot-select`` 0.6.1, whose ``MixtureSelection`` sets its components' metric to ``"precomputed"``:
    the rows :math:`a_c = [\alpha D(c), t_c]` are read as similarities,
    :math:`\mathrm{Cov}(S) = \sum_j \max(0, \max_{c \in S} a_{cj})`.

    Example::

        >>> import torch
        >>> x = torch.tensor([[1.0, 0.2], [0.2, 1.0]])
        >>> t = torch.tensor([[1.0, 0.1], [0.9, 0.1], [1.0, 1.0], [0.1, 1.0], [0.5, 0.6]])
        >>> labo_select(x, torch.tensor([0, 1]), t, torch.tensor([0, 0, 0, 1, 1]), 2, k=1).tolist()
        [0, 3]

    Args:
        concept_classes: ``[M]`` the class each candidate was written for.
        k: concepts per class.
        strict: raise if a class has fewer than ``k`` candidates; ``False`` keeps all of them (the code).

    Returns:
        indices into the candidates, class by class, each class's in greedy order.
    """
    check_embedding_pair(image_embeddings, concept_embeddings)
    if coverage not in ("cosine", "released"):
        raise ValueError(f"coverage must be 'cosine' or 'released', got {coverage!r}.")
    if k < 1:
        raise ValueError(f"k (concepts per class) must be >= 1, got {k}.")
    if discriminability_weight < 0 or coverage_weight < 0:
        raise ValueError("discriminability_weight and coverage_weight must be >= 0 (a submodular mixture).")
    if concept_classes.shape != (len(concept_embeddings),):
        raise ValueError(
            f"concept_classes must be [M] = [{len(concept_embeddings)}], got shape {tuple(concept_classes.shape)}."
        )
    per_class = torch.bincount(concept_classes, minlength=num_classes)
    if len(per_class) != num_classes:
        raise ValueError(f"concept_classes must lie in 0..{num_classes - 1}.")
    if strict and bool((per_class < k).any()):
        raise ValueError(
            f"k={k} is larger than the candidates of some class (counts {per_class.tolist()}): lower k, add "
            "candidates, or pass strict=False to keep all of a short class's candidates as the authors' code does."
        )
    score = discriminability_weight * labo_discriminability(image_embeddings, labels, concept_embeddings, num_classes)
    chosen = []
    for y in range(num_classes):
        idx = (concept_classes == y).nonzero().flatten()
        if len(idx) <= k:
            chosen.append(idx)
            continue
        if coverage == "cosine":
            t = F.normalize(concept_embeddings[idx], dim=1)
            sim = t @ t.T
        else:
            sim = torch.cat([score[idx, None], concept_embeddings[idx]], dim=1)
        chosen.append(idx[_greedy(score[idx], sim, coverage_weight, k)])
    return torch.cat(chosen)


def _greedy(modular: Tensor, sim: Tensor, beta: float, k: int) -> Tensor:
    """Naive greedy on ``modular[c] + beta * sum_j max(0, max_{s in S} sim[s, j])``."""
    current = torch.zeros(sim.shape[1], dtype=sim.dtype, device=sim.device)
    taken = torch.zeros(len(sim), dtype=torch.bool, device=sim.device)
    order = []
    for _ in range(k):
        gain = modular + beta * (sim - current).clamp(min=0).sum(1)
        best = int(gain.masked_fill(taken, -torch.inf).argmax())
        order.append(best)
        taken[best] = True
        current = torch.maximum(current, sim[best])
    return torch.tensor(order, dtype=torch.long, device=sim.device)


def labo_init_weights(concept_classes: Tensor, num_classes: int, value: float = 1.0) -> Tensor:
    r"""The language prior for the class-concept matrix :math:`A` ``[C, K]`` (the code's
    ``init_weight_concept``): :math:`A_{y c} = ` ``value`` if concept :math:`c` was written for class :math:`y`,
    else 0 (the code's ``init_val = 1``).

    Example::

        >>> labo_init_weights(torch.tensor([0, 1, 1]), 2).tolist()
        [[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]]
    """
    if concept_classes.ndim != 1 or not len(concept_classes):
        raise ValueError("concept_classes must be a non-empty [K] tensor of class ids.")
    if int(concept_classes.min()) < 0 or int(concept_classes.max()) >= num_classes:
        raise ValueError(f"concept_classes must lie in 0..{num_classes - 1}.")
    weights = torch.zeros(num_classes, len(concept_classes))
    return weights.scatter_(0, concept_classes.view(1, -1).long().cpu(), value)


def labo_class_name_prior(class_name_embeddings: Tensor, concept_embeddings: Tensor, k: int) -> Tensor:
    r"""The code's optional class-name prior (``gen_init_weight_from_cls_name``): :math:`A_{y c} = 1` for the
    ``k`` concepts nearest (Euclidean) to class :math:`y`'s name embedding; the code's ``cls_name_init="combine"``
    is ``(labo_init_weights(...) + this).clamp(max=1)``.

    Example::

        >>> labo_class_name_prior(torch.eye(2), torch.tensor([[0.0, 1.0], [1.0, 0.1], [0.8, 0.0]]), 1).tolist()
        [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]
    """
    check_embedding_pair(class_name_embeddings, concept_embeddings)
    if not 1 <= k <= len(concept_embeddings):
        raise ValueError(f"k must be in 1..{len(concept_embeddings)} (the number of concepts), got {k}.")
    nearest = torch.cdist(class_name_embeddings, concept_embeddings).topk(k, largest=False).indices
    return torch.zeros(len(class_name_embeddings), len(concept_embeddings)).scatter_(1, nearest.cpu(), 1.0)
