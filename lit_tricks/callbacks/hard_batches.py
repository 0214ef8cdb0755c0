"""Hard mini-batches: record each batch's training loss, for the sampler that retrains the hardest batches."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch

from lit_tricks.core.batch import StepOutput, TrickBatch
from lit_tricks.core.trick import Trick, logging_due
from lit_tricks.data.hard_batches import HardBatchSampler


class HardBatches(Trick):
    r"""Hard mini-batch training ("Can we learn better with hard samples?", Sahayam, Zakkam and Jayaraman, arXiv
    2304.03486): after one full epoch over fixed mini-batches, each round trains only the
    :math:`\lfloor\delta b\rfloor` batches of highest last loss,

    .. math:: S_r = \operatorname{top}_{\lfloor \delta b \rfloor} \{\hat\ell_j\}_{j=1}^b,

    in batch order, within the baseline's budget of iterations.

    This callback is the loss feed of the :class:`~lit_tricks.data.HardBatchSampler` that does the choosing (set
    it up with ``ArrayDataModule(hard_batches=delta)``): at every step it records the batch's mean per-sample
    training loss :math:`\hat\ell_j` (after the tricks ordered before it, before weighting), averaged over the
    global batch under DDP, and it saves the sampler's losses and current round in the checkpoint. Set the budget
    with ``Trainer(max_steps=E * b)`` (see the sampler).

    Example::

        >>> import lightning as L
        >>> from lit_tricks import Classifier
        >>> from lit_tricks.callbacks.hard_batches import HardBatches
        >>> from lit_tricks.data import DigitsDataModule
        >>> from lit_tricks.nets import MLP
        >>> data = DigitsDataModule(batch_size=128, hard_batches=0.5)  # b = 10 batches, rounds of 5
        >>> trainer = L.Trainer(max_steps=20, callbacks=[HardBatches()], logger=False, enable_checkpointing=False,
        ...                     enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(Classifier(MLP(64, 10), num_classes=10), data)
        >>> trainer.current_epoch, trainer.train_dataloader.sampler.round_batches().numel()  # 10 + 5 + 5 steps
        (3, 5)
    """

    order = 100  # last: records the per-sample loss the other tricks leave
    needs_index = True

    def __init__(self) -> None:
        self.sampler: HardBatchSampler | None = None
        self._loaded: dict[str, Any] | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._bind(trainer)  # a run resumed mid-epoch starts without on_train_epoch_start

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._bind(trainer)  # with reload_dataloaders_every_n_epochs the loader (and maybe the sampler) is new

    def _bind(self, trainer: pl.Trainer) -> None:
        """Find the training loader's sampler; give it the checkpoint's state, or the previous sampler's."""
        loader = trainer.train_dataloader
        sampler = getattr(loader, "sampler", None)
        if not isinstance(sampler, HardBatchSampler):
            raise TypeError(
                "HardBatches records batch losses for a lit_tricks.data.HardBatchSampler, but the training loader's "
                f"sampler is {type(sampler).__name__}: use ArrayDataModule(hard_batches=delta), or pass "
                "HardBatchSampler(len(dataset), batch_size, delta) to your DataLoader as sampler=."
            )
        if loader.batch_size != sampler.batch_size:
            raise ValueError(
                f"The training loader's batch_size ({loader.batch_size}) must equal the HardBatchSampler's "
                f"batch_size ({sampler.batch_size}), or its batches would straddle the sampler's fixed batches."
            )
        if self._loaded is not None:  # from a checkpoint
            sampler.load_state_dict(self._loaded)
            self._loaded = None
        elif self.sampler is not None and sampler is not self.sampler:  # a reloaded loader with a new sampler
            sampler.load_state_dict(self.sampler.state_dict())
        self.sampler = sampler

    def after_loss(
        self, trainer: pl.Trainer, module: pl.LightningModule, batch: TrickBatch, out: StepOutput
    ) -> StepOutput:
        losses = out.per_sample_loss.detach()
        if trainer.world_size > 1:  # the mean over the global batch, from every rank's sum and count
            total = module.all_gather(torch.stack([losses.sum(), losses.new_tensor(losses.numel())])).sum(dim=0)
            loss = total[0] / total[1]
        else:
            loss = losses.mean()
        self.sampler.record(batch.index, loss)
        if logging_due(trainer):
            module.log(self.tag("batch_loss"), loss, batch_size=len(batch))
        return out

    def state_dict(self) -> dict[str, Any]:
        if self.sampler is None:
            return {} if self._loaded is None else dict(self._loaded)
        return self.sampler.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = dict(state_dict) if state_dict else None
