"""Neural collapse: measure NC1-NC4 of the penultimate features on the validation set every few epochs."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor, nn

from lit_tricks.core.batch import TrickBatch
from lit_tricks.core.checks import check_number, named_submodule
from lit_tricks.core.trick import log_tag
from lit_tricks.metrics.neural_collapse import NeuralCollapseMetrics


class NeuralCollapse(Callback):
    r"""Neural collapse metrics (Papyan, Han & Donoho, PNAS 2020), as "Pushing Boundaries: Mixup's Influence on
    Neural Collapse" (Fisher et al., ICLR 2024) compares them for ERM and Mixup.

    On every ``every_n_epochs``-th validation epoch (and on every ``trainer.validate``) it reads, through a forward
    hook on the final linear layer ``head``, the penultimate features :math:`h` (the layer's input) and the
    logits (its output) of the module's own validation forward, so it costs no extra forward pass, and
    accumulates :class:`~lit_tricks.metrics.neural_collapse.NeuralCollapseMetrics` with the validation labels.
    At the epoch's end it logs (see :mod:`lit_tricks.functional.neural_collapse`)

    * ``tricks/NeuralCollapse/nc1``: :math:`\mathrm{Tr}(\Sigma_W\Sigma_B^{+})/C`;
    * ``.../nc2_equinorm_means``, ``.../nc2_equinorm_classifier``: std/mean of :math:`\lVert\mu_c-\mu_G\rVert`
      and of :math:`\lVert w_c\rVert`;
    * ``.../nc2_cos_std_{means,classifier}``, ``.../nc2_equiangular_{means,classifier}``: std of the pairwise
      cosines and mean :math:`|\cos + 1/(C-1)|`;
    * ``.../nc3_self_duality``: :math:`\lVert W/\lVert W\rVert_F - M/\lVert M\rVert_F\rVert_F^2`;
    * ``.../nc4_ncc_agreement``: fraction of samples whose argmax equals the nearest class mean;

    and, with a ``TensorBoardLogger`` and matplotlib, the figure ``tricks/NeuralCollapse/cosines`` (heat maps of
    the cosines between centred class means and between classifier rows). Under collapse NC1, NC2 and NC3 go to 0
    and NC4 to 1. Only the first validation dataloader is measured; the callback has no state to checkpoint.

    Args:
        every_n_epochs: measure on the validation epochs after training epochs ``n-1, 2n-1, ...``.
        head: dotted name of the final ``nn.Linear`` in the LightningModule (``backbone.head`` for a
            :class:`~lit_tricks.Classifier` around ``lit_tricks.nets``); its ``weight`` is :math:`W`.
        figure: log the cosine heat maps (TensorBoard only).

    Example::

        >>> import lightning as L
        >>> from lit_tricks import Classifier
        >>> from lit_tricks.callbacks.neural_collapse import NeuralCollapse
        >>> from lit_tricks.data import DigitsDataModule
        >>> from lit_tricks.nets import MLP
        >>> trainer = L.Trainer(max_epochs=1, callbacks=[NeuralCollapse()], logger=False, enable_checkpointing=False,
        ...                     enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(Classifier(MLP(64, 10, hidden=(32,)), num_classes=10), DigitsDataModule())
        >>> 0 < float(trainer.callback_metrics["tricks/NeuralCollapse/nc4_ncc_agreement"]) <= 1
        True
    """

    def __init__(self, every_n_epochs: int = 1, head: str = "backbone.head", figure: bool = True) -> None:
        check_number("every_n_epochs", every_n_epochs, at_least=1, integer=True)
        if not isinstance(head, str) or not head:
            raise TypeError(f"head must be the dotted name of the final nn.Linear, e.g. 'backbone.head', got {head!r}.")
        if not isinstance(figure, bool):
            raise TypeError(f"figure must be True or False, got {figure!r}.")
        self.every_n_epochs, self.head, self.figure = every_n_epochs, head, figure
        self.metric: NeuralCollapseMetrics | None = None
        self._linear: nn.Linear | None = None
        self._hook: torch.utils.hooks.RemovableHandle | None = None
        self._captured: tuple[Tensor, Tensor] | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        head = named_submodule(pl_module, self.head, "the final nn.Linear layer (features -> logits)")
        # a head another part wrapped (e.g. multi-sample dropout's Sequential) still ends in the same nn.Linear
        linears = [head] if isinstance(head, nn.Linear) else [m for m in head.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError(
                f"NeuralCollapse reads the features at the input of the final nn.Linear, but {self.head!r} is a "
                f"{type(head).__name__} without one: set head to the dotted name of the final nn.Linear."
            )
        linear = linears[-1]
        num_classes = getattr(pl_module, "num_classes", linear.out_features)
        if linear.out_features != num_classes:
            raise ValueError(
                f"{self.head!r} has {linear.out_features} outputs but the module has num_classes={num_classes}: "
                "set head to the layer that gives the logits."
            )
        self._linear = linear
        self.metric = NeuralCollapseMetrics(linear.out_features, linear.in_features).to(pl_module.device)

    def _due(self, trainer: pl.Trainer) -> bool:
        if trainer.sanity_checking:
            return False
        return trainer.state.fn != TrainerFn.FITTING or (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._due(trainer):
            return
        self.metric.to(pl_module.device).reset()
        self._hook = self._linear.register_forward_hook(self._capture)

    def _capture(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        self._captured = (inputs[0].detach(), output.detach())

    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        if self._hook is None or dataloader_idx != 0:
            return
        if self._captured is None:
            raise RuntimeError(
                f"NeuralCollapse saw no call of {self.head!r} in this validation step: set head to the final "
                "nn.Linear that the module's forward uses."
            )
        features, logits = self._captured
        self._captured = None
        if features.ndim != 2:
            raise ValueError(
                f"NeuralCollapse needs [N, D] features at the input of {self.head!r}, got {tuple(features.shape)}."
            )
        self.metric.update(features, TrickBatch.from_batch(batch).hard_targets, logits)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._hook is None:
            return
        self._hook.remove()
        self._hook = None
        self.metric.weight = self._linear.weight.detach()
        values = self.metric.compute()
        for name, value in values.items():
            pl_module.log(log_tag(self, name), value.float(), sync_dist=False)
        if self.figure and isinstance(trainer.logger, TensorBoardLogger) and trainer.is_global_zero:
            self._log_figure(trainer)

    def _log_figure(self, trainer: pl.Trainer) -> None:
        try:
            import matplotlib
        except ImportError:
            return
        if self.metric.mean_cosines is None:
            return
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        panels = [("centred class means", self.metric.mean_cosines)]
        if self.metric.classifier_cosines is not None:
            panels.append(("classifier rows", self.metric.classifier_cosines))
        fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
        for ax, (title, cos) in zip(axes[0], panels, strict=True):
            image = ax.imshow(cos.float().cpu().numpy(), vmin=-1, vmax=1, cmap="RdBu_r")
            ax.set(title=f"cosines of {title}", xlabel="class", ylabel="class")
        fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8)
        trainer.logger.experiment.add_figure(log_tag(self, "cosines"), fig, trainer.global_step)
        plt.close(fig)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
