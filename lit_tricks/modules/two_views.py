"""The base of the self-supervised modules that learn from two augmented views of each sample (Barlow Twins, MoCo):
the view generator and its checkpoint, the online linear probe, evaluation, prediction and the optimizer groups."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from lit_tricks.core.batch import TrickBatch
from lit_tricks.core.checks import check_number
from lit_tricks.core.rng import RestoresRNG
from lit_tricks.core.trick import logging_due
from lit_tricks.functional.tta import default_augment

ViewMaker = Callable[[Tensor, torch.Generator], Tensor]


class TwoViewModule(RestoresRNG, pl.LightningModule):
    """What every two-view self-supervised module shares; a subclass writes ``training_step`` (with
    :meth:`views` and :meth:`finish_step`) and calls ``save_hyperparameters``.

    - Views: ``augment(inputs, generator)`` with the module's own generator (seeded by ``seed``), whose state, with
      any other generator a subclass names in :meth:`generator_states`, is saved in the checkpoint under
      ``_RNG_KEY``; the global RNGs are restored as well (:class:`~lit_tricks.core.rng.RestoresRNG`).
    - The online linear probe (``num_classes``): a linear layer trained with cross-entropy on detached
      representations (it does not shape the encoder, nor draw from the global RNG), evaluated on clean inputs as
      ``val/probe_acc`` and ``test/probe_acc``, in its own parameter group (``probe_lr``, no weight decay).
    - The optimizer: every parameter that requires a gradient (a momentum encoder's do not); default Adam, lr 1e-3,
      weight decay 1e-6.
    """

    _RNG_KEY: ClassVar[str] = "lit_tricks_two_views_rng"

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        augment: ViewMaker | None,
        num_classes: int | None,
        probe_lr: float,
        optimizer: OptimizerCallable | None,
        seed: int,
    ) -> None:
        super().__init__()
        if not isinstance(backbone, nn.Module):
            raise TypeError(f"backbone must be a torch.nn.Module, got {type(backbone).__name__}.")
        check_number("feature_dim", feature_dim, at_least=1, integer=True, hint="The size of the backbone's output.")
        if augment is not None and not callable(augment):
            raise TypeError(f"augment must be a callable (inputs, generator) -> view, got {type(augment).__name__}.")
        if num_classes is not None:
            check_number("num_classes", num_classes, at_least=2, integer=True, hint="Or None for no probe.")
        check_number("probe_lr", probe_lr, above=0.0)
        check_number("seed", seed, at_least=0, integer=True)
        self.backbone, self.optimizer, self.probe_lr = backbone, optimizer, probe_lr
        self.augment = default_augment if augment is None else augment
        self.probe: nn.Linear | None = None
        if num_classes is not None:
            with torch.random.fork_rng(devices=[]):  # the same encoder init with or without a probe
                self.probe = nn.Linear(feature_dim, num_classes)
            self.val_acc = MulticlassAccuracy(num_classes, average="micro")
            self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self._views = torch.Generator().manual_seed(seed)

    def forward(self, inputs: Tensor) -> Tensor:
        """The representation ``[N, feature_dim]`` (what the probe and downstream tasks use)."""
        return self.backbone(inputs)

    def views(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        """Two augmented views of the batch, drawn from the module's generator."""
        return self.augment(inputs, self._views), self.augment(inputs, self._views)

    def finish_step(self, loss: Tensor, terms: dict[str, Tensor], features: Tensor, targets: Tensor) -> Tensor:
        """The end of a ``training_step``: log the self-supervised ``loss`` as ``train/loss`` (every step), add the
        probe's cross-entropy on the detached ``features`` (``train/probe_loss``), log ``terms`` and that at the
        logging interval, and return what to minimise."""
        n = len(features)
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        if self.probe is not None:
            probe_loss = F.cross_entropy(self.probe(features.detach()), targets)
            terms = {**terms, "train/probe_loss": probe_loss.detach()}
            loss = loss + probe_loss
        if logging_due(self.trainer):
            self.log_dict(terms, batch_size=n)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def _evaluate(self, batch: Any, stage: str) -> None:
        if self.probe is None:
            return
        tb = TrickBatch.from_batch(batch)
        metric = self.val_acc if stage == "val" else self.test_acc
        metric.update(self.probe(self(tb.inputs)), tb.hard_targets)
        self.log(f"{stage}/probe_acc", metric, batch_size=len(tb.inputs))

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Representations ``[N, feature_dim]``; the batch may be a dict, a sequence or a bare input tensor."""
        inputs = batch["inputs"] if isinstance(batch, dict) else batch[0] if isinstance(batch, list | tuple) else batch
        return self(inputs)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        probe = list(self.probe.parameters()) if self.probe is not None else []
        ids = {id(p) for p in probe}
        groups = [{"params": [p for p in self.parameters() if p.requires_grad and id(p) not in ids]}]
        if probe:
            groups.append({"params": probe, "lr": self.probe_lr, "weight_decay": 0.0})
        if self.optimizer is None:
            return torch.optim.Adam(groups, lr=1e-3, weight_decay=1e-6)
        return self.optimizer(groups)

    def generator_states(self) -> dict[str, Any]:
        """The private generators' states for the checkpoint; a subclass with more generators extends it."""
        return {"views": self._views.get_state()}

    def load_generator_states(self, states: dict[str, Any]) -> None:
        self._views.set_state(states["views"])

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[self._RNG_KEY] = self.generator_states()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if self._RNG_KEY in checkpoint:
            self.load_generator_states(checkpoint[self._RNG_KEY])
