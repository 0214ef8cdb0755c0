r"""Concept global importance, existence and location ("Concept-Based Explainable Artificial Intelligence: Metrics
and Benchmarks", Aysel, Cai & Prugel-Bennett, arXiv 2501.19271, 2025), as pure functions.

Notation: :math:`L` concepts, :math:`K` classes; :math:`\hat u_i \in \mathbb R^L` the concept activations of sample
:math:`i` (probabilities for CBM / CEM, projections for PCBM); :math:`\theta \in \mathbb R^{L \times K}` the
concept-to-class weights; :math:`V \in \mathbb R^{L \times K}` the ground-truth class-concept matrix;
:math:`\Lambda_i` the concepts present in sample :math:`i` and :math:`p_{ij}` where concept :math:`j` is in it.

For a task head that is not linear in the concepts, :math:`\theta_{jk}` is taken at each sample, as the
derivative :math:`J_{ijk} = \partial z_{ik} / \partial \hat u_{ij}` of the task logits (:func:`concept_jacobian`):
for a linear head it is exactly the weight matrix, so the paper's definitions are the special case.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def class_concept_matrix(concepts: Tensor, targets: Tensor, n_classes: int) -> Tensor:
    r""":math:`V_{jk}`: the fraction of class :math:`k`'s samples in which concept :math:`j` is present, ``[L, K]``
    (the class-level annotation itself when concepts are class-level, as CUB's; zero for unseen classes).

    Example::

        >>> class_concept_matrix(torch.tensor([[1., 0.], [1., 1.], [0., 1.]]), torch.tensor([0, 0, 1]), 2)
        tensor([[1.0000, 0.0000],
                [0.5000, 1.0000]])
    """
    sums = concepts.new_zeros(n_classes, concepts.shape[1]).index_add_(0, targets, concepts)
    counts = torch.bincount(targets, minlength=n_classes).clamp(min=1).to(concepts.dtype)
    return (sums / counts[:, None]).T


def row_cosine(a: Tensor, b: Tensor) -> Tensor:
    r""":math:`\phi(a_j, b_j) = a_j \cdot b_j / (\lVert a_j\rVert \lVert b_j\rVert)` for each row ``j`` of two
    ``[L, K]`` matrices; ``nan`` where either row is all zero (no direction to compare)."""
    norms = a.norm(dim=1) * b.norm(dim=1)
    return torch.where(norms > 0, (a * b).sum(dim=1) / norms.clamp(min=1e-30), torch.full_like(norms, float("nan")))


def concept_global_importance(importance: Tensor, class_concepts: Tensor) -> Tensor:
    r"""CGIM, per concept :math:`j`: :math:`\rho_j = \phi(\Theta(j, :), V(j, :))`, the cosine between how much
    concept :math:`j` drives each class (``importance`` :math:`\Theta`, ``[L, K]``) and how often it is present
    in each class (``class_concepts`` :math:`V`). The paper's three variants differ in :math:`\Theta`: the
    weights :math:`\theta` (CGIM1), the mean activations of the correctly classified samples of each class
    :math:`\hat U^*` (CGIM2, :func:`mean_correct_activations`) or their product :math:`\theta \odot \hat U^*`
    (CGIM3). Returns ``[L]`` (``nan`` where a row is all zero).

    Example::

        >>> theta = torch.tensor([[2., -1.], [0., 3.]])
        >>> v = torch.tensor([[1., 0.], [1., 1.]])
        >>> concept_global_importance(theta, v)  # 2/sqrt(5), 3/(3 sqrt(2))
        tensor([0.8944, 0.7071])
    """
    if importance.ndim != 2 or importance.shape != class_concepts.shape:
        raise ValueError(
            f"importance and class_concepts must both be [L, K], got {tuple(importance.shape)} and "
            f"{tuple(class_concepts.shape)}."
        )
    return row_cosine(importance, class_concepts)


def mean_correct_activations(activations: Tensor, logits: Tensor, targets: Tensor) -> Tensor:
    r""":math:`\hat U^*` ``[L, K]``: column :math:`k` is the mean concept activation :math:`\hat u_i` over the
    samples of class :math:`k` that the model classifies correctly (zero if there are none)."""
    correct = logits.argmax(dim=-1) == targets
    return class_concept_matrix(activations[correct], targets[correct], logits.shape[-1])


def concept_jacobian(head: Callable[[Tensor], Tensor], activations: Tensor) -> Tensor:
    r""":math:`J_{ijk} = \partial z_{ik} / \partial \hat u_{ij}` ``[N, L, K]`` of the task logits
    :math:`z = \text{head}(\hat u)` (one backward pass per class; samples must not interact, as in eval mode).
    Gradients are on even inside ``torch.no_grad`` / ``inference_mode`` (e.g. a validation loop)."""
    columns = _column_gradients(
        head,
        activations,
        "The task logits do not depend differentiably on the concept activations (e.g. ECBM's energy "
        "minimisation): there is no head derivative; use ConceptMetrics(use_head=False).",
    )
    return torch.stack(columns, dim=-1)


def local_importance(jacobian: Tensor, activations: Tensor, classes: Tensor) -> Tensor:
    r"""The local importance of each concept for each sample's class :math:`k_i`: :math:`\theta_{jk_i}\hat u_{ij}`,
    with the per-sample :math:`J_{ijk_i}` in place of :math:`\theta` (``jacobian`` ``[N, L, K]``, or ``[L, K]``
    weights shared by all samples). Returns ``[N, L]``."""
    if jacobian.ndim == 2:
        jacobian = jacobian.expand(activations.shape[0], *jacobian.shape)
    picked = jacobian.gather(2, classes.view(-1, 1, 1).expand(-1, jacobian.shape[1], 1)).squeeze(2)
    return picked * activations


def _top(importance: Tensor, top_l: int, allowed: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Indices ``[N, l]`` of the ``top_l`` largest importances per row (only ``allowed`` ones, if given), and
    which of them are real picks (a row with fewer allowed entries than ``top_l``)."""
    count = min(top_l, importance.shape[1])
    if allowed is not None:
        importance = importance.masked_fill(~allowed, float("-inf"))
    values, index = importance.topk(count, dim=1)
    return index, values > float("-inf")


def concept_existence(importance: Tensor, concepts: Tensor, top_l: int = 1) -> Tensor:
    r"""CEM per sample: :math:`\rho_i = \frac1l \sum_{r=1}^{l} \mathbb 1[q_{ir} \in \Lambda_i]`, the fraction of
    the ``top_l`` concepts ranked by ``importance`` (``[N, L]``, e.g. :func:`local_importance`) that are present
    (``concepts`` ``[N, L]`` > 0.5). Returns ``[N]``.

    Example::

        >>> importance = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.8, 0.3]])
        >>> concept_existence(importance, torch.tensor([[1., 0., 0.], [1., 0., 0.]]), top_l=2)
        tensor([0.5000, 0.0000])
    """
    index, _ = _top(importance, top_l)
    return (concepts > 0.5).gather(1, index).float().mean(dim=1)


def concept_activation_maps(features: Tensor, bank: Tensor, size: tuple[int, int] | None = None) -> Tensor:
    r"""CoAM: :math:`F_i^j = \frac1d \sum_{k=1}^d c_{jk} E_i(:, :, k)`, each concept vector :math:`c_j` (``bank``
    ``[L, d]``) against the pre-pooling feature maps :math:`E_i` (``features`` ``[N, d, h, w]``), bilinearly
    upsampled to ``size`` (the image's) if given. Returns ``[N, L, H, W]``."""
    if features.ndim != 4 or bank.ndim != 2 or features.shape[1] != bank.shape[1]:
        raise ValueError(
            f"features must be [N, d, h, w] and bank [L, d] with the same d, got {tuple(features.shape)} and "
            f"{tuple(bank.shape)}."
        )
    maps = torch.einsum("ndhw,ld->nlhw", features, bank.to(features.dtype)) / features.shape[1]
    if size is not None and tuple(maps.shape[-2:]) != tuple(size):
        maps = F.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=False)
    return maps


