"""Perpendicular gradient (⊥Grad, Prieto et al., 2025): drop the gradient's component along the weights."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from lit_tricks.core.checks import check_number


def _check_options(rescale: bool, eps: float) -> None:
    if not isinstance(rescale, bool):
        raise TypeError(f"rescale must be a bool, got {type(rescale).__name__}.")
    check_number("eps", eps, at_least=0.0, hint="The authors use 1e-30.")


@torch.no_grad()
def perpendicular_grad_(params: Iterable[Tensor], rescale: bool = True, eps: float = 1e-30) -> None:
    r"""In place, per tensor: :math:`g_\perp = g - \frac{\langle w, g\rangle}{\langle w, w\rangle + \epsilon} w`.

    With ``rescale`` (the authors' code) the result is then scaled to the old norm,
    :math:`g \leftarrow g_\perp \, \lVert g\rVert / (\lVert g_\perp\rVert + \epsilon)`. Parameters without a
    gradient are skipped. Norms and updates are multi-tensor ops per device and dtype.
    """
    _check_options(rescale, eps)
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = defaultdict(list)
    for p in params:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            raise RuntimeError("perpendicular_grad_ does not support sparse gradients.")
        groups[(p.device, p.dtype)].append(p)
    for tensors in groups.values():
        weights = [p.detach() for p in tensors]
        grads = [p.grad for p in tensors]
        # No multi-tensor dot product exists; one dot per tensor beats _foreach_mul + cat + segment_reduce (7x on CPU).
        dots = torch.stack([torch.dot(w.reshape(-1), g.reshape(-1)) for w, g in zip(weights, grads, strict=True)])
        coef = dots / (torch.stack(torch._foreach_norm(weights)).square() + eps)
        old_norms = torch.stack(torch._foreach_norm(grads)) if rescale else None
        torch._foreach_addcmul_(grads, weights, list(coef.neg().unbind()))
        if rescale:
            scale = old_norms / (torch.stack(torch._foreach_norm(grads)) + eps)
            torch._foreach_mul_(grads, list(scale.unbind()))


class PerpendicularGradient(Callback):
    r"""⊥Grad for any optimizer: project each parameter's gradient orthogonal to the parameter before the step.

    Runs in ``on_before_optimizer_step`` (after backward, gradient accumulation, the data-parallel all-reduce
    and AMP unscaling; before gradient clipping and the step) on every parameter of the optimizer being stepped,
    as the authors' ``OrthoGrad`` wrapper does.

    Args:
        rescale: scale the projected gradient back to the original gradient's norm (the authors' code).
        eps: added to :math:`\lVert w\rVert^2` and to :math:`\lVert g_\perp\rVert` (the authors: 1e-30).
    """

    def __init__(self, rescale: bool = True, eps: float = 1e-30) -> None:
        _check_options(rescale, eps)
        self.rescale, self.eps = rescale, float(eps)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        perpendicular_grad_(params, rescale=self.rescale, eps=self.eps)
