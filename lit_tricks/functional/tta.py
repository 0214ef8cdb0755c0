"""Test-time adaptation math: entropy losses, RMT's symmetric cross-entropy and prototype contrast, AdaNPC's
k-NN vote, source class prototypes, and a light augmentation for small images and signals."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def softmax_entropy(logits: Tensor) -> Tensor:
    r"""Per-sample entropy :math:`H(p) = -\sum_c p_c \log p_c` of ``softmax(logits)``."""
    return -(logits.softmax(dim=-1) * logits.log_softmax(dim=-1)).sum(dim=-1)


def filtered_entropy(logits: Tensor, margin: float = 0.4) -> Tensor:
    r"""EATA's reliable-sample entropy, used by EcoTTA (Eq. 2): the mean of :math:`H(p_i)` over the samples with
    :math:`H(p_i) < H_0 = \text{margin}\cdot\ln C`; zero (with a gradient path) when no sample qualifies."""
    entropy = softmax_entropy(logits)
    keep = entropy < margin * math.log(logits.shape[-1])
    return entropy[keep].sum() / keep.sum().clamp(min=1)


def symmetric_cross_entropy(student: Tensor, teacher: Tensor, alpha: float = 0.5) -> Tensor:
    r"""Per-sample :math:`-(1-\alpha)\sum_c q_c \log p_c - \alpha \sum_c p_c \log q_c` with :math:`p`, :math:`q`
    the softmax of the ``student`` and (no-gradient) ``teacher`` logits (RMT's self-training loss)."""
    teacher = teacher.detach()
    forward = -(teacher.softmax(-1) * student.log_softmax(-1)).sum(-1)
    backward = -(student.softmax(-1) * teacher.log_softmax(-1)).sum(-1)
    return (1 - alpha) * forward + alpha * backward


def prototype_contrastive_loss(views: Tensor, temperature: float = 0.1) -> Tensor:
    r"""SupCon without labels over ``views`` ``[B, V, D]`` (already projected): the ``V`` views of a sample are each
    other's positives, every other row a negative. With :math:`z` the L2-normalised rows and :math:`P(a)` the
    positives of anchor :math:`a`,

    .. math:: \mathcal L = -\frac{1}{BV}\sum_a \frac{1}{|P(a)|}\sum_{p \in P(a)}
              \log\frac{\exp(z_a\cdot z_p/\tau)}{\sum_{k \ne a}\exp(z_a\cdot z_k/\tau)}.

    RMT uses the views (nearest source prototype, :math:`f(x)`, :math:`f(\tilde x)`)."""
    b, v, _ = views.shape
    z = F.normalize(views.flatten(0, 1), dim=1)  # [B V, D], sample-major
    logits = z @ z.T / temperature
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    same = torch.arange(b, device=z.device).repeat_interleave(v)
    self_mask = torch.eye(b * v, dtype=torch.bool, device=z.device)
    positives = (same[:, None] == same[None, :]) & ~self_mask
    log_prob = logits - torch.logsumexp(logits.masked_fill(self_mask, -math.inf), dim=1, keepdim=True)
    return -(log_prob * positives).sum(dim=1).div(positives.sum(dim=1)).mean()


def knn_probabilities(
    features: Tensor, memory: Tensor, memory_labels: Tensor, num_classes: int, k: int = 100, temperature: float = 0.1
) -> Tensor:
    r"""AdaNPC's vote: with cosine similarities :math:`s_j` of the ``k`` nearest rows of ``memory`` (unit rows),
    :math:`p_c = \sum_j \mathrm{softmax}(s/T)_j\,\mathbb 1[y_j = c]`. Returns ``[N, num_classes]``."""
    similarity = F.normalize(features, dim=1) @ memory.T
    weights, index = similarity.topk(min(k, len(memory)), dim=1)
    weights = (weights / temperature).softmax(dim=1)
    probs = torch.zeros(len(features), num_classes, device=features.device, dtype=weights.dtype)
    return probs.scatter_add_(1, memory_labels[index], weights)


def class_prototypes(features: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """Per-class means ``[num_classes, D]`` of source ``features`` ``[N, D]`` (RMT's source prototypes).

    Raises ``ValueError`` naming the classes without a sample, whose prototype would be undefined."""
    if features.ndim != 2 or len(features) != len(labels):
        raise ValueError(f"features must be [N, D] with one label each, got {tuple(features.shape)} and {len(labels)}.")
    counts = torch.bincount(labels, minlength=num_classes)
    if len(counts) > num_classes or (counts == 0).any():
        missing = (counts[:num_classes] == 0).nonzero().flatten().tolist()
        raise ValueError(
            f"Source statistics are missing for classes {missing} (or labels exceed num_classes={num_classes}): "
            "pass source samples of every class."
        )
    sums = torch.zeros(num_classes, features.shape[1], dtype=features.dtype, device=features.device)
    return sums.index_add_(0, labels, features) / counts[:, None].to(features.dtype)


def default_augment(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """A light, label-preserving augmentation for small images ``[N, C, H, W]`` and signals ``[N, L]``:
    per-sample contrast in [0.7, 1.3] and brightness in [-0.1, 0.1] (relative to the sample's range), a shift
    of up to one pixel (two samples for signals), and Gaussian noise of 0.5% of the range."""
    n, device = len(x), x.device
    dims = tuple(range(1, x.ndim))
    shape = (n, *[1] * (x.ndim - 1))
    span = (x.amax(dim=dims, keepdim=True) - x.amin(dim=dims, keepdim=True)).clamp(min=1e-6)
    mean = x.mean(dim=dims, keepdim=True)
    contrast = (0.7 + 0.6 * torch.rand(shape, generator=generator)).to(device)
    brightness = (0.2 * torch.rand(shape, generator=generator) - 0.1).to(device) * span
    out = (x - mean) * contrast + mean + brightness
    limit = 2 if x.ndim == 2 else 1
    shifts = torch.randint(-limit, limit + 1, (x.ndim - 1 if x.ndim == 2 else 2,), generator=generator).tolist()
    out = torch.roll(out, shifts=shifts, dims=(-1,) if x.ndim == 2 else (-2, -1))
    return out + 0.005 * span * torch.randn(x.shape, generator=generator).to(device)
