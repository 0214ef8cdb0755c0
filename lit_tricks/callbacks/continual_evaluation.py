"""Continual evaluation: accuracy on every seen task after every optimizer step, to expose the stability gap."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor
from torch.utils.data import Dataset

from lit_tricks.core.batch import TrickBatch
from lit_tricks.core.checks import check_number
from lit_tricks.core.eval_mode import eval_mode
from lit_tricks.core.trick import log_tag
from lit_tricks.data.indexed import dataset_tensors
from lit_tricks.functional import continual as metrics


class ContinualEvaluation(Callback):
    r"""Per-iteration continual evaluation ("Continual evaluation for lifelong learning: Identifying the stability
    gap", De Lange, van de Ven, Tuytelaars, ICLR 2023).

    Every ``every_n_steps`` optimizer steps (and at every task switch, at the start and at the end) the model
    is evaluated on a fixed subset of each **seen** task's evaluation set. From the accuracy history
    :math:`A(E_i, f_t)` it computes (definitions of the authors' code, :mod:`lit_tricks.functional.continual`):

    - ACC, the final mean accuracy over tasks; FORG (max task-end accuracy minus last) and BWT;
    - min-ACC :math:`= \frac{1}{k-1}\sum_{i<k}\min_{t_{|T_i|}<n\le t} A(E_i, f_n)`, the mean worst accuracy of
      previous tasks after they were learned;
    - WC-ACC :math:`= \frac1k A(E_k, f_t) + (1-\frac1k)\,\text{min-ACC}`;
    - WF\ :sup:`w` / WP\ :sup:`w`, the largest drop / rise of a task's accuracy within ``w`` consecutive
      evaluations (windows count evaluations), and LCA\ :sub:`10`.

    The current task is the highest ``batch["task"]`` seen so far (so fuzzy boundaries work). Subsets are
    drawn once per task from a private generator and cached on the device; evaluation runs in eval mode under
    ``inference_mode`` and restores every layer's train flag, so training is bit-identical with and without this
    callback. Under DDP each rank evaluates a strided shard of every subset and the correct counts are summed
    across ranks (one ``all_reduce`` per evaluation). Each point is logged at its own step
    (``tricks/ContinualEvaluation/acc_task<i>``, ``.../avg_acc``), the metrics at each task switch and at the
    end, and a stability-gap figure (per-task curves, task boundaries) goes to TensorBoard at the end. The
    whole history is in ``state_dict``, so a resumed run keeps it.

    Reading ``batch["task"]`` costs one host-device synchronisation per step; evaluating costs about
    ``seen tasks x subset_size`` forward passes per evaluated step.

    Args:
        every_n_steps: evaluate every this many optimizer steps (1: the paper's per-iteration evaluation).
        subset_size: samples per task's evaluation subset (the paper: 1000). ``None``: up to 1000.
        dense_steps: if set, also evaluate at *every* step during the first ``dense_steps`` steps after each
            task switch (where the gap is), and every ``every_n_steps`` otherwise.
        windows: the windows :math:`w` of WF/WP (the paper: 10 and 100).
        eval_sets: one evaluation data set per task; ``None`` takes the data module's ``task_eval_sets()``
            (:class:`~lit_tricks.data.ContinualDataModule`).
        task_incremental: restrict each task's predictions to its own classes (task-incremental evaluation;
            the class lists come from the data module's ``task_classes()``).
        batch_size: evaluation batch size.
        seed: seed of the subsets.

    Example::

        >>> import lightning as L
        >>> from lit_tricks import Classifier, ContinualEvaluation
        >>> from lit_tricks.data import ContinualDataModule, DigitsDataModule
        >>> from lit_tricks.nets import MLP
        >>> evaluation = ContinualEvaluation(every_n_steps=5)
        >>> trainer = L.Trainer(max_epochs=1, callbacks=[evaluation], logger=False, enable_checkpointing=False,
        ...                     enable_progress_bar=False, enable_model_summary=False)
        >>> stream = ContinualDataModule(DigitsDataModule(val_fraction=0.0), num_tasks=5)
        >>> trainer.fit(Classifier(MLP(64, 10), num_classes=10), stream)
        >>> sorted(evaluation.summary())[:4]
        ['acc', 'bwt', 'forgetting', 'lca10']
    """

    def __init__(
        self,
        every_n_steps: int = 1,
        subset_size: int | None = None,
        dense_steps: int | None = None,
        windows: Sequence[int] = (10, 100),
        eval_sets: Sequence[Dataset] | None = None,
        task_incremental: bool = False,
        batch_size: int = 500,
        seed: int = 0,
    ) -> None:
        check_number("every_n_steps", every_n_steps, at_least=1, integer=True, hint="1: after every optimizer step.")
        if subset_size is not None:
            check_number("subset_size", subset_size, at_least=1, integer=True, hint="Or None for up to 1000.")
        if dense_steps is not None:
            check_number("dense_steps", dense_steps, at_least=1, integer=True, hint="Or None.")
        if not windows or min(windows) < 2:
            raise ValueError(f"windows must be evaluation counts >= 2, e.g. (10, 100); got {windows}.")
        check_number("batch_size", batch_size, at_least=1, integer=True)
        self.every_n_steps, self.subset_size, self.dense_steps = every_n_steps, subset_size, dense_steps
        self.windows, self.eval_sets, self.task_incremental = tuple(windows), eval_sets, task_incremental
        self.batch_size, self.seed = batch_size, seed
        self._subsets: list[tuple[Tensor, Tensor]] = []
        self._class_masks: Tensor | None = None
        # the history (in the checkpoint)
        self.steps: list[int] = []
        self.current: list[int] = []
        self.accuracy: list[list[float]] = []
        self.task = 0
        self.switch_step = 0
        self._final: tuple | None = None

    # ------------------------------------------------------------------ set-up
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        datamodule = trainer.datamodule
        eval_sets = self.eval_sets
        if eval_sets is None:
            if not hasattr(datamodule, "task_eval_sets"):
                raise ValueError(
                    "ContinualEvaluation needs one evaluation set per task: train on a "
                    "lit_tricks.data.ContinualDataModule, or pass ContinualEvaluation(eval_sets=[...])."
                )
            eval_sets = datamodule.task_eval_sets()
        self._subsets = [self._subset(k, *dataset_tensors(data)) for k, data in enumerate(eval_sets)]
        if self.task_incremental:
            if not hasattr(datamodule, "task_classes"):
                raise ValueError("task_incremental=True needs a data module with task_classes(): ContinualDataModule.")
            classes = datamodule.task_classes()
            self._class_masks = torch.zeros(len(classes), pl_module.num_classes, dtype=torch.bool)
            for k, members in enumerate(classes):
                self._class_masks[k, members] = True

    def _subset(self, task: int, inputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        size = min(len(inputs), 1000) if self.subset_size is None else self.subset_size
        if size > len(inputs):
            raise ValueError(
                f"subset_size={self.subset_size} but task {task}'s evaluation set has {len(inputs)} samples: "
                "lower subset_size (or None for up to 1000)."
            )
        generator = torch.Generator().manual_seed(self.seed * 1000 + task)  # fixed per task, private
        rows = torch.randperm(len(inputs), generator=generator)[:size]
        return inputs[rows], targets[rows]

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # this rank's shard of every subset, cached on the device once, tasks concatenated in order so that
        # the seen tasks are a prefix evaluated in as few forward passes as possible
        rank, world, device = trainer.global_rank, trainer.world_size, pl_module.device
        shards = [(x[rank::world], y[rank::world]) for x, y in self._subsets]
        # in the precision the model runs at (bfloat16 under precision="bf16-true"), as Lightning does for batches
        self._inputs = trainer.precision_plugin.convert_input(torch.cat([x for x, _ in shards]).to(device))
        self._targets = torch.cat([y for _, y in shards]).to(device)
        self._task_ids = torch.cat([torch.full((len(y),), k) for k, (_, y) in enumerate(shards)]).to(device)
        self._ends = torch.tensor([len(y) for _, y in shards]).cumsum(0).tolist()
        if self._class_masks is not None:
            self._class_masks = self._class_masks.to(pl_module.device)
        self._final = None
        if not self.steps:
            self.evaluate(trainer, pl_module)  # before the first update

    # ------------------------------------------------------------------ the loop
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        tasks = TrickBatch.from_batch(batch).extras.get("task")
        if not isinstance(tasks, Tensor):
            raise ValueError(
                "ContinualEvaluation reads the current task from batch['task']: use "
                "lit_tricks.data.ContinualDataModule or add a 'task' key (a task id per sample) to your batches."
            )
        task = tasks.max()
        if trainer.world_size > 1:  # every rank must switch (and so evaluate) at the same step
            task = pl_module.all_gather(task).max()
        task = int(task)
        if task >= len(self._subsets):
            raise ValueError(f"batch['task'] holds task {task} but there are {len(self._subsets)} evaluation sets.")
        if task > self.task:
            if self.steps[-1] != trainer.global_step:
                self.evaluate(trainer, pl_module)  # the end of the finished task
            self._log_metrics(trainer)
            self.task, self.switch_step = task, trainer.global_step

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        dense = self.dense_steps is not None and step - self.switch_step <= self.dense_steps
        if (dense or step % self.every_n_steps == 0) and self.steps[-1] != step:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.steps[-1] != trainer.global_step:
            # in the summary but not in the state: a run resumed from here continues the regular schedule
            self._final = self.evaluate(trainer, pl_module, record=False)
        self._log_metrics(trainer)
        self._log_figure(trainer)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, record: bool = True) -> tuple:
        """Accuracy on every seen task's subset now, logged at this step; appended to the history if ``record``.
        Returns ``(step, current task, accuracies with NaN for unseen tasks)``."""
        seen = self.task + 1
        end = self._ends[self.task]
        with torch.inference_mode(), eval_mode(pl_module):
            hits = torch.zeros(end, device=pl_module.device)
            for start in range(0, end, self.batch_size):
                rows = slice(start, min(start + self.batch_size, end))
                logits = pl_module(self._inputs[rows])
                if self._class_masks is not None:
                    logits = logits.masked_fill(~self._class_masks[self._task_ids[rows]], -math.inf)
                hits[rows] = (logits.argmax(dim=-1) == self._targets[rows]).float()
        hits = hits.clone()  # a normal tensor again, for the reduction below
        correct = torch.zeros(2, seen, device=pl_module.device)  # correct, total per task
        correct[0].index_add_(0, self._task_ids[:end], hits)
        correct[1].index_add_(0, self._task_ids[:end], torch.ones_like(hits))
        if trainer.world_size > 1:
            correct = trainer.strategy.reduce(correct, reduce_op="sum")
        accuracy = (correct[0] / correct[1]).tolist()
        point = (trainer.global_step, self.task, accuracy + [math.nan] * (len(self._subsets) - seen))
        if record:
            self.steps.append(point[0])
            self.current.append(point[1])
            self.accuracy.append(point[2])
        if trainer.logger is not None and trainer.is_global_zero:
            values = {log_tag(self, f"acc_task{k}"): a for k, a in enumerate(accuracy)}
            values[log_tag(self, "avg_acc")] = sum(accuracy) / seen
            trainer.logger.log_metrics(values, step=trainer.global_step)
        return point

    # ------------------------------------------------------------------ metrics
    def history(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(steps [E], current task [E], accuracy [E, T] with NaN for unseen tasks)``, including the evaluation
        at the end of the last fit."""
        steps, current, accuracy = list(self.steps), list(self.current), list(self.accuracy)
        if self._final is not None:
            steps.append(self._final[0])
            current.append(self._final[1])
            accuracy.append(self._final[2])
        return torch.tensor(steps), torch.tensor(current), torch.tensor(accuracy, dtype=torch.float64)

    def summary(self, end_of_task_only: bool = False) -> dict[str, float]:
        """The metrics of the run so far, as fractions: ``acc``, ``min_acc``, ``wc_acc``, ``wf<w>``, ``wp<w>``,
        ``lca10``, ``forgetting``, ``bwt``. With ``end_of_task_only=True``, the same computed from the task-end
        evaluations only: what the usual evaluation would report."""
        if not self.steps:
            raise ValueError("No evaluation yet: fit with this callback first.")
        _, current, acc = self.history()
        if end_of_task_only:
            ends = [e for e in range(len(current)) if e == len(current) - 1 or current[e + 1] != current[e]]
            current, acc = current[ends], acc[ends]
        result = {
            "acc": metrics.final_accuracy(acc),
            "min_acc": metrics.min_acc(acc, current),
            "wc_acc": metrics.wc_acc(acc, current),
            "lca10": metrics.learning_curve_area(acc, current, 10),
            "forgetting": metrics.forgetting(acc, current),
            "bwt": metrics.backward_transfer(acc, current),
        }
        for w in self.windows:
            result[f"wf{w}"] = metrics.windowed_forgetting(acc, w)
            result[f"wp{w}"] = metrics.windowed_plasticity(acc, w)
        return result

    def _log_metrics(self, trainer: pl.Trainer) -> None:
        if trainer.logger is None or not trainer.is_global_zero:
            return
        metrics = {log_tag(self, k): v for k, v in self.summary().items() if not math.isnan(v)}
        trainer.logger.log_metrics(metrics, step=trainer.global_step)

    def _log_figure(self, trainer: pl.Trainer) -> None:
        if not isinstance(trainer.logger, TensorBoardLogger) or not trainer.is_global_zero:
            return
        trainer.logger.experiment.add_figure(log_tag(self, "stability_gap"), self.figure(), trainer.global_step)

    def figure(self):
        """A matplotlib figure: each task's accuracy over optimizer steps, task switches as vertical lines."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps, current, acc = self.history()
        fig, ax = plt.subplots(figsize=(8, 4))
        for k in range(acc.shape[1]):
            ax.plot(steps, 100 * acc[:, k], label=f"task {k}", linewidth=1)
        for e in range(1, len(current)):
            if current[e] != current[e - 1]:
                ax.axvline(int(steps[e - 1]), color="grey", linestyle=":", linewidth=0.8)
        ax.set(xlabel="optimizer step", ylabel="accuracy (%)", ylim=(0, 101), title="Continual evaluation")
        ax.legend(loc="lower left", fontsize=8)
        fig.tight_layout()
        return fig

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "current": self.current, "accuracy": self.accuracy,
                "task": self.task, "switch_step": self.switch_step}  # fmt: skip

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.steps, self.current = list(state_dict["steps"]), list(state_dict["current"])
        self.accuracy = [list(row) for row in state_dict["accuracy"]]
        self.task, self.switch_step = state_dict["task"], state_dict["switch_step"]
