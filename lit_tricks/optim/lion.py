"""Lion: the sign of an interpolated momentum, with decoupled weight decay (Chen et al., 2023)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

from lit_tricks.core.checks import check_number


def check_group(group: Mapping[str, Any], where: str = "", flags: tuple[str, ...] = ()) -> None:
    """Raise a clear error for a bad ``lr``, ``betas``, ``weight_decay``, ``eps`` (if present) or boolean ``flags``
    of a param group (or of an optimizer's defaults); ``where`` names the group in the message."""
    check_number(f"lr{where}", group["lr"], above=0.0, hint="Pass a positive learning rate, e.g. lr=1e-4.")
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"betas{where} must be a pair (beta1, beta2), e.g. (0.9, 0.99); got {betas!r}.")
    for i, beta in enumerate(betas):
        check_number(f"betas[{i}]{where}", beta, at_least=0.0, below=1.0, hint="Each beta is a decay in [0, 1).")
    check_number(f"weight_decay{where}", group["weight_decay"], at_least=0.0, hint="Use 0.0 for no decay.")
    if "eps" in group:
        check_number(f"eps{where}", group["eps"], at_least=0.0)
    for name in flags:
        if not isinstance(group[name], bool):
            raise TypeError(f"{name}{where} must be True or False, got {group[name]!r}.")


def checked_param_group(optimizer: Optimizer, param_group: dict[str, Any], flags: tuple[str, ...] = ()) -> dict:
    """``param_group`` with its parameters in a list (a generator is read once), after :func:`check_group` on it
    merged with the optimizer's defaults; complex parameters, which neither reference defines an update for, are
    refused."""
    group = dict(param_group)
    if not isinstance(group["params"], (Tensor, set)):
        group["params"] = list(group["params"])
    check_group({**optimizer.defaults, **group}, where=f" (param group {len(optimizer.param_groups)})", flags=flags)
    for p in [group["params"]] if isinstance(group["params"], Tensor) else group["params"]:
        if isinstance(p, Tensor) and p.is_complex():
            name = type(optimizer).__name__
            raise TypeError(f"{name} does not support complex parameters; split them with torch.view_as_real.")
    return group


def closure_loss(closure: Callable[[], Tensor] | None) -> Tensor | None:
    """Run the optimizer step's ``closure`` (forward and backward) with gradients enabled."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class Lion(Optimizer):
    r"""Lion, "EvoLved Sign Momentum" (Chen et al., "Symbolic Discovery of Optimization Algorithms", NeurIPS 2023).

    For a parameter :math:`\theta` with gradient :math:`g_t` and momentum :math:`m` (``exp_avg``, the only state):

    .. math::
        c_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\qquad
        \theta_t = \theta_{t-1}(1 - \eta\lambda) - \eta\,\mathrm{sign}(c_t),\qquad
        m_t = \beta_2 m_{t-1} + (1-\beta_2) g_t

    with :math:`\eta` = ``lr`` and :math:`\lambda` = ``weight_decay`` (decoupled: the decay is applied to the
    weights before the sign step, as in the authors' ``lion_pytorch.py``). Every update has the same magnitude
    per coordinate, so the paper uses a learning rate 3-10x smaller and a weight decay 3-10x larger than AdamW's.
    One multi-tensor (``torch._foreach_*``) update per parameter group, device and dtype; the step is not
    differentiable. Memory: one state tensor per parameter (Adam keeps two).

    Args:
        params: the parameters, or dicts defining parameter groups (which may override any argument below).
        lr: learning rate :math:`\eta`, > 0.
        betas: :math:`(\beta_1, \beta_2)`, each in [0, 1): the interpolation of the update and the momentum's decay.
        weight_decay: decoupled weight decay :math:`\lambda` >= 0.

    Example::

        >>> import torch
        >>> p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
        >>> opt = Lion([p], lr=0.1)
        >>> p.grad = torch.tensor([0.5, -0.3])
        >>> opt.step()
        >>> p.detach()
        tensor([ 0.9000, -1.9000])
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
    ) -> None:
        defaults = {"lr": lr, "betas": betas, "weight_decay": weight_decay}
        check_group(defaults)
        super().__init__(params, {**defaults, "betas": tuple(betas)})

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(checked_param_group(self, param_group))

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One Lion update of every parameter that has a gradient; returns the closure's loss, if given."""
        loss = closure_loss(closure)
        for group in self.param_groups:
            params, grads, exp_avgs = [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Lion does not support sparse gradients.")
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                params.append(p)
                grads.append(p.grad)
                exp_avgs.append(state["exp_avg"])
            if not params:
                continue
            beta1, beta2 = group["betas"]
            for (p, g, m), _ in _group_tensors_by_device_and_dtype([params, grads, exp_avgs]).values():
                lion_update(p, g, m, lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"])
        return loss


def lion_update(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
) -> None:
    """Lion's update of lists of tensors on one device with one dtype, in place (see :class:`Lion`)."""
    if weight_decay != 0:
        torch._foreach_mul_(params, 1.0 - lr * weight_decay)
    update = torch._foreach_lerp(exp_avgs, grads, 1.0 - beta1)  # beta1 * m + (1 - beta1) * g
    torch._foreach_sign_(update)
    torch._foreach_add_(params, update, alpha=-lr)
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta2)
