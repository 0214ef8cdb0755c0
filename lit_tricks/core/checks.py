"""Argument checks every constructor uses: finite numbers in a range, integers, with one clear message.

A check written ``if x < 0: raise`` lets NaN through (every comparison with NaN is false) and infinity too;
these refuse both, and bools, which Python counts as integers.
"""

from __future__ import annotations

import math
from numbers import Real

from torch import nn


def check_number(
    name: str,
    value: object,
    *,
    at_least: float | None = None,
    above: float | None = None,
    at_most: float | None = None,
    below: float | None = None,
    integer: bool = False,
    hint: str = "",
) -> None:
    """Raise a ``TypeError`` unless ``value`` is a real number (an integer if ``integer``), and a ``ValueError``
    unless it is finite and within the bounds given (``at_least <= value``, ``above < value``,
    ``value <= at_most``, ``value < below``). The message names the parameter, the range and ``hint``.

    Example::

        >>> check_number("alpha", 0.2, at_least=0.0)
        >>> check_number("beta", float("nan"), at_least=0.0, below=1.0)
        Traceback (most recent call last):
        ...
        ValueError: beta must be a finite number in [0.0, 1.0), got nan.
    """
    kind = "an integer" if integer else "a finite number"
    low = f"[{at_least}" if at_least is not None else f"({above}" if above is not None else "(-inf"
    high = f"{at_most}]" if at_most is not None else f"{below})" if below is not None else "inf)"
    wanted = f"{name} must be {kind}" + ("" if low == "(-inf" and high == "inf)" else f" in {low}, {high}")
    suffix = f" {hint}" if hint else ""
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if isinstance(value, bool) or not isinstance(value, Real) or (integer and not is_int):
        raise TypeError(f"{wanted}, got {value!r} ({type(value).__name__}).{suffix}")
    inside = (
        math.isfinite(value)
        and (at_least is None or value >= at_least)
        and (above is None or value > above)
        and (at_most is None or value <= at_most)
        and (below is None or value < below)
    )
    if not inside:
        raise ValueError(f"{wanted}, got {value!r}.{suffix}")


def named_submodule(model: object, name: str, wanted: str) -> nn.Module:
    """``model``'s submodule at the dotted path ``name`` (a model transform's ``head=`` argument), or a clear error:
    a ``TypeError`` if ``model`` is not an ``nn.Module``, a ``ValueError`` naming ``wanted`` and some submodules."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    try:
        return model.get_submodule(name)
    except AttributeError as error:
        names = [path for path, _ in model.named_modules() if path][:12]
        raise ValueError(
            f"{type(model).__name__} has no submodule {name!r}: set head to the dotted name of {wanted} (some of its "
            f"submodules: {names})."
        ) from error


def classifier_layer(model: nn.Module, num_classes: int) -> tuple[str, nn.Linear] | None:
    """The dotted name and module of ``model``'s classifier: its last ``nn.Linear`` with ``num_classes`` outputs
    (``None`` if it has none). The parts that read the feature width or replace the classifier share this rule."""
    heads = [
        (name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear) and m.out_features == num_classes
    ]
    return heads[-1] if heads else None
