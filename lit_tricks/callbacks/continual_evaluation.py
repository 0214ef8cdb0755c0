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
from lit_tricks.core.tasks import batch_task
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

    With ``eval_period`` it also runs the online protocol of Si-Blurry (Moon et al., ICCV 2023; the authors'
    ``_Trainer``): the classes that have appeared in training batches so far are the *seen* classes; whenever the
    training samples counted so far (batch size x world size per step) exceed the next multiple of
    ``eval_period``, the model is evaluated on the subsets' samples of the seen classes with the logits of unseen
    classes masked out (sample-weighted accuracy; logged as ``.../online_acc``), and the threshold moves up by one
    period. :meth:`summary` then adds

    - ``a_auc`` :math:`= \frac1E\sum_{e=1}^{E} A_e`, the mean of these periodic accuracies ("area under the
      accuracy curve", the evaluations at the end of tasks and of training not included, as in the authors' code);
    - ``a_last``, the same accuracy at the end of training; ``a_avg``, its mean over the ends of the tasks.

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
        eval_period: if set, evaluate on the seen classes every this many training samples and report
            ``a_auc``, ``a_last`` and ``a_avg`` (Si-Blurry's online metrics; the authors' ``eval_period``: 100 by
            default, 1000 in their CIFAR-100 scripts). ``None``: off, no extra cost.
        stratified: draw each task's subset with every class in the proportion it has in the evaluation set
            (largest remainders), not uniformly: a small ``subset_size`` (the cost of an evaluation is linear in it)
            then keeps the class mix. ``False`` (default): a uniform draw, as the paper.

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
        eval_period: int | None = None,
        stratified: bool = False,
    ) -> None:
        check_number("every_n_steps", every_n_steps, at_least=1, integer=True, hint="1: after every optimizer step.")
        if subset_size is not None:
            check_number("subset_size", subset_size, at_least=1, integer=True, hint="Or None for up to 1000.")
        if dense_steps is not None:
            check_number("dense_steps", dense_steps, at_least=1, integer=True, hint="Or None.")
        if not windows or min(windows) < 2:
            raise ValueError(f"windows must be evaluation counts >= 2, e.g. (10, 100); got {windows}.")
        check_number("batch_size", batch_size, at_least=1, integer=True)
        if eval_period is not None:
            check_number("eval_period", eval_period, at_least=1, integer=True, hint="Training samples, or None.")
        self.eval_period = eval_period
        self.every_n_steps, self.subset_size, self.dense_steps = every_n_steps, subset_size, dense_steps
        self.windows, self.eval_sets, self.task_incremental = tuple(windows), eval_sets, task_incremental
        self.batch_size, self.seed, self.stratified = batch_size, seed, stratified
        self._subsets: list[tuple[Tensor, Tensor]] = []
        self._class_masks: Tensor | None = None
        self._row_masks: Tensor | None = None
        # the history (in the checkpoint)
        self.steps: list[int] = []
        self.current: list[int] = []
        self.accuracy: list[list[float]] = []
        self.task = 0
        self.switch_step = 0
        self._final: tuple | None = None
        # the online (Si-Blurry) protocol's history, in the checkpoint too
        self.samples = 0
        self.next_online = eval_period or 0
        self.online_samples: list[int] = []
        self.online_accuracy: list[float] = []
        self.online_task_end: list[float] = []
        self._seen: Tensor | None = None  # [C] bool: the classes seen in training batches
        self._restored_seen: list[int] | None = None
        self._last_online: float | None = None

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
        if self.eval_period is not None:
            num_classes = getattr(pl_module, "num_classes", None) or getattr(datamodule, "num_classes", None)
            if not isinstance(num_classes, int):
                raise ValueError(
                    "eval_period needs the number of classes: give the module or the data module a num_classes "
                    "attribute (Classifier and ContinualDataModule have one), or set eval_period=None."
                )
            if self._seen is None or len(self._seen) != num_classes:
                self._seen = torch.zeros(num_classes, dtype=torch.bool)

    def _subset(self, task: int, inputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        size = min(len(inputs), 1000) if self.subset_size is None else self.subset_size
        if size > len(inputs):
            raise ValueError(
                f"subset_size={self.subset_size} but task {task}'s evaluation set has {len(inputs)} samples: "
                "lower subset_size (or None for up to 1000)."
            )
        generator = torch.Generator().manual_seed(self.seed * 1000 + task)  # fixed per task, private
        if not self.stratified:
            rows = torch.randperm(len(inputs), generator=generator)[:size]
            return inputs[rows], targets[rows]
        if targets.ndim != 1:
            raise ValueError(f"stratified=True needs class ids as targets; task {task}'s are {tuple(targets.shape)}.")
        classes, counts = targets.unique(return_counts=True)
        quota = counts * size / len(targets)
        take = quota.floor().long()
        extra = torch.argsort(quota - take, descending=True, stable=True)[: size - int(take.sum())]
        take[extra] += 1
        rows = []
        for c, k in zip(classes.tolist(), take.tolist(), strict=True):
            members = (targets == c).nonzero().flatten()
            rows.append(members[torch.randperm(len(members), generator=generator)[:k]])
        rows = torch.cat(rows)
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
        sizes = torch.tensor([len(y) for _, y in shards], dtype=torch.float32)
        self._ends, self._totals = sizes.cumsum(0).long().tolist(), sizes.to(device)
        # task-incremental: each row's mask of the classes outside its task, gathered once
        self._row_masks = None if self._class_masks is None else ~self._class_masks[self._task_ids.cpu()].to(device)
        if self._seen is not None:
            if self._restored_seen is not None:  # from a checkpoint
                self._seen = torch.zeros_like(self._seen).index_fill_(0, torch.tensor(self._restored_seen), True)
                self._restored_seen = None
            self._seen = self._seen.to(device)
        self._final = self._last_online = None
        if not self.steps:
            self.evaluate(trainer, pl_module)  # before the first update

    # ------------------------------------------------------------------ the loop
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        task = batch_task(trainer, pl_module, batch, reader="ContinualEvaluation")  # the same on every rank
        if task >= len(self._subsets):
            raise ValueError(f"batch['task'] holds task {task} but there are {len(self._subsets)} evaluation sets.")
        if task > self.task:
            if self.steps[-1] != trainer.global_step:
                self.evaluate(trainer, pl_module)  # the end of the finished task
            if self.eval_period is not None and self.samples > 0:  # a task ends (not an empty task before any sample)
                self.online_task_end.append(self.evaluate_online(trainer, pl_module))
            self._log_metrics(trainer)
            self.task, self.switch_step = task, trainer.global_step
        if self.eval_period is not None:
            self._see(trainer, pl_module, TrickBatch.from_batch(batch).targets)

    def _see(self, trainer: pl.Trainer, pl_module: pl.LightningModule, targets: Tensor) -> None:
        """Count the batch's samples (over all ranks) and add its classes to the seen ones (union over ranks)."""
        self.samples += len(targets) * trainer.world_size
        if targets.ndim == 2:  # probabilities (mixed labels): every class with mass
            present = (targets > 0).any(dim=0)
        else:
            present = torch.zeros_like(self._seen).index_fill_(0, targets.long(), True)
        if trainer.world_size > 1:  # every rank must hold the same seen classes (and so the same state)
            present = pl_module.all_gather(present).any(dim=0)
        self._seen |= present

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        dense = self.dense_steps is not None and step - self.switch_step <= self.dense_steps
        if (dense or step % self.every_n_steps == 0) and self.steps[-1] != step:
            self.evaluate(trainer, pl_module)
        if self.eval_period is not None and self.samples > self.next_online:
            self.online_samples.append(self.samples)
            self.online_accuracy.append(self.evaluate_online(trainer, pl_module))
            self.next_online += self.eval_period

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.steps[-1] != trainer.global_step:
            # in the summary but not in the state: a run resumed from here continues the regular schedule
            self._final = self.evaluate(trainer, pl_module, record=False)
        if self.eval_period is not None:
            self._last_online = self.evaluate_online(trainer, pl_module)
        self._log_metrics(trainer)
        self._log_figure(trainer)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, record: bool = True) -> tuple:
        """Accuracy on every seen task's subset now, logged at this step; appended to the history if ``record``.
        Returns ``(step, current task, accuracies with NaN for unseen tasks)``."""
        seen, end = self.task + 1, self._ends[self.task]
        correct = torch.zeros(seen, device=pl_module.device)
        with torch.inference_mode(), eval_mode(pl_module):
            for start in range(0, end, self.batch_size):
                rows = slice(start, min(start + self.batch_size, end))
                logits = pl_module(self._inputs[rows])
                if self._row_masks is not None:
                    logits = logits.masked_fill(self._row_masks[rows], -math.inf)
                hits = logits.argmax(dim=-1) == self._targets[rows]
                correct.index_add_(0, self._task_ids[rows], hits.to(correct.dtype))
        counts = torch.stack([correct, self._totals[:seen]])  # correct, total per task; a normal tensor again
        if trainer.world_size > 1:
            counts = trainer.strategy.reduce(counts, reduce_op="sum")
        accuracy = (counts[0] / counts[1]).tolist()  # the one host sync
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

    def evaluate_online(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> float:
        """Accuracy on the subsets' samples of the seen classes, the logits of unseen classes masked out (NaN if no
        class is seen yet); logged at this step as ``.../online_acc``."""
        seen = self._seen
        rows = seen[self._targets].nonzero().flatten()  # a host sync, once per evaluation
        hits = torch.zeros(len(rows), device=pl_module.device)
        with torch.inference_mode(), eval_mode(pl_module):
            for start in range(0, len(rows), self.batch_size):
                chunk = rows[start : start + self.batch_size]
                logits = pl_module(self._inputs[chunk]).masked_fill(~seen, -math.inf)
                hits[start : start + len(chunk)] = (logits.argmax(dim=-1) == self._targets[chunk]).float()
        counts = torch.stack([hits.sum(), torch.tensor(float(len(rows)), device=hits.device)])
        if trainer.world_size > 1:
            counts = trainer.strategy.reduce(counts, reduce_op="sum")
        accuracy = (counts[0] / counts[1]).item() if counts[1] > 0 else math.nan
        if trainer.logger is not None and trainer.is_global_zero and not math.isnan(accuracy):
            trainer.logger.log_metrics({log_tag(self, "online_acc"): accuracy}, step=trainer.global_step)
        return accuracy

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
        evaluations only: what the usual evaluation would report. With ``eval_period`` also the online metrics
        ``a_auc``, ``a_last`` and ``a_avg`` (NaN before their first evaluation), the same either way."""
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
        if self.eval_period is not None:
            final = [] if self._last_online is None else [self._last_online]
            result["a_auc"] = _mean(self.online_accuracy)
            result["a_last"] = ([math.nan] + self.online_accuracy + final)[-1]
            result["a_avg"] = _mean(self.online_task_end + final)
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
        state = {"steps": self.steps, "current": self.current, "accuracy": self.accuracy,
                 "task": self.task, "switch_step": self.switch_step}  # fmt: skip
        if self.eval_period is not None:
            seen = None if self._seen is None else self._seen.nonzero().flatten().tolist()
            state["online"] = {"samples": self.samples, "next": self.next_online, "at": self.online_samples,
                               "accuracy": self.online_accuracy, "task_end": self.online_task_end,
                               "seen": seen}  # fmt: skip
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.steps, self.current = list(state_dict["steps"]), list(state_dict["current"])
        self.accuracy = [list(row) for row in state_dict["accuracy"]]
        self.task, self.switch_step = state_dict["task"], state_dict["switch_step"]
        online = state_dict.get("online")
        if online is not None and self.eval_period is not None:
            self.samples, self.next_online = online["samples"], online["next"]
            self.online_samples, self.online_accuracy = list(online["at"]), list(online["accuracy"])
            self.online_task_end, self._restored_seen = list(online["task_end"]), online["seen"]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan
