"""BN adaptation: normalise with the test batch's statistics."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lit_tricks.modules.tta.base import TTAModule


class BNAdapt(TTAModule):
    """Test-batch normalisation statistics (Schneider et al., 2020; "BN-1" in the rivals' benchmark): every
    BatchNorm normalises with the current test batch's mean and variance; nothing is trained. Arguments as
    :class:`TTAModule`."""

    needs_grad = False

    def __init__(
        self, model: nn.Module, domain_names: Sequence[str] | None = None, source_checkpoint: str | None = None
    ) -> None:
        super().__init__(model, lr=1.0, steps=0, domain_names=domain_names, source_checkpoint=source_checkpoint)

    def forward_and_adapt(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            return self.model(x)
