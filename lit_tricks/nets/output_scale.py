"""Output scale alpha: lazy vs rich training (Chizat et al., 2019; Kumar et al., "Grokking as the Transition from
Lazy to Rich Training Dynamics", ICLR 2024)."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from lit_tricks.core.checks import check_number


def _check_alpha(alpha: float) -> None:
    check_number("alpha", alpha, above=0.0, hint="Large alpha: lazy (kernel) training; small alpha: rich.")


def lazy_rich_lr(base_lr: float, alpha: float) -> float:
    r"""The learning rate that goes with output scale ``alpha``: :math:`\eta = \eta_0 / \alpha^2`.

    With :math:`f = \alpha\,(f_\theta - f_{\theta_0})` and gradient descent, one step moves the output by
    :math:`\alpha^2 \eta\, K \nabla_f L` (:math:`K` the tangent kernel), so :math:`\eta_0/\alpha^2` keeps the
    output's speed fixed while the weights move :math:`1/\alpha` as far: large ``alpha`` is lazy, small is rich.
    The same as Kumar et al.'s loss :math:`L/\alpha^2` at learning rate :math:`\eta_0` for plain SGD.
    """
    check_number("base_lr", base_lr, above=0.0)
    _check_alpha(alpha)
    return base_lr / alpha**2


def _freeze_copy(net: nn.Module) -> nn.Module:
    """A copy of ``net`` whose parameters are buffers: saved and moved with the module, never optimized."""
    frozen = copy.deepcopy(net)
    for module in frozen.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            delattr(module, name)
            module.register_buffer(name, param.detach().clone())
    return frozen


class OutputScale(nn.Module):
    r"""Scale a network's output by ``alpha``, centred at initialisation: :math:`f(x) = \alpha\,(f_\theta(x) -
    f_{\theta_0}(x))`.

    The laziness knob of Chizat et al. (2019), with which Kumar et al. (ICLR 2024) control grokking: large
    ``alpha`` keeps training in the lazy (linearised, kernel) regime, small ``alpha`` makes it rich (feature
    learning). Train it with :func:`lazy_rich_lr` (:math:`\eta_0/\alpha^2`). Centring (``center=True``) makes the
    output exactly 0 at initialisation whatever ``alpha``; it keeps a frozen copy of the initial network (its
    weights as buffers: in the checkpoint, not in ``parameters()``), costing a second forward pass without
    gradient. With dropout or batch statistics the two passes see different noise, so the centred output is
    zero at initialisation in eval mode only.

    Args:
        net: any module mapping inputs to outputs (logits).
        alpha: the output scale, > 0.
        center: subtract the initial network's output (Kumar et al.'s centred model).
    """

    def __init__(self, net: nn.Module, alpha: float = 1.0, center: bool = True) -> None:
        super().__init__()
        if not isinstance(net, nn.Module):
            raise TypeError(f"net must be a torch.nn.Module, got {type(net).__name__}.")
        _check_alpha(alpha)
        if not isinstance(center, bool):
            raise TypeError(f"center must be a bool, got {type(center).__name__}.")
        self.net, self.alpha, self.center = net, float(alpha), center
        self.initial = _freeze_copy(net) if center else None

    def forward(self, x: Tensor) -> Tensor:
        out = self.net(x)
        if self.initial is not None:
            with torch.no_grad():
                start = self.initial(x)
            out = out - start
        return self.alpha * out

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, center={self.center}"
