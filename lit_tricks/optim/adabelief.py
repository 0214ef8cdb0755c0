"""AdaBelief: Adam whose step adapts to the belief in the gradient, the EMA of (g - m)^2 (Zhuang et al., 2020)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

from lit_tricks.optim.lion import check_group, checked_param_group, closure_loss

_FLAGS = ("weight_decouple", "fixed_decay", "rectify", "degenerated_to_sgd", "amsgrad")


class AdaBelief(Optimizer):
    r"""AdaBelief (Zhuang et al., "AdaBelief Optimizer: Adapting Stepsizes by the Belief in Observed Gradients",
    NeurIPS 2020), with the defaults of the authors' ``adabelief-pytorch`` 0.2.1: decoupled weight decay and the
    RAdam rectification.

    At step :math:`t` of a parameter :math:`\theta` with gradient :math:`g_t`:

    .. math::
        \theta \leftarrow \theta(1 - \eta\lambda),\qquad
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\qquad
        s_t = \beta_2 s_{t-1} + (1-\beta_2)(g_t - m_t)^2 + \epsilon

    Without rectification: :math:`\theta \leftarrow \theta - \frac{\eta}{1-\beta_1^t}\, m_t /
    (\sqrt{s_t / (1-\beta_2^t)} + \epsilon)`. With it (RAdam): :math:`\rho_\infty = 2/(1-\beta_2) - 1`,
    :math:`\rho_t = \rho_\infty - 2t\beta_2^t/(1-\beta_2^t)`; if :math:`\rho_t \ge 5`,
    :math:`\theta \leftarrow \theta - \eta r_t\, m_t / (\sqrt{s_t} + \epsilon)` with
    :math:`r_t = \sqrt{(1-\beta_2^t)\frac{(\rho_t-4)(\rho_t-2)\rho_\infty}{(\rho_\infty-4)\rho_t(\rho_\infty-2)}}
    / (1-\beta_1^t)`; otherwise (the first ~5 steps for :math:`\beta_2` = 0.999) an SGD-with-momentum step
    :math:`\theta \leftarrow \theta - \eta\, m_t / (1-\beta_1^t)` (``degenerated_to_sgd``) or no step.

    State per parameter: ``step`` (an int), ``exp_avg`` (:math:`m`), ``exp_avg_var`` (:math:`s`) and with
    ``amsgrad`` ``max_exp_avg_var`` (:math:`\max_{\tau \le t} s_\tau`, which then replaces :math:`s_t` in the
    denominators). Multi-tensor (``torch._foreach_*``) updates, one per parameter group, step count, device and
    dtype; the step is not differentiable.

    Args:
        params: the parameters, or dicts defining parameter groups (which may override any argument below).
        lr: learning rate :math:`\eta`, > 0.
        betas: :math:`(\beta_1, \beta_2)`, each in [0, 1).
        eps: :math:`\epsilon` >= 0, added to :math:`s_t` and to its square root (the authors recommend 1e-16 where
            Adam beats SGD, e.g. transformers and GANs, and 1e-8 for CNNs on images).
        weight_decay: :math:`\lambda` >= 0.
        weight_decouple: decoupled decay as above (AdamW); ``False``: an L2 term :math:`\lambda\theta` added to
            the gradient.
        fixed_decay: with ``weight_decouple``, decay by :math:`1 - \lambda` instead of :math:`1 - \eta\lambda`.
        rectify: the RAdam rectification above.
        degenerated_to_sgd: with ``rectify``, take the SGD-with-momentum step while :math:`\rho_t < 5`.
        amsgrad: use the running maximum of :math:`s_t`.

    Example::

        >>> import torch
        >>> p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
        >>> opt = AdaBelief([p], lr=0.1)
        >>> p.grad = torch.tensor([0.5, -0.3])
        >>> opt.step()  # rho_1 = 1 < 5: an SGD step, 0.1 * m_1 / (1 - 0.9) = 0.1 * g
        >>> p.detach()
        tensor([ 0.9500, -1.9700])
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-16,
        weight_decay: float = 0.0,
        weight_decouple: bool = True,
        fixed_decay: bool = False,
        rectify: bool = True,
        degenerated_to_sgd: bool = True,
        amsgrad: bool = False,
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "weight_decouple": weight_decouple,
            "fixed_decay": fixed_decay,
            "rectify": rectify,
            "degenerated_to_sgd": degenerated_to_sgd,
            "amsgrad": amsgrad,
        }
        check_group(defaults, flags=_FLAGS)
        super().__init__(params, {**defaults, "betas": tuple(betas)})

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(checked_param_group(self, param_group, flags=_FLAGS))

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One AdaBelief update of every parameter that has a gradient; returns the closure's loss, if given."""
        loss = closure_loss(closure)
        for group in self.param_groups:
            # parameters grouped by their step count (the same for all unless some missed a gradient), since the
            # bias corrections and the rectification are scalars of the step
            by_step: dict[int, list[list[Tensor]]] = {}
            amsgrad = group["amsgrad"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdaBelief does not support sparse gradients.")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_var"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if amsgrad and "max_exp_avg_var" not in state:
                    state["max_exp_avg_var"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                tensors = [p, p.grad, state["exp_avg"], state["exp_avg_var"]]
                if amsgrad:
                    tensors.append(state["max_exp_avg_var"])
                lists = by_step.setdefault(state["step"], [[] for _ in tensors])
                for bucket, tensor in zip(lists, tensors, strict=True):
                    bucket.append(tensor)
            for step, lists in by_step.items():
                for tensors, _ in _group_tensors_by_device_and_dtype(lists).values():
                    maximum = tensors[4] if amsgrad else None
                    adabelief_update(*tensors[:4], maximum, step=step, group=group)
        return loss


def rectification(step: int, beta1: float, beta2: float, degenerated_to_sgd: bool) -> tuple[float, float]:
    r"""RAdam's :math:`(\rho_t, r_t)` as in the authors' code: :math:`r_t` multiplies the learning rate; for
    :math:`\rho_t < 5` it is :math:`1/(1-\beta_1^t)` (an SGD step) if ``degenerated_to_sgd``, else 0 (no step)."""
    beta2_t = beta2**step
    rho_max = 2 / (1 - beta2) - 1
    rho = rho_max - 2 * step * beta2_t / (1 - beta2_t)
    if rho >= 5:
        ratio = (1 - beta2_t) * (rho - 4) / (rho_max - 4) * (rho - 2) / rho * rho_max / (rho_max - 2)
        return rho, math.sqrt(ratio) / (1 - beta1**step)
    return rho, 1.0 / (1 - beta1**step) if degenerated_to_sgd else 0.0


def adabelief_update(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_vars: list[Tensor],
    max_exp_avg_vars: list[Tensor] | None,
    *,
    step: int,
    group: dict[str, Any],
) -> None:
    """AdaBelief's update at ``step`` of lists of tensors on one device with one dtype, in place (see
    :class:`AdaBelief`; ``group`` holds the hyperparameters)."""
    lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
    beta1, beta2 = group["betas"]
    if weight_decay != 0:
        if group["weight_decouple"]:
            torch._foreach_mul_(params, 1.0 - (weight_decay if group["fixed_decay"] else lr * weight_decay))
        else:
            grads = torch._foreach_add(grads, params, alpha=weight_decay)
    # g - m_t = beta1 (g - m_{t-1}): one new tensor d serves both moments and then holds the denominator
    d = torch._foreach_sub(grads, exp_avgs)
    torch._foreach_add_(exp_avgs, d, alpha=1.0 - beta1)
    torch._foreach_mul_(exp_avg_vars, beta2)
    torch._foreach_addcmul_(exp_avg_vars, d, d, value=(1.0 - beta2) * beta1 * beta1)
    torch._foreach_add_(exp_avg_vars, eps)
    second = exp_avg_vars
    if max_exp_avg_vars is not None:
        torch._foreach_maximum_(max_exp_avg_vars, exp_avg_vars)
        second = max_exp_avg_vars
    if group["rectify"]:
        rho, step_size = rectification(step, beta1, beta2, group["degenerated_to_sgd"])
        if rho < 5:
            if step_size > 0:
                torch._foreach_add_(params, exp_avgs, alpha=-lr * step_size)
            return
    denom = d
    torch._foreach_copy_(denom, second)
    torch._foreach_sqrt_(denom)
    if not group["rectify"]:
        step_size = 1.0 / (1 - beta1**step)
        torch._foreach_div_(denom, math.sqrt(1 - beta2**step))
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denom, value=-lr * step_size)
