"""The source model without adaptation: the baseline every TTA method is compared with."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lit_tricks.modules.tta.base import TTAModule


class SourceOnly(TTAModule):
    """The unadapted source model (the rivals' "Source" / "BN-0" baseline): frozen, in eval mode with its own
    running BatchNorm statistics. It logs the same ``test/acc`` and ``test/error/<domain>`` as the methods, so
    that the baseline compares with them corruption by corruption. Arguments as :class:`TTAModule`."""

    needs_grad = False

    def __init__(
        self, model: nn.Module, domain_names: Sequence[str] | None = None, source_checkpoint: str | None = None
    ) -> None:
        super().__init__(model, lr=1.0, steps=0, domain_names=domain_names, source_checkpoint=source_checkpoint)

    def configure_model(self) -> None:
        self.model.eval().requires_grad_(False)

    def forward_and_adapt(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            return self.model(x)
