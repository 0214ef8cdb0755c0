"""Frozen networks that a module uses but does not own (a pretrained encoder): kept out of its state dict, its
parameters and its ``train()``/``eval()`` switches, yet moved and cast with it."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class HoldsFrozen:
    """Mixin for an ``nn.Module`` (put it before the module class in the bases) that holds frozen networks.

    Example::

        >>> import torch
        >>> class Probe(HoldsFrozen, torch.nn.Module):
        ...     def __init__(self, encoder):
        ...         super().__init__()
        ...         self.hold_frozen("encoder", encoder)
        ...         self.head = torch.nn.Linear(4, 2)
        >>> probe = Probe(torch.nn.Linear(3, 4)).double()
        >>> sorted(probe.state_dict()), probe.encoder.weight.dtype, probe.encoder.weight.requires_grad
        (['head.bias', 'head.weight'], torch.float64, False)
    """

    def hold_frozen(self, name: str, network: nn.Module) -> None:
        """Keep ``network`` as ``self.<name>``, in eval mode and without gradients, outside the state dict and the
        parameters; ``.to()``, ``.double()`` and the like of this module still move and cast it."""
        object.__setattr__(self, name, network.eval().requires_grad_(False))
        object.__setattr__(self, "_frozen_names", (*getattr(self, "_frozen_names", ()), name))

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True):
        super()._apply(fn, recurse)
        for name in getattr(self, "_frozen_names", ()):
            getattr(self, name)._apply(fn, recurse)
        return self
