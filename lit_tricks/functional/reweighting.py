"""Loss-based sample reweighting (Sow et al., ICLR 2025): per-sample weights from the losses of the global batch."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

Strategy = Literal["linupper", "quadratic", "extremes"]


def normalize_losses(losses: Tensor, delta: float = 1.0) -> Tensor:
    r"""Map the batch's losses linearly onto :math:`[-\delta, \delta]` (smallest to :math:`-\delta`):
    :math:`h(\ell) = (2\delta\,\ell - \delta(\ell_{\max} + \ell_{\min})) / (\ell_{\max} - \ell_{\min})`,
    the denominator clamped at :math:`10^{-6}`."""
    low, high = losses.min(), losses.max()
    span = (high - low).clamp_min(1e-6)
    return (2 * delta * losses - delta * (high + low)) / span


def strategy_scores(x: Tensor, strategy: Strategy, delta: float = 1.0) -> Tensor:
    r"""The paper's strategies on normalised losses :math:`x \in [-\delta, \delta]`: ``linupper``
    :math:`\min(x + \delta, \delta)` (down-weights easy samples), ``quadratic`` :math:`1 - x^2/\delta^2`
    (favours medium losses), ``extremes`` :math:`|x|` (favours both ends)."""
    if strategy == "linupper":
        return torch.clamp(x + delta, max=delta)
    if strategy == "quadratic":
        return 1.0 - x.square() / delta**2
    if strategy == "extremes":
        return x.abs()
    raise ValueError(f"strategy must be 'linupper', 'quadratic' or 'extremes', got {strategy!r}.")


def reweighting_weights(losses: Tensor, strategy: Strategy, temperature: float = 1.0, delta: float = 1.0) -> Tensor:
    r"""Weights :math:`w_i = N\,\mathrm{softmax}_i\big(f(h(\ell))/r\big)`, mean 1 over the batch given (pass
    the global batch under DDP); no gradient."""
    scores = strategy_scores(normalize_losses(losses.detach().float(), delta), strategy, delta)
    return torch.softmax(scores / temperature, dim=0) * len(losses)
