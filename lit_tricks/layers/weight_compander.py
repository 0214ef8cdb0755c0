"""Weight Compander (Cakaj, Mehnert and Yang, "Weight Compander: A Simple Weight Reparameterization for
Regularization", 2023): every Linear/Conv weight is computed from a free tensor through a fixed nonlinear map.

The map used here is a power-law compander (NOT verified against the paper or any code, see
docs/weight_compander.md):

    w = f(v) = sign(v) * ((|v| + beta)^alpha - beta^alpha),   0 < alpha <= 1, beta > 0

It is odd, increasing and concave in ``|v|``: its slope ``alpha * (|v| + beta)^(alpha - 1)`` is largest at
``v = 0`` (``alpha * beta^(alpha - 1)``, 5 for the defaults), which pushes small weights away from zero, and
falls as ``|v|`` grows, which restrains large ones. ``alpha = 1`` is the identity.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd
from torch.nn.utils import parametrize

from lit_tricks.core.checks import check_number

_LAYERS = (nn.Linear, _ConvNd)


def _check(alpha: float, beta: float) -> None:
    check_number("alpha", alpha, above=0.0, at_most=1.0, hint="Use an exponent in (0, 1], e.g. 0.5.")
    check_number("beta", beta, above=0.0, hint="Use a positive offset, e.g. 0.01.")


def compand(v: Tensor, alpha: float = 0.5, beta: float = 0.01) -> Tensor:
    """``f(v) = sign(v) * ((|v| + beta)^alpha - beta^alpha)``, elementwise.

    Written per sign branch so the gradient at ``v = 0`` is the one-sided limit ``alpha * beta^(alpha - 1)``
    (``sign(v)`` times a function of ``|v|`` would give autograd a zero gradient there).
    """
    _check(alpha, beta)
    return _compand(v, alpha, beta)


def _compand(v: Tensor, alpha: float, beta: float) -> Tensor:
    offset = beta**alpha
    return torch.where(v >= 0, (v.clamp(min=0) + beta) ** alpha - offset, offset - ((-v).clamp(min=0) + beta) ** alpha)


def expand(w: Tensor, alpha: float = 0.5, beta: float = 0.01) -> Tensor:
    """The inverse of :func:`compand`: ``v = sign(w) * ((|w| + beta^alpha)^(1 / alpha) - beta)``."""
    _check(alpha, beta)
    return torch.sign(w) * ((w.abs() + beta**alpha) ** (1.0 / alpha) - beta)


class WeightCompander(nn.Module):
    """A ``torch.nn.utils.parametrize`` parametrization: the layer's weight is ``compand(original)``.

    ``right_inverse`` (:func:`expand`) makes registration keep the layer's current weight (``original`` is
    set to ``expand(weight)``), so the network computes the same function right after it is applied.
    """

    def __init__(self, alpha: float = 0.5, beta: float = 0.01) -> None:
        super().__init__()
        _check(alpha, beta)
        self.alpha = alpha
        self.beta = beta

    def forward(self, v: Tensor) -> Tensor:
        return _compand(v, self.alpha, self.beta)  # checked once, in __init__

    def right_inverse(self, w: Tensor) -> Tensor:
        return expand(w, self.alpha, self.beta)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}"


def _companded(module: nn.Module) -> bool:
    return parametrize.is_parametrized(module, "weight") and any(
        isinstance(p, WeightCompander) for p in module.parametrizations["weight"]
    )


def weight_compander(model: nn.Module, alpha: float = 0.5, beta: float = 0.01) -> nn.Module:
    """Register :class:`WeightCompander` on the ``weight`` of every ``nn.Linear`` and ``nn.Conv*d`` (and
    transposed conv) in ``model``, in place; biases and normalisation layers are untouched. Returns ``model``.

    Call it before the optimizer is built: the trainable tensors become ``...parametrizations.weight.original``
    (the state-dict keys change accordingly). Undo with :func:`remove_weight_compander`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    _check(alpha, beta)
    layers = [m for m in model.modules() if isinstance(m, _LAYERS) and isinstance(m.weight, Tensor)]
    if not layers:
        raise ValueError(
            f"weight_compander found no nn.Linear or nn.Conv*d layer in {type(model).__name__}; "
            "it reparametrizes only those layers' weights."
        )
    if any(_companded(m) for m in layers):
        raise ValueError("weight_compander was already applied to this model; call remove_weight_compander first.")
    for layer in layers:
        parametrize.register_parametrization(layer, "weight", WeightCompander(alpha, beta))
    return model


def remove_weight_compander(model: nn.Module) -> nn.Module:
    """Export: replace every companded weight by a plain parameter holding ``compand(original)``, in place.

    The model computes the same outputs, and its state-dict keys are the plain ``...weight`` again.
    Returns ``model``; raises a ``ValueError`` if nothing was companded.
    """
    layers = [m for m in model.modules() if _companded(m)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no companded weight; apply weight_compander first.")
    for layer in layers:
        parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)
    return model