def input_gradient_maps(concept_scores: Callable[[Tensor], Tensor], inputs: Tensor) -> Tensor:
    r"""Saliency of each concept (Simonyan et al., 2014): :math:`|\partial s_j(x) / \partial x|` summed over the
    channels, for models whose concepts come straight from the input image (CBM, CEM); ``concept_scores`` maps
    ``inputs`` ``[N, C, H, W]`` to ``[N, L]`` (concept logits). Returns ``[N, L, H, W]``."""
    if inputs.ndim != 4:
        raise ValueError(f"input_gradient_maps needs images [N, C, H, W], got {tuple(inputs.shape)}.")
    maps = _column_gradients(
        concept_scores,
        inputs,
        "The concept scores do not depend differentiably on the inputs (e.g. ECBM's energy minimisation): "
        "no saliency maps; use ConceptMetrics(location=False).",
        reduce=lambda gradient: gradient.abs().sum(dim=1),
    )
    return torch.stack(maps, dim=1)


def _column_gradients(
    fn: Callable[[Tensor], Tensor], x: Tensor, no_gradient: str, reduce: Callable[[Tensor], Tensor] = lambda g: g
) -> list[Tensor]:
    r"""``reduce`` of :math:`\partial \sum_i f(x)_{ik} / \partial x` for each output column :math:`k` of
    :math:`f(x)` ``[N, K]``, one backward pass each (zeros where a column does not depend on ``x``); gradients are on
    even inside ``torch.no_grad`` / ``inference_mode``. Raises ``ValueError(no_gradient)`` when ``f(x)`` has none."""
    with torch.inference_mode(False), torch.enable_grad():
        x = x.detach().clone().requires_grad_(True)
        out = fn(x)
        if not out.requires_grad:
            raise ValueError(no_gradient)
        columns = []
        for k in range(out.shape[1]):
            (gradient,) = torch.autograd.grad(out[:, k].sum(), x, retain_graph=k + 1 < out.shape[1], allow_unused=True)
            columns.append(reduce(torch.zeros_like(x) if gradient is None else gradient).detach())
    return columns


