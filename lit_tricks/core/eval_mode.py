"""Run a network in evaluation mode for a moment and give every layer back its own train/eval flag."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """``module.eval()`` inside the block; afterwards each submodule's ``training`` flag is what it was.

    (``module.train()`` afterwards would be wrong for a user who keeps some layers, e.g. a frozen batch norm,
    in eval mode.)

    Example::

        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Dropout()); _ = net[1].eval()
        >>> with eval_mode(net):
        ...     net.training
        False
        >>> net.training, net[1].training
        (True, False)
    """
    flags = [(layer, layer.training) for layer in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for layer, flag in flags:
            layer.training = flag
