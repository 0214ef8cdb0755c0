"""Classification losses, per sample, with class-id or probability targets."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lit_tricks.functional.mixing import one_hot


def soft_target_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    r"""Per-sample cross-entropy :math:`\ell_i = -\sum_c t_{ic} \log \mathrm{softmax}(z_i)_c`.

    Args:
        logits: ``[N, C]``.
        targets: class ids ``[N]`` (then this equals ``F.cross_entropy(..., reduction="none")``) or
            probabilities ``[N, C]``.

    Returns:
        ``[N]`` losses.
    """
    if targets.ndim == 1:
        return F.cross_entropy(logits, targets, reduction="none")
    return -(targets * F.log_softmax(logits, dim=-1)).sum(dim=-1)


def to_probabilities(targets: Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Probability targets ``[N, C]`` in ``dtype``: class ids ``[N]`` one-hot, probabilities as they are (the same
    tensor when already ``dtype``)."""
    if targets.ndim == 2:
        return targets.to(dtype)
    return one_hot(targets, num_classes).to(dtype)


def weighted_mean(per_sample_loss: Tensor, weight: Tensor | None) -> Tensor:
    r""":math:`\frac{1}{N}\sum_i w_i \ell_i` (plain mean when ``weight`` is ``None``).

    Dividing by the batch size rather than by :math:`\sum_i w_i` keeps the data-parallel gradient equal to
    the single-process one when weights are normalised over the global batch (mean weight 1).
    """
    if weight is None:
        return per_sample_loss.mean()
    return (weight * per_sample_loss).mean()
