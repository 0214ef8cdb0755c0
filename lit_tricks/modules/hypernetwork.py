"""A loss-conditioned hypernetwork: one network for every mixing weight of two regression losses."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor

from lit_tricks.core.rng import RestoresRNG
from lit_tricks.nets.hypernetwork import HyperNetwork


def mixed_regression_loss(pred: Tensor, targets: Tensor, lam: Tensor) -> Tensor:
    """``mean((1 - lam) (pred - y_0)^2 + lam (pred - y_1)^2)`` for ``pred`` ``[N, 1]``, ``targets`` ``[N, 2]``
    (``y_0``, ``y_1``) and ``lam`` ``[N, 1]``. Its minimiser is ``(1 - lam) y_0 + lam y_1``, and its minimum
    ``lam (1 - lam) (y_0 - y_1)^2``, so the excess over it is comparable across ``lam``."""
    return ((1 - lam) * (pred - targets[:, :1]).square() + lam * (pred - targets[:, 1:]).square()).mean()


class LossConditionedRegression(RestoresRNG, pl.LightningModule):
    """Trains a :class:`~lit_tricks.nets.HyperNetwork` conditioned on the weight ``lam`` of two losses.

    Each training sample draws its own ``lam ~ U(0, 1)``; the target network runs with the weights predicted for
    it, and the loss is :func:`mixed_regression_loss` (the loss-conditioned setting of the MIP paper, Ortiz et
    al., ICLR 2024, on a regression toy). After training, ``model(x, lam)`` gives the solution for any ``lam``.

    Batches are ``(x, targets)`` or dicts with ``"inputs"`` and ``"targets"`` (an ``ArrayDataModule``'s), with
    ``targets`` of shape ``[N, 2]`` (the two regression targets). The ``lam`` draws come from the global RNG, whose
    state the checkpoint keeps, so a resumed run draws the same ones.

    Args:
        hypernet: a ``HyperNetwork`` with ``input_dim=1`` and a target with one output.
        optimizer: a callable ``params -> Optimizer`` (default Adam, lr 1e-3).
    """

    def __init__(self, hypernet: HyperNetwork, optimizer: OptimizerCallable | None = None) -> None:
        super().__init__()
        if not isinstance(hypernet, HyperNetwork):
            raise TypeError(f"hypernet must be a lit_tricks.nets.HyperNetwork, got {type(hypernet).__name__}.")
        if hypernet.input_dim != 1:
            raise ValueError(f"hypernet.input_dim must be 1 (the loss weight lam), got {hypernet.input_dim}.")
        self.hypernet = hypernet
        self.optimizer = optimizer

    def forward(self, x: Tensor, lam: Tensor) -> Tensor:
        return self.hypernet(x, lam)

    def training_step(self, batch: tuple[Tensor, Tensor] | dict[str, Tensor], batch_idx: int) -> Tensor:
        x, targets = self._unpack(batch)
        lam = torch.rand(len(x), 1, device=x.device, dtype=x.dtype)
        loss = mixed_regression_loss(self.hypernet(x, lam), targets, lam)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor] | dict[str, Tensor], batch_idx: int) -> None:
        """``val/loss`` and ``val/excess`` (the loss minus its minimum over functions, ``E (f - f*)^2``) with
        ``lam`` evenly spaced over ``[0, 1]`` across the batch."""
        x, targets = self._unpack(batch)
        lam = torch.linspace(0, 1, len(x), device=x.device, dtype=x.dtype).unsqueeze(1)
        loss = mixed_regression_loss(self.hypernet(x, lam), targets, lam)
        floor = (lam * (1 - lam) * (targets[:, :1] - targets[:, 1:]).square()).mean()
        self.log_dict({"val/loss": loss, "val/excess": loss - floor}, sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = self.parameters()
        return self.optimizer(params) if self.optimizer else torch.optim.Adam(params, lr=1e-3)

    @staticmethod
    def _unpack(batch: tuple[Tensor, Tensor] | dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        x, targets = (batch["inputs"], batch["targets"]) if isinstance(batch, dict) else batch
        if targets.dim() != 2 or targets.shape[1] != 2:
            raise ValueError(
                f"targets must have shape [N, 2] (the two regression targets), got {tuple(targets.shape)}."
            )
        return x, targets
