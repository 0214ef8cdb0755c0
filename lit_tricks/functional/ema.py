"""Exponential moving averages of weights: the decay schedule and the in-place update."""

from __future__ import annotations

import torch
from torch import Tensor


def half_life_to_decay(half_life: float, every_n_steps: int = 1) -> float:
    r"""The decay whose weight on the past halves every ``half_life`` optimizer steps:
    :math:`\beta = 0.5^{k / h}` for updates every :math:`k` steps."""
    if half_life <= 0:
        raise ValueError(f"half_life must be positive, got {half_life}.")
    return 0.5 ** (every_n_steps / half_life)


def ema_decay(step: int, decay: float, warmup: bool = False, gamma: float = 1.0, power: float = 2 / 3) -> float:
    r"""The decay of update number ``step`` (0 for the first update, which copies the weights).

    Without warm-up :math:`\beta_t = \beta` for :math:`t \ge 1`; with warm-up (as timm's ``ModelEmaV3``)
    :math:`\beta_t = \min(\beta, 1 - (1 + t/\gamma)^{-p})`, which lets the average forget its random
    initialisation quickly; with :math:`p = 2/3` it reaches 0.999 after about 31.6k steps.
    """
    if step <= 0:
        return 0.0
    if not warmup:
        return decay
    return min(decay, 1.0 - (1.0 + step / gamma) ** -power)


@torch.no_grad()
def ema_update_(averages: list[Tensor], values: list[Tensor], decay: float) -> None:
    r"""In place, :math:`a \leftarrow \beta a + (1 - \beta) v` for every pair, in one fused
    ``torch._foreach_lerp_`` (tensors grouped by device and dtype internally); ``decay`` is a Python float,
    so there is no host-device synchronisation."""
    if averages:
        torch._foreach_lerp_(averages, values, 1.0 - decay)


@torch.no_grad()
def ema_update_finite_(averages: list[Tensor], values: list[Tensor], decay: float) -> Tensor:
    r""":func:`ema_update_`, skipped as a whole when any value is NaN or infinite, so the averages never take a
    non-finite value. Decided on the device (no host-device synchronisation): the update is computed into new
    tensors and kept only if every value is finite. Returns the decision, a 0-dim bool tensor."""
    if not values:
        return torch.tensor(True)
    device = values[0].device
    largest = torch.stack([norm.to(device) for norm in torch._foreach_norm(values, float("inf"))])
    finite = largest.isfinite().all()
    for average, updated in zip(averages, torch._foreach_lerp(averages, values, 1.0 - decay), strict=True):
        torch.where(finite.to(average.device), updated, average, out=average)
    return finite
