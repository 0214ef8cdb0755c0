"""Tent: test-time entropy minimisation of the normalisation layers' affine parameters."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from lit_tricks.functional.tta import softmax_entropy
from lit_tricks.modules.tta.base import NORM_TYPES, TTAModule


class Tent(TTAModule):
    r"""Tent (Wang et al., "Tent: Fully Test-Time Adaptation by Entropy Minimization", ICLR 2021): BatchNorm
    uses test-batch statistics, and only the affine parameters of the ``norm_types`` layers (default: BatchNorm
    only) are updated to minimise the mean prediction entropy :math:`\frac1N\sum_i -\sum_c p_{ic}\log p_{ic}`
    of the same forward pass, whose outputs (before the update) are the predictions. Official defaults: Adam,
    lr 1e-3, one step per batch.

    Example::

        >>> import lightning as L
        >>> from torch import nn
        >>> from lit_tricks import Tent
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
        >>> tent = Tent(net, lr=1e-3)
        >>> sorted(name for name, p in tent.named_parameters() if p.requires_grad)
        ['model.1.bias', 'model.1.weight']

    Args:
        norm_types: which normalisation layers adapt: ``"batch"`` (BatchNorm1d/2d/3d), ``"layer"``
            (LayerNorm), ``"group"`` (GroupNorm), one name or a list. The default ``"batch"`` is the paper's
            and the official code's choice; ``["batch", "layer", "group"]`` is the rivals' benchmark variant
            (mariodoebler/test-time-adaptation), for models normalised by LayerNorm or GroupNorm.
        model, lr, steps, episodic, reset_every, domain_names, source_checkpoint: as :class:`TTAModule`.
    """

    def __init__(
        self, model: nn.Module, lr: float = 1e-3, steps: int = 1, episodic: bool = False, reset_every: int = 0,
        domain_names: Sequence[str] | None = None, source_checkpoint: str | None = None,
        norm_types: str | Sequence[str] = "batch",
    ) -> None:  # fmt: skip
        names = [norm_types] if isinstance(norm_types, str) else list(norm_types or ())
        if not names or any(name not in list(NORM_TYPES) for name in names):
            raise ValueError(
                f"norm_types must name one or more of {', '.join(map(repr, NORM_TYPES))}, got {norm_types!r}: "
                "e.g. norm_types='batch' (the paper) or ['batch', 'layer', 'group']."
            )
        self.norm_types = names
        super().__init__(model, lr, steps, episodic, reset_every, domain_names, source_checkpoint)

    def _adapted_norms(self) -> list[nn.Module]:
        kinds = tuple(kind for name in self.norm_types for kind in NORM_TYPES[name])
        return [m for m in self.model.modules() if isinstance(m, kinds)]

    def configure_model(self) -> None:
        super().configure_model()
        norms = self._adapted_norms()
        if not norms:
            raise ValueError(
                f"Tent adapts normalisation layers of norm_types={self.norm_types}, but the model has none: "
                "choose the kinds it has ('batch', 'layer', 'group')."
            )
        for norm in norms:
            norm.requires_grad_(True)

    def collect_params(self) -> list[nn.Parameter]:
        return [p for m in self._adapted_norms() for p in (m.weight, m.bias) if p is not None]

    def forward_and_adapt(self, x: Tensor) -> Tensor:
        logits = self.model(x)
        loss = softmax_entropy(logits).mean()
        loss.backward()
        self.tta_optimizer.step()
        self.tta_optimizer.zero_grad()
        return logits
