r"""Constrained concept bottlenecks (Furby, Cunnington, Braines & Preece, "Can we Constrain Concept Bottleneck
Models to Learn Semantically Meaningful Input Features?", 2024): the data, not the loss, is the constraint.

A CBM maps concept :math:`j` to the right input features only when its training data separate :math:`j` from
other concepts: instance-level labels, and concepts that do **not always co-occur**. These functions measure the
co-occurrence (:func:`cooccurrence_matrix`), remove it from a data set by importance weights towards independent
concepts (:func:`independence_weights`, for a weighted sampler), and check where a model looks: the concept's
saliency map (:func:`concept_saliency`, vanilla gradients or integrated gradients, as the authors compute with
captum) and the share of it inside the concept's ground-truth region (:func:`saliency_in_region`,
:func:`pointing_game`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

Attribution = Literal["gradient", "integrated_gradients"]


def _binary_concepts(concepts: Tensor) -> Tensor:
    if not isinstance(concepts, Tensor) or concepts.ndim != 2 or len(concepts) == 0:
        shape = tuple(concepts.shape) if isinstance(concepts, Tensor) else type(concepts).__name__
        raise ValueError(f"concepts must be a non-empty [N, k] tensor of 0/1 labels, got {shape}.")
    if not ((concepts == 0) | (concepts == 1)).all():
        raise ValueError("concepts must hold 0/1 labels (instance-level binary concepts).")
    return concepts.float()


def cooccurrence_matrix(concepts: Tensor) -> Tensor:
    r"""``[k, k]`` matrix of :math:`P(c_j = 1 \mid c_i = 1)` (row :math:`i`, column :math:`j`; NaN for a concept
    that is never present). An off-diagonal 1 is a pair the paper warns about: :math:`j` is present whenever
    :math:`i` is, so nothing in the labels tells the model which pixels are :math:`i`'s.

    Example::

        >>> cooccurrence_matrix(torch.tensor([[1, 1], [1, 1], [0, 1]])).tolist()
        [[1.0, 1.0], [0.6666666865348816, 1.0]]
    """
    c = _binary_concepts(concepts)
    both = c.T @ c  # [k, k] counts of i and j together
    return both / c.sum(dim=0).unsqueeze(1)


def independence_weights(concepts: Tensor) -> Tensor:
    r"""Per-sample weights ``[N]`` (mean 1) that make the concepts independent where the data allow:

    .. math:: w_i \propto \frac{\prod_j \hat p_j(c_{ij})}{\hat p(c_i)},

    with :math:`\hat p_j` each concept's empirical marginal and :math:`\hat p(c_i)` the frequency of sample
    :math:`i`'s whole concept vector. Sampling with these weights draws each observed concept combination as
    often as it would occur if the concepts were independent (combinations never observed cannot be drawn, so
    the weights are renormalised over the observed ones), so rare examples that separate co-occurring concepts
    are drawn as often as the common ones. Our rule: the paper makes new data instead; with concepts that
    *always* co-occur there is nothing to up-weight and the weights are 1.

    Example::

        >>> c = torch.tensor([[1, 1], [1, 1], [1, 1], [0, 0], [1, 0], [0, 1]])  # marginals 2/3, 2/3
        >>> (9 * independence_weights(c)).round().tolist()  # (4/9) / (3/6), (1/9) / (1/6), (2/9) / (1/6)
        [8.0, 8.0, 8.0, 6.0, 12.0, 12.0]
    """
    c = _binary_concepts(concepts)
    marginal = c.mean(dim=0)
    independent = torch.where(c.bool(), marginal, 1 - marginal).prod(dim=1)  # [N]
    _, pattern, counts = torch.unique(c, dim=0, return_inverse=True, return_counts=True)
    weights = independent / (counts[pattern].float() / len(c))
    return weights / weights.mean()


def concept_saliency(
    concept_logits: Callable[[Tensor], Tensor],
    inputs: Tensor,
    concept: int | Tensor,
    method: Attribution = "gradient",
    steps: int = 32,
    baseline: Tensor | None = None,
) -> Tensor:
    r"""Saliency maps ``[N, H, W]`` of concept logits with respect to image inputs ``[N, C, H, W]``, summed over
    the channels (the authors' ``reduce_heatmap``):

    - ``"gradient"``: :math:`\sum_{ch} |\partial g_j(x) / \partial x|` (vanilla saliency; captum's ``Saliency``
      takes the absolute value);
    - ``"integrated_gradients"``: :math:`\sum_{ch} (x - x_0) \odot \frac1m \sum_{s=1}^{m}
      \partial g_j(x_0 + \tfrac{s - 1/2}{m}(x - x_0)) / \partial x` (signed; midpoint rule with :math:`m` =
      ``steps``; captum's default is Gauss-Legendre), baseline :math:`x_0 = 0` as the authors use.

    Args:
        concept_logits: ``x -> [N, k]`` concept logits (e.g. ``lambda x: model.concept_logits(x)[0]``).
        inputs: ``[N, C, H, W]`` images.
        concept: the concept :math:`j` to explain, one index or one per sample ``[N]``.
        method: ``"gradient"`` or ``"integrated_gradients"``.
        steps: :math:`m`, integration points of integrated gradients.
        baseline: :math:`x_0` (broadcastable to ``inputs``); ``None`` for zeros.

    Example::

        >>> w = torch.zeros(1, 2, 2); w[0, 0, 1] = 3.0
        >>> concept_saliency(lambda x: (x * w).sum(dim=(1, 2, 3)).unsqueeze(1), torch.ones(1, 1, 2, 2), 0).tolist()
        [[[0.0, 3.0], [0.0, 0.0]]]
    """
    if method not in ("gradient", "integrated_gradients"):
        raise ValueError(f"method must be 'gradient' or 'integrated_gradients', got {method!r}.")
    if not isinstance(inputs, Tensor) or inputs.ndim != 4:
        raise ValueError(f"inputs must be [N, C, H, W] images, got {getattr(inputs, 'shape', type(inputs))}.")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}.")
    index = torch.as_tensor(concept, device=inputs.device).long().expand(len(inputs)).unsqueeze(1)

    def grad_at(points: Tensor) -> Tensor:
        points = points.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = concept_logits(points)
            (grad,) = torch.autograd.grad(logits.gather(1, index).sum(), points)
        return grad

    if method == "gradient":
        return grad_at(inputs).abs().sum(dim=1)
    x0 = torch.zeros_like(inputs) if baseline is None else baseline.expand_as(inputs)
    total = torch.zeros_like(inputs)
    for s in range(steps):  # one batched backward per integration point
        total += grad_at(x0 + (s + 0.5) / steps * (inputs - x0))
    return ((inputs - x0) * total / steps).sum(dim=1)


def saliency_in_region(saliency: Tensor, mask: Tensor, within: Tensor | None = None) -> Tensor:
    r"""Share ``[N]`` of each map's absolute saliency inside the ground-truth region,
    :math:`\sum_{p \in M} |s_p| / \sum_{p \in W} |s_p|`, with :math:`W` = ``within`` (e.g. the pixels of every
    object, to ask "of the evidence on objects, how much is on the right one?") or the whole image (NaN for an
    all-zero map). 1: all evidence is on the concept's pixels.

    Example::

        >>> s, m, objects = torch.tensor([[[3.0, -1.0, 4.0]]]), torch.tensor([[[1, 0, 0]]]), torch.tensor([[[1, 1, 0]]])
        >>> saliency_in_region(s, m).tolist(), saliency_in_region(s, m, within=objects).tolist()
        ([0.375], [0.75])
    """
    if saliency.shape != mask.shape or (within is not None and within.shape != mask.shape):
        shapes = [tuple(t.shape) for t in (saliency, mask, within) if t is not None]
        raise ValueError(f"saliency, mask and within must have one shape, got {shapes}.")
    energy = saliency.abs().flatten(1)
    if within is not None:
        energy = energy * within.flatten(1).to(energy.dtype)
    return (energy * mask.flatten(1).to(energy.dtype)).sum(dim=1) / energy.sum(dim=1)


def pointing_game(saliency: Tensor, mask: Tensor) -> Tensor:
    """Whether each map's most salient pixel (of :math:`|s|`) lies inside the region, ``[N]`` bool (the
    pointing game; the authors' variant measures the distance from that pixel to an annotated part location).

    Example::

        >>> pointing_game(torch.tensor([[[0.1, -2.0]]]), torch.tensor([[[False, True]]])).tolist()
        [True]
    """
    if saliency.shape != mask.shape:
        raise ValueError(f"saliency {tuple(saliency.shape)} and mask {tuple(mask.shape)} must have one shape.")
    top = saliency.abs().flatten(1).argmax(dim=1, keepdim=True)
    return mask.flatten(1).gather(1, top).squeeze(1).bool()
