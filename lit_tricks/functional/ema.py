"""Exponential moving averages of weights: the decay schedule and the in-place update."""

from __future__ import annotations

import math

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
def ema_update_finite_(averages: list[Tensor], values: list[Tensor], decay: float) -> Tensor | bool:
    r""":func:`ema_update_`, skipped as a whole when any value is NaN or infinite, so finite averages stay finite.

    Every value is finite when all their norms are (a weight beyond about :math:`10^{19}` overflows its float32
    norm and counts as not finite). On the CPU the update then runs or not; on an accelerator the decision
    stays on the device (:func:`lerp_where_`), with no host-device synchronisation. Returns the decision: a
    0-dim bool tensor on an accelerator, a Python bool on the CPU.
    """
    if not values:
        return True
    norms = torch.stack(torch._foreach_norm(values, 2, dtype=torch.float32))
    if norms.device.type != "cpu":
        finite = norms.isfinite().all()
        lerp_where_(averages, values, decay, finite)
        return finite
    finite = math.isfinite(norms.sum())  # norms are >= 0: their sum is finite only if each one is
    if finite:
        ema_update_(averages, values, decay)
    return finite


@torch.no_grad()
def lerp_where_(averages: list[Tensor], values: list[Tensor], decay: float, condition: Tensor) -> None:
    r""":math:`a \leftarrow \mathrm{lerp}(a, v^f, (1 - \beta) f)` with :math:`f` the 0-dim bool ``condition``
    as a number: the EMA update where it holds and an exact no-op where not, even for NaN or infinite values,
    decided on the device. :math:`v^1 = v` (exactly, on the CPU), and :math:`v^0 = 1` is finite even for NaN
    or inf, so the weight 0 leaves :math:`a` as it was. Two fused passes (power, lerp) instead of one."""
    flag = condition.float()
    torch._foreach_lerp_(averages, torch._foreach_pow(values, flag), (1.0 - decay) * flag)
