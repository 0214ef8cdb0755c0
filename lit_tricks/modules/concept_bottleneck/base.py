"""What the concept bottleneck models share: the batch layout and the base module of CBM and CEM."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor
from torchmetrics import MetricCollection
from torchmetrics.classification import MultilabelAccuracy, MultilabelAUROC, MultilabelF1Score

from lit_tricks.core.checks import check_number
from lit_tricks.core.eval_mode import eval_mode
from lit_tricks.core.rng import RestoresRNG
from lit_tricks.functional import concepts as cf

Mode = Literal["joint", "sequential", "independent"]
Bottleneck = Literal["prob", "logit", "hard"]


def unpack_concept_batch(batch: Any) -> tuple[Tensor, Tensor, Tensor]:
    """``(x, c, y)`` from a dict ``{"inputs", "concepts", "targets"}`` or a tuple ``(x, c, y)``."""
    if isinstance(batch, Mapping):
        missing = [key for key in ("inputs", "concepts", "targets") if key not in batch]
        if missing:
            raise ValueError(f"Concept batches need 'inputs', 'concepts' and 'targets'; missing {missing}.")
        return batch["inputs"], batch["concepts"].float(), batch["targets"]
    if isinstance(batch, Sequence) and len(batch) == 3:
        x, c, y = batch
        return x, c.float(), y
    raise TypeError("A concept batch is a dict with 'inputs', 'concepts', 'targets' or a tuple (x, c, y).")


class ConceptModule(RestoresRNG, pl.LightningModule):
    """Training, evaluation, interventions and logging shared by the concept models. Subclasses implement
    :meth:`concept_logits` (``x -> (c_logits [N, k], state)``) and :meth:`task_logits`."""

    def __init__(
        self,
        n_concepts: int,
        concept_loss_weight: float,
        concept_pos_weight: Sequence[float] | None,
        concept_weight: Sequence[float] | None,
        concept_groups: Sequence[Sequence[int]] | None,
        optimizer: OptimizerCallable | None,
    ) -> None:
        super().__init__()
        if n_concepts < 1:
            raise ValueError(f"n_concepts must be >= 1, got {n_concepts}.")
        check_number("concept_loss_weight", concept_loss_weight, at_least=0.0)
        for name, values in (("concept_pos_weight", concept_pos_weight), ("concept_weight", concept_weight)):
            if values is not None and (len(values) != n_concepts or min(values) < 0):
                raise ValueError(f"{name} needs {n_concepts} values >= 0 (one per concept), got {list(values)}.")
        self.n_concepts, self.concept_loss_weight, self.optimizer = n_concepts, concept_loss_weight, optimizer
        self.register_buffer("pos_weight", None if concept_pos_weight is None else torch.tensor(concept_pos_weight))
        self.register_buffer("concept_weight", None if concept_weight is None else torch.tensor(concept_weight))
        self.register_buffer("groups", cf.group_matrix(n_concepts, concept_groups), persistent=False)
        metrics = MetricCollection(
            {
                "concept_acc": MultilabelAccuracy(n_concepts),
                "concept_auc": MultilabelAUROC(n_concepts),
                "concept_f1": MultilabelF1Score(n_concepts),
            }
        )
        self.val_concept_metrics, self.test_concept_metrics = (
            metrics.clone(prefix="val/"),
            metrics.clone(prefix="test/"),
        )
        self._eval_store: dict[str, list[Tensor]] = {}

    # subclasses ---------------------------------------------------------
    def concept_logits(self, x: Tensor) -> tuple[Tensor, Any]:
        raise NotImplementedError

    def task_logits(
        self, c_logits: Tensor, state: Any, mask: Tensor | None = None, true: Tensor | None = None
    ) -> Tensor:
        raise NotImplementedError

    def interventions_ready(self) -> bool:
        """Whether interventions can be computed now (a logit bottleneck needs its percentiles first)."""
        return True

    def training_head_inputs(self, c_logits: Tensor, state: Any, c: Tensor) -> Tensor:
        """Task logits during training (joint by default; CBM overrides for sequential / independent)."""
        return self.task_logits(c_logits, state)

    # the module ---------------------------------------------------------
    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(concept probabilities [N, k], task logits [N, C])``."""
        c_logits, state = self.concept_logits(x)
        return c_logits.sigmoid(), self.task_logits(c_logits, state)

    def configure_optimizers(self):
        if self.optimizer is None:
            return torch.optim.Adam(self.parameters(), lr=1e-2)
        return self.optimizer(self.parameters())

    def concept_loss(self, c_logits: Tensor, c: Tensor) -> Tensor:
        """The (weighted) BCE averaged over samples **and concepts**."""
        return F.binary_cross_entropy_with_logits(c_logits, c, weight=self.concept_weight, pos_weight=self.pos_weight)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, c, y = unpack_concept_batch(batch)
        c_logits, state = self.concept_logits(x)
        if c_logits.shape[1] != self.n_concepts:
            raise ValueError(
                f"The concept encoder returns {c_logits.shape[1]} concepts but n_concepts={self.n_concepts}."
            )
        task_loss = F.cross_entropy(self.training_head_inputs(c_logits, state, c), y)
        concept_loss = self.concept_loss(c_logits, c)
        loss = task_loss + self.concept_loss_weight * concept_loss
        self.log_dict({"train/loss": loss, "train/task_loss": task_loss, "train/concept_loss": concept_loss})
        return loss

    # evaluation ---------------------------------------------------------
    def _evaluate(self, batch: Any, stage: str) -> None:
        x, c, y = unpack_concept_batch(batch)
        c_logits, state = self.concept_logits(x)
        logits = self.task_logits(c_logits, state)
        metrics = self.val_concept_metrics if stage == "val" else self.test_concept_metrics
        metrics.update(c_logits.sigmoid(), c.long())
        n = len(y)
        self.log(f"{stage}/acc", (logits.argmax(-1) == y).float().mean(), batch_size=n, sync_dist=True)
        if self.interventions_ready():
            intervened = self.task_logits(c_logits, state, torch.ones_like(c, dtype=torch.bool), c)
            intervened_acc = (intervened.argmax(-1) == y).float().mean()
            self.log(f"{stage}/acc_intervened", intervened_acc, batch_size=n, sync_dist=True)
        self.log(f"{stage}/concept_loss", self.concept_loss(c_logits, c), batch_size=n, sync_dist=True)
        self.log_dict(metrics, batch_size=n)
        store = self._eval_store
        for key, value in (("x", x), ("c", c), ("y", y), ("p", c_logits.sigmoid())):
            store.setdefault(key, []).append(value.detach())

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def on_validation_epoch_end(self) -> None:
        self._log_figures("val")

    def on_test_epoch_end(self) -> None:
        self._log_figures("test")

    def _log_figures(self, stage: str) -> None:
        store, self._eval_store = self._eval_store, {}
        if not store or not isinstance(self.logger, TensorBoardLogger) or self.trainer.sanity_checking:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        x, c, y, p = (torch.cat(store[key]) for key in ("x", "c", "y", "p"))
        experiment = self.logger.experiment
        per_concept = ((p > 0.5) == c.bool()).float().mean(dim=0)
        for j in range(self.n_concepts):
            experiment.add_scalar(f"{stage}/concept_acc_per_concept/{j}", per_concept[j], self.global_step)
            experiment.add_histogram(f"{stage}/concept_prob/{j}", p[:, j], self.global_step)
        curve = self.intervention_curve(x, c, y, policy="random", trials=3)
        fig, ax = plt.subplots(figsize=(5, 3.5))
        groups = list(curve)
        means = [100 * curve[g][0] for g in groups]
        stds = [100 * curve[g][1] for g in groups]
        ax.errorbar(groups, means, yerr=stds, marker="o", capsize=3)
        ax.set(xlabel="concept groups intervened", ylabel="task accuracy (%)", title="Intervention curve (random)")
        fig.tight_layout()
        experiment.add_figure(f"{stage}/intervention_curve", fig, self.global_step)
        plt.close(fig)

    # interventions ------------------------------------------------------
    @torch.no_grad()
    def intervene(
        self,
        batch: Any,
        n_groups: int,
        policy: cf.Policy = "random",
        generator: torch.Generator | None = None,
        order: Sequence[int] | None = None,
    ) -> Tensor:
        """Task logits ``[N, C]`` with ``n_groups`` concept groups (concepts if no ``concept_groups``) per
        sample replaced by their true values, chosen by ``policy`` (see
        :func:`~lit_tricks.functional.concepts.intervention_mask`)."""
        x, c, _ = unpack_concept_batch(batch)
        with eval_mode(self):
            c_logits, state = self.concept_logits(x)
            mask = cf.intervention_mask(c_logits.sigmoid(), n_groups, policy, self.groups, generator, order)
            return self.task_logits(c_logits, state, mask, c)

    @torch.no_grad()
    def intervention_curve(
        self,
        inputs: Tensor,
        concepts: Tensor,
        targets: Tensor,
        policy: cf.Policy = "random",
        trials: int = 5,
        seed: int = 0,
        order: Sequence[int] | None = None,
    ) -> dict[int, tuple[float, float]]:
        """Task accuracy for 0..G intervened groups: ``{n: (mean, std)}`` over ``trials`` random draws (the mean,
        not the best trial; deterministic policies need one trial)."""
        generator = torch.Generator().manual_seed(seed)
        trials = trials if policy == "random" else 1
        curve = {}
        for n in range(self.groups.shape[0] + 1):
            accs = []
            for _ in range(trials):
                logits = self.intervene((inputs, concepts, targets), n, policy, generator, order)
                accs.append((logits.argmax(-1) == targets).float().mean().item())
            accs_t = torch.tensor(accs)
            curve[n] = (accs_t.mean().item(), accs_t.std().item() if len(accs) > 1 else 0.0)
        return curve


