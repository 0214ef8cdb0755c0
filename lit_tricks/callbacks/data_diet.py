"""Data-diet scores: rate every training sample by EL2N or GraNd early in training, to prune the data set."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from lit_tricks.core.batch import TrickBatch
from lit_tricks.core.checks import check_number
from lit_tricks.core.eval_mode import eval_mode
from lit_tricks.core.trick import log_tag
from lit_tricks.functional.data_diet import el2n_scores, grand_scores

Score = Literal["el2n", "grand"]


class DataDietScores(Callback):
    r"""Score every training sample once, after ``epoch`` epochs ("Deep Learning on a Data Diet: Finding
    Important Examples Early in Training", Paul et al., NeurIPS 2021).

    .. math:: \mathrm{EL2N} = \lVert \mathrm{softmax}(f(x)) - y \rVert_2, \qquad
              \mathrm{GraNd} = \lVert \nabla_\theta\, \mathrm{CE}(f(x), y) \rVert_2

    The scores rank how hard (and, under label noise, how suspicious) a sample is. The paper computes EL2N a
    few epochs in (epoch 20 of 200 on CIFAR-10, confirmed by a reproduction study) and averages over runs
    (its code recommends 10 or more); GraNd at initialisation (``epoch=0``) did not reproduce, so EL2N is the
    default. A later run prunes with them: ``ArrayDataModule(prune_scores=[...], prune_keep=0.5)`` averages
    the saved files and keeps the highest-scoring half (see :func:`~lit_tricks.functional.keep_by_scores`).

    Scoring is one pass over the training set in eval mode with a sequential loader (no global RNG draw, so
    training is unchanged); under DDP each rank scores a strided shard and the scores are all-gathered. The
    result is ``self.scores`` (``[N]``, training-set order), in the checkpoint, and saved to ``save_to``:
    like Lightning's checkpoints, a relative path is taken under the run's directory (``trainer.log_dir``,
    else ``trainer.default_root_dir``), an absolute one as it is. The file's path is printed once (rank 0)
    and kept in ``self.saved_to`` for the pruning run's ``prune_scores``.

    Args:
        score: ``"el2n"`` or ``"grand"``.
        epoch: score after this many training epochs (0: at the start of training).
        save_to: a ``.pt`` file for :func:`load_scores` (written by rank 0), relative to the run's directory
            unless absolute; or ``None``.
        batch_size: batch size of the scoring pass (GraNd holds one gradient per sample of a batch).

    Example::

        >>> import lightning as L
        >>> from lit_tricks import Classifier, DataDietScores
        >>> from lit_tricks.data import DigitsDataModule
        >>> from lit_tricks.nets import MLP
        >>> scorer = DataDietScores("el2n", epoch=1)
        >>> trainer = L.Trainer(max_epochs=1, callbacks=[scorer], logger=False, enable_checkpointing=False,
        ...                     enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(Classifier(MLP(64, 10), num_classes=10), DigitsDataModule())
        >>> scorer.scores.shape, bool(scorer.scores.max() <= 2 ** 0.5)
        (torch.Size([1294]), True)
    """

    def __init__(
        self, score: Score = "el2n", epoch: int = 20, save_to: str | Path | None = None, batch_size: int = 256
    ) -> None:
        if score not in ("el2n", "grand"):
            raise ValueError(f"score must be 'el2n' or 'grand', got {score!r}.")
        check_number("epoch", epoch, at_least=0, integer=True, hint="0 scores at initialisation.")
        check_number("batch_size", batch_size, at_least=1, integer=True)
        if save_to is not None and not isinstance(save_to, (str, Path)):
            raise TypeError(f"save_to must be a str or Path (a .pt file), got {type(save_to).__name__}.")
        self.score, self.epoch, self.batch_size = score, epoch, batch_size
        self.save_to = None if save_to is None else Path(save_to).expanduser()
        self.scores: Tensor | None = None
        self.saved_to: Path | None = None  # where the scores were written, once they are

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and trainer.max_epochs is not None and 0 <= trainer.max_epochs < self.epoch:
            raise ValueError(
                f"DataDietScores(epoch={self.epoch}) scores after epoch {self.epoch}, but the run stops after "
                f"max_epochs={trainer.max_epochs}: lower epoch or raise max_epochs."
            )

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.scores is None:
            rank_zero_warn(
                f"DataDietScores(epoch={self.epoch}) saved no scores: training stopped before the end of epoch "
                f"{self.epoch} (max_steps, max_time or early stopping); lower epoch."
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.epoch == 0 and self.scores is None:
            self.compute(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch + 1 == self.epoch:
            self.compute(trainer, pl_module)

    def compute(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Tensor:
        """Score the whole training set now; store, log and save the scores, and return them."""
        dataset = trainer.train_dataloader.dataset
        n, rank, world = len(dataset), trainer.global_rank, trainer.world_size
        # a strided shard per rank, padded by repetition so that every rank gathers the same length
        shard = torch.arange(rank, math.ceil(n / world) * world, world) % n
        loader = DataLoader(Subset(dataset, shard.tolist()), self.batch_size, generator=torch.Generator())
        local = torch.cat([self._score_batch(trainer, pl_module, batch) for batch in loader])
        shard = shard.to(local.device)
        if world > 1:
            shard, local = pl_module.all_gather(shard).flatten(), pl_module.all_gather(local).flatten()
        scores = torch.zeros(n, device=local.device)
        scores[shard] = local
        self.scores = scores.cpu()
        pl_module.log(log_tag(self, f"{self.score}_mean"), self.scores.mean(), rank_zero_only=True)
        if self.save_to is not None:
            self._save(trainer, n)
        return self.scores

    def _save(self, trainer: pl.Trainer, n: int) -> None:
        """Write the scores to ``save_to`` (under the run's directory when relative), on rank 0."""
        run_dir = trainer.log_dir or trainer.default_root_dir  # log_dir is a broadcast: every rank asks
        self.saved_to = self.save_to if self.save_to.is_absolute() else Path(run_dir) / self.save_to
        if trainer.is_global_zero:
            self.saved_to.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"scores": self.scores, "score": self.score, "epoch": self.epoch}, self.saved_to)
            rank_zero_info(f"DataDietScores: {self.score} scores of {n} samples saved to {self.saved_to}")

    def _score_batch(self, trainer: pl.Trainer, module: pl.LightningModule, batch: Any) -> Tensor:
        tb = TrickBatch.from_batch(batch)
        # in the precision the model runs at (bfloat16 under precision="bf16-true"), as Lightning does for batches
        inputs = trainer.precision_plugin.convert_input(tb.inputs.to(module.device))
        targets = tb.targets.to(module.device)
        with eval_mode(module):
            if self.score == "grand":
                with torch.enable_grad():
                    return grand_scores(module, inputs, targets)
            with torch.no_grad():
                return el2n_scores(module(inputs), targets)

    def state_dict(self) -> dict[str, Any]:
        return {} if self.scores is None else {"scores": self.scores}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.scores = state_dict.get("scores")
