"""Early-learning regularisation (Liu et al., NeurIPS 2020) for training with noisy labels."""

from __future__ import annotations

import torch
from torch import Tensor


def elr_probabilities(softmax: Tensor) -> Tensor:
    """The clamped softmax ELR uses, from the softmax :math:`\\sigma(z)`:
    :math:`p = \\mathrm{clamp}(\\sigma(z), 10^{-4}, 1 - 10^{-4})`."""
    return softmax.clamp(1e-4, 1.0 - 1e-4)


def elr_targets(previous: Tensor, probs: Tensor, beta: float) -> Tensor:
    r"""The running targets :math:`t \leftarrow \beta t + (1 - \beta)\,\hat p`, with :math:`\hat p` the
    clamped probabilities renormalised to sum to 1 (no gradient)."""
    p = probs.detach()
    return torch.lerp(p / p.sum(dim=-1, keepdim=True), previous, beta)


def elr_penalty(probs: Tensor, targets: Tensor) -> Tensor:
    r"""Per-sample :math:`\log(1 - \langle t_i, p_i \rangle)`; its gradient flows through :math:`p` only.
    Minimising it pulls :math:`p` towards the targets the model predicted early in training."""
    return torch.log(1.0 - torch.linalg.vecdot(targets.detach(), probs))