def log_embedding_accuracy(module: pl.LightningModule, batch: Any, stage: str) -> None:
    """Log ``<stage>/acc`` of a module that classifies embedding batches ``{"inputs", "targets"}`` (PCBM, LaBo)."""
    e, y = batch["inputs"], batch["targets"]
    module.log(f"{stage}/acc", (module(e).argmax(-1) == y).float().mean(), batch_size=len(y), sync_dist=True)


class LinearHeadOnConcepts(RestoresRNG, pl.LightningModule):
    """A linear ``head`` on fixed concept activations of embedding batches ``{"inputs", "targets"}``: the loss is the
    cross-entropy plus the method's :meth:`penalty` on the head (logged as ``train/<penalty_name>``), Adam at ``lr``
    on the head alone, ``<stage>/acc`` at validation and test (DN-CBM's probe, KnoBo). Subclasses set ``head``,
    ``lr`` and ``penalty_name`` and implement ``forward(features) -> logits`` and :meth:`penalty`."""

    penalty_name = "penalty"

    def penalty(self) -> Tensor:
        raise NotImplementedError

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        ce = F.cross_entropy(self(batch["inputs"]), batch["targets"])
        penalty = self.penalty()
        loss = ce + penalty
        self.log_dict({"train/loss": loss, "train/ce": ce, f"train/{self.penalty_name}": penalty})
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.head.parameters(), lr=self.lr)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        log_embedding_accuracy(self, batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        log_embedding_accuracy(self, batch, "test")
