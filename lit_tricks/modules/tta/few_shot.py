"""Few-shot fine-tuning (LP-FT) of a source model on a few labelled target samples, the baseline that the few-shot
SFDA paper finds more reliable than source-free adaptation."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_tricks.core.checks import check_number, named_submodule
from lit_tricks.core.rng import RestoresRNG
from lit_tricks.modules.tta.base import TTAModule


class FewShotFineTune(RestoresRNG, TTAModule):
    r"""LP-FT on ``k`` labelled target samples per class ("Few-shot Fine-tuning is All You Need for Source-free
    Domain Adaptation"; code ``daintlab/fewshot-SFDA``): first a linear probe, then a full fine-tune, both minimising
    :math:`\frac1N\sum_i \mathrm{CE}(f_\theta(\mathrm{aug}(x_i)), y_i)` on the few-shot set.

    ``Trainer.fit`` on a few-shot split (:class:`~lit_tricks.data.FewShotDataModule`): the first ``lp_steps``
    optimizer steps train only the ``head`` (Adam, ``lp_lr``; the rest in eval mode, so its BatchNorm keeps its
    source statistics), then the optimizer is rebuilt as a fresh Adam over every parameter with ``lr`` and the
    whole model trains (train mode). The stage is a buffer, so a checkpoint resumes in the right stage with its
    optimizer, and with the global RNG state (dropout, augmentation). Validation logs ``val/loss`` (the paper
    keeps the checkpoint of the lowest validation loss: ``ModelCheckpoint(monitor="val/loss")``) and ``val/acc``.
    ``Trainer.test`` on a target stream then predicts with the fine-tuned model, frozen (no test-time
    adaptation), logging the same ``test/acc`` and ``test/error/<domain>`` as the other TTA modules.
    Authors' protocol (``daintlab/fewshot-SFDA``): 1 or 3 shots, batch 32, Adam without weight decay, LP 400
    steps at 1e-4, FT 1000 steps at 1e-5, so ``Trainer(max_steps=lp_steps + 1000)``.

    Example::

        >>> from torch import nn
        >>> from lit_tricks.modules.tta.few_shot import FewShotFineTune
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> tuner = FewShotFineTune(net, head="2", lp_steps=400)
        >>> [p.shape for p in tuner.configure_optimizers().param_groups[0]["params"]]  # the linear probe
        [torch.Size([3, 8]), torch.Size([3])]

    Args:
        model: the trained source model (fine-tuned in place).
        head: dotted name of the classifier submodule trained by the linear probe.
        lp_steps: optimizer steps of the linear probe (0: plain fine-tuning, the paper's "FT").
        lp_lr: Adam learning rate of the linear probe.
        lr: Adam learning rate of the full fine-tune.
        weight_decay: Adam weight decay of both stages.
        label_smoothing: of the cross-entropy (the code's default 0).
        augment: a batch transform applied to the training inputs (the paper, on 224-px images: random resized
            crop of scale 0.7-1, horizontal flip, colour jitter 0.3, random grayscale), or ``None``.
        domain_names, source_checkpoint: as :class:`TTAModule`.
    """

    needs_grad = False

    def __init__(
        self, model: nn.Module, head: str = "head", lp_steps: int = 400, lp_lr: float = 1e-4, lr: float = 1e-5,
        weight_decay: float = 0.0, label_smoothing: float = 0.0, augment: Callable[[Tensor], Tensor] | None = None,
        domain_names: Sequence[str] | None = None, source_checkpoint: str | None = None,
    ) -> None:  # fmt: skip
        check_number("lp_steps", lp_steps, at_least=0, integer=True, hint="0: no linear probe.")
        check_number("lp_lr", lp_lr, above=0.0)
        check_number("weight_decay", weight_decay, at_least=0.0)
        check_number("label_smoothing", label_smoothing, at_least=0.0, below=1.0)
        if augment is not None and not callable(augment):
            raise TypeError(f"augment must be a batch transform (inputs -> inputs) or None, got {augment!r}.")
        head_module = named_submodule(model, head, "the classifier head (e.g. 'head', 'fc', 'classifier')")
        if not any(True for _ in head_module.parameters()):
            raise ValueError(f"head {head!r} has no parameters: name the classifier layer that the probe trains.")
        self.head_name, self.lp_steps, self.lp_lr = head, lp_steps, lp_lr
        self.weight_decay, self.label_smoothing = weight_decay, label_smoothing
        super().__init__(model, lr=lr, steps=0, domain_names=domain_names, source_checkpoint=source_checkpoint)
        self.augment = augment

    def build_models(self) -> None:
        self.register_buffer("finetuning", torch.tensor(self.lp_steps == 0))

    def configure_model(self) -> None:
        # every parameter stays trainable so that DDP syncs them all after the switch; the optimizer decides
        self.model.requires_grad_(True)

    @property
    def head(self) -> nn.Module:
        return self.model.get_submodule(self.head_name)

    def train(self, mode: bool = True) -> FewShotFineTune:
        """Train mode for the part that trains: the head alone during the probe, everything after it."""
        pl.LightningModule.train(self, mode)
        if mode and not self.finetuning:
            self.model.eval()
            self.head.train()
        return self

    def forward_and_adapt(self, x: Tensor) -> Tensor:
        """Predict with the fine-tuned model; nothing adapts at test time."""
        with torch.no_grad():
            return self.model(x)

    # ---------------------------------------------------------------- fine-tuning (Trainer.fit)
    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.finetuning:
            return torch.optim.Adam(self.model.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        return torch.optim.Adam(self.head.parameters(), lr=self.lp_lr, weight_decay=self.weight_decay)

    def on_train_start(self) -> None:
        super().on_train_start()  # a resumed run's RNG states
        self.train(True)  # Lightning keeps the modes it finds; the base leaves every network in eval mode

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        RestoresRNG.on_load_checkpoint(self, checkpoint)
        TTAModule.on_load_checkpoint(self, checkpoint)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if not self.finetuning and self.trainer.global_step >= self.lp_steps:
            self.finetuning.fill_(True)
            self.model.zero_grad(set_to_none=True)
            self.trainer.strategy.optimizers = [self.configure_optimizers()]
            self.train(True)

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: torch.optim.Optimizer) -> None:
        # the probe's backward also reaches the frozen part (see configure_model): clear every gradient
        self.model.zero_grad(set_to_none=True)

    def _loss(self, batch: Any, augment: bool) -> tuple[Tensor, Tensor, Tensor]:
        x, y = (batch["inputs"], batch["targets"]) if isinstance(batch, Mapping) else batch[:2]
        if augment and self.augment is not None:
            x = self.augment(x)
        logits = self.model(x)
        return F.cross_entropy(logits, y, label_smoothing=self.label_smoothing), logits, y

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss, _, y = self._loss(batch, augment=True)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(y))
        self.log(f"tricks/{type(self).__name__}/finetuning", self.finetuning.float(), batch_size=len(y))
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        loss, logits, y = self._loss(batch, augment=False)
        self.log("val/loss", loss, batch_size=len(y), sync_dist=True, prog_bar=True)
        self.log("val/acc", (logits.argmax(dim=-1) == y).float().mean(), batch_size=len(y), sync_dist=True)

    def on_fit_end(self) -> None:
        """The fine-tuned weights become the state that :meth:`reset` returns to."""
        self._source_state = copy.deepcopy(self.state_dict())