def top_region(maps: Tensor, alpha: float = 1.0) -> Tensor:
    r""":math:`\Omega_{ij}`: the :math:`\lceil \alpha M_1 M_2 / 12 \rceil` most activated pixels of each map
    (``maps`` ``[..., M1, M2]``); pixels tied with the last one are all in, but a pixel at its map's minimum
    never is (a flat map locates nothing). Returns a boolean mask of ``maps``' shape."""
    flat = maps.flatten(-2)
    n_top = min(flat.shape[-1], max(1, math.ceil(alpha * flat.shape[-1] / 12 - 1e-9)))
    threshold = flat.topk(n_top, dim=-1).values[..., -1:]
    region = (flat >= threshold) & (flat > flat.amin(dim=-1, keepdim=True))
    return region.view_as(maps)


def mask_centroids(masks: Tensor) -> Tensor:
    """The (row, column) of each mask's centroid (``masks`` ``[..., H, W]``), rounded to the nearest pixel:
    ``[..., 2]`` long, ``-1`` for an empty mask. The point stands for CUB's part location :math:`p_{ij}`."""
    m = masks.float()
    total = m.sum(dim=(-2, -1))
    rows = torch.arange(m.shape[-2], dtype=m.dtype, device=m.device)
    cols = torch.arange(m.shape[-1], dtype=m.dtype, device=m.device)
    r = (m.sum(dim=-1) * rows).sum(dim=-1) / total.clamp(min=1)
    c = (m.sum(dim=-2) * cols).sum(dim=-1) / total.clamp(min=1)
    points = torch.stack([r, c], dim=-1).round().long()
    return points.masked_fill((total == 0).unsqueeze(-1), -1)


def concept_location(
    importance: Tensor, maps: Tensor, points: Tensor, top_l: int = 1, alpha: float = 1.0
) -> tuple[Tensor, Tensor]:
    r"""CLM per sample: :math:`\rho_i = \frac1l \sum_{r=1}^{l} \mathbb 1[p_{iq_r} \in \Omega_{iq_r}]` over the
    ``top_l`` concepts by ``importance`` ``[N, L]`` **among those located in the sample** (``points`` ``[N, L, 2]``
    (row, column), ``-1`` where a concept is absent): does each one's map (``maps`` ``[N, L, H, W]``) have the
    concept's point among its :func:`top_region` pixels? A sample with fewer located concepts than ``top_l``
    averages over those it has. Returns ``(scores [N], valid [N])``; ``valid`` is False where no concept is located.

    Example::

        >>> maps = torch.zeros(1, 2, 4, 4)
        >>> maps[0, 0, :2, :2] = 1.0  # concept 0 lights the top-left corner, concept 1 nothing
        >>> points = torch.tensor([[[0, 1], [3, 3]]])
        >>> concept_location(torch.tensor([[0.9, 0.1]]), maps, points, top_l=2)
        (tensor([0.5000]), tensor([True]))
    """
    if maps.shape[:2] != importance.shape or points.shape != (*importance.shape, 2):
        raise ValueError(
            f"importance [N, L], maps [N, L, H, W] and points [N, L, 2] must agree, got {tuple(importance.shape)}, "
            f"{tuple(maps.shape)} and {tuple(points.shape)}."
        )
    located = (points >= 0).all(dim=-1)
    region = top_region(maps, alpha)
    flat_index = points[..., 0].clamp(min=0) * maps.shape[-1] + points[..., 1].clamp(min=0)
    hit = region.flatten(-2).gather(-1, flat_index.unsqueeze(-1)).squeeze(-1) & located  # [N, L]
    index, picked = _top(importance, top_l, located)
    picked_hits = hit.gather(1, index) & picked
    count = picked.sum(dim=1)
    return picked_hits.sum(dim=1) / count.clamp(min=1), count > 0
