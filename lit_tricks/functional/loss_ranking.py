"""Ranking by loss, shared by the loss-based selection rules (selective backprop, hard mini-batches).

Both reference codes keep ``int(fraction * n)`` items (Composer's selective backprop: ``int(keep * N)`` samples of a
batch; DyBAT's hard mini-batches: ``int(delta * b)`` batches of an epoch); here at least one, so a small fraction of a
small batch never keeps nothing.
"""

from __future__ import annotations

from torch import Tensor

from lit_tricks.core.checks import check_number


def kept_count(n: int, fraction: float, name: str = "fraction") -> int:
    r"""How many of ``n`` items a selection by ``fraction`` keeps: :math:`\max(1, \lfloor \text{fraction} \cdot n
    \rfloor)`. ``name`` is the caller's name of ``fraction``, for the error message.

    Example::

        >>> kept_count(10, 0.5), kept_count(10, 0.05), kept_count(7, 1.0)
        (5, 1, 7)
    """
    check_number(name, fraction, above=0.0, at_most=1.0)
    return max(1, int(fraction * n))


def highest_losses(losses: Tensor, count: int) -> Tensor:
    """Indices of the ``count`` highest ``losses``, in ascending index order; among equal losses the lower index
    is taken first (a stable descending sort), and NaN counts as the highest.

    Example::

        >>> import torch
        >>> highest_losses(torch.tensor([0.3, 2.0, 0.3, 1.0]), 3)
        tensor([0, 1, 3])
    """
    if not 0 <= count <= losses.numel():
        raise ValueError(f"count must be in [0, {losses.numel()}], got {count}.")
    return losses.argsort(descending=True, stable=True)[:count].sort().values
