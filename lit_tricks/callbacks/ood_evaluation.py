"""Out-of-distribution evaluation: AUROC and FPR@95TPR of the in-distribution validation or test data vs OOD sets."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor, nn
from torch.utils.data import Dataset

from lit_tricks.callbacks.outlier_exposure import item_inputs
from lit_tricks.core.batch import TrickBatch
from lit_tricks.core.checks import check_number
from lit_tricks.core.eval_mode import eval_mode
from lit_tricks.core.trick import log_tag
from lit_tricks.functional.outlier_exposure import Score, ood_score
from lit_tricks.metrics.ood import OODAUROC, FPRAtTPR


@torch.no_grad()
def ood_scores_of(
    model: nn.Module,
    dataset: Dataset,
    score: Score = "msp",
    batch_size: int = 512,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str = "cpu",
) -> Tensor:
    """The in-distribution scores ``[n]`` (:func:`~lit_tricks.functional.outlier_exposure.ood_score`) of the samples
    ``rank, rank + world_size, ...`` of ``dataset`` (items: tensors, ``(inputs, ...)`` or dicts with ``inputs``), with
    ``model`` (logits out) in evaluation mode.

    Example::

        >>> ood_scores_of(nn.Linear(2, 3), torch.zeros(4, 2)).shape
        torch.Size([4])
    """
    rows = range(rank, len(dataset), world_size)
    stored = dataset if isinstance(dataset, Tensor) else getattr(dataset, "inputs", None)
    in_memory = isinstance(stored, Tensor) and len(stored) == len(dataset)  # ours: sliced, not read item by item
    scores = []
    with eval_mode(model):
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            if in_memory:
                inputs = stored[chunk.start : chunk.stop : chunk.step]
            else:
                inputs = torch.stack([item_inputs(dataset[i]) for i in chunk])
            scores.append(ood_score(model(inputs.to(device)), score))
    return torch.cat(scores) if scores else torch.zeros(0, device=device)


class OODEvaluation(Callback):
    r"""OOD detection metrics of the module on each validation (every ``every_n_epochs`` epochs) and test epoch.

    The in-distribution scores are those of the module's own forward on the first validation (test) dataloader,
    read through a forward hook (no extra pass); each set of ``ood`` is then scored in evaluation mode, every rank
    its share, and :class:`~lit_tricks.metrics.ood.OODAUROC` and :class:`~lit_tricks.metrics.ood.FPRAtTPR` (scores
    gathered over ranks, so exact under DDP) are logged as ``tricks/OODEvaluation/<name>/auroc`` and
    ``.../fpr95`` (FPR at ``tpr`` of the ID samples kept). The default score is the maximum softmax probability, as
    in the OE and MixOE papers.

    Args:
        ood: named OOD data sets, e.g. ``{"near": ..., "far": ...}`` (items as for :func:`ood_scores_of`).
        score: ``"msp"``, ``"max_logit"`` or ``"energy"``.
        tpr: the fraction of ID samples the FPR's threshold keeps.
        batch_size: batch size of the OOD passes.
        every_n_epochs: measure on the validation epochs after training epochs ``n-1, 2n-1, ...``.

    Example::

        >>> import lightning as L
        >>> from lit_tricks import Classifier
        >>> from lit_tricks.data.open_set import OpenSetDigitsDataModule
        >>> from lit_tricks.nets import MLP
        >>> dm = OpenSetDigitsDataModule(known_classes=6)
        >>> dm.setup()
        >>> evaluation = OODEvaluation({"near": dm.near_ood_set, "far": dm.far_ood_set})
        >>> trainer = L.Trainer(max_epochs=1, callbacks=[evaluation], logger=False, enable_checkpointing=False,
        ...                     enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(Classifier(MLP(64, 6), num_classes=6), dm)
        >>> 0.0 <= float(trainer.callback_metrics["tricks/OODEvaluation/far/auroc"]) <= 1.0
        True
    """

    def __init__(
        self,
        ood: dict[str, Dataset],
        score: Score = "msp",
        tpr: float = 0.95,
        batch_size: int = 512,
        every_n_epochs: int = 1,
    ) -> None:
        if not isinstance(ood, dict) or not ood:
            raise TypeError("ood must be a non-empty dict of named OOD data sets, e.g. {'near': ..., 'far': ...}.")
        for name, dataset in ood.items():
            if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__") or len(dataset) == 0:
                raise ValueError(f"ood[{name!r}] must be a non-empty map-style data set (or tensor).")
        if score not in ("msp", "max_logit", "energy"):
            raise ValueError(f"score must be 'msp', 'max_logit' or 'energy', got {score!r}.")
        check_number("tpr", tpr, above=0.0, at_most=1.0, hint="E.g. 0.95 for FPR@95TPR.")
        check_number("batch_size", batch_size, at_least=1, integer=True)
        check_number("every_n_epochs", every_n_epochs, at_least=1, integer=True)
        self.ood, self.score, self.tpr = ood, score, tpr
        self.batch_size, self.every_n_epochs = batch_size, every_n_epochs
        self._id_scores: list[Tensor] = []
        self._captured: Tensor | None = None
        self._hook: torch.utils.hooks.RemovableHandle | None = None

    # ------------------------------------------------------------------ hooks
    def _due(self, trainer: pl.Trainer) -> bool:
        if trainer.sanity_checking:
            return False
        return trainer.state.fn != TrainerFn.FITTING or (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def _start(self, pl_module: pl.LightningModule) -> None:
        self._id_scores = []
        self._hook = pl_module.register_forward_hook(self._capture)

    def _capture(self, module: nn.Module, inputs: tuple[Any, ...], output: Tensor) -> None:
        if isinstance(output, Tensor):  # under DDP the step itself is routed through forward: its output is None
            self._captured = output.detach()

    def _batch_end(self, pl_module: pl.LightningModule, batch: Any, dataloader_idx: int) -> None:
        if self._hook is None or dataloader_idx != 0:
            return
        logits = self._captured
        if logits is None:  # the step did not call the module itself: score the batch here
            with torch.no_grad():
                logits = pl_module(TrickBatch.from_batch(batch).inputs)
        self._captured = None
        self._id_scores.append(ood_score(logits, self.score))

    def _end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._hook is None:
            return
        self._hook.remove()
        self._hook = None
        id_scores = torch.cat(self._id_scores) if self._id_scores else torch.zeros(0, device=pl_module.device)
        self._id_scores = []
        for name, values in self.measure(trainer, pl_module, id_scores).items():
            for key, value in values.items():
                pl_module.log(log_tag(self, f"{name}/{key}"), value.float(), sync_dist=False)

    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, id_scores: Tensor) -> dict[str, dict]:
        """``{name: {"auroc": ..., "fpr95": ...}}`` of this rank's ``id_scores`` and every OOD set, over all ranks."""
        fpr_name = f"fpr{round(100 * self.tpr)}"
        out = {}
        for name, dataset in self.ood.items():
            ood_scores = ood_scores_of(
                pl_module, dataset, self.score, self.batch_size, trainer.global_rank, trainer.world_size,
                pl_module.device,
            )  # fmt: skip
            auroc, fpr = OODAUROC().to(pl_module.device), FPRAtTPR(self.tpr).to(pl_module.device)
            for metric in (auroc, fpr):
                metric.update(id_scores, False)
                metric.update(ood_scores, True)
            out[name] = {"auroc": auroc.compute(), fpr_name: fpr.compute()}
        return out

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._due(trainer):
            self._start(pl_module)

    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        self._batch_end(pl_module, batch, dataloader_idx)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end(trainer, pl_module)

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start(pl_module)

    def on_test_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        self._batch_end(pl_module, batch, dataloader_idx)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end(trainer, pl_module)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
