"""Concept bottleneck models (CBM, hybrid CBM), concept embedding models (CEM), post-hoc CBMs and Sparse-CBM."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MultilabelAccuracy, MultilabelAUROC, MultilabelF1Score

from lit_tricks.core.checks import check_number
from lit_tricks.core.eval_mode import eval_mode
from lit_tricks.core.rng import RestoresRNG
from lit_tricks.data.indexed import dataset_tensors
from lit_tricks.functional import concepts as cf

Mode = Literal["joint", "sequential", "independent"]
Bottleneck = Literal["prob", "logit", "hard"]


def _unpack(batch: Any) -> tuple[Tensor, Tensor, Tensor]:
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


class _ConceptModule(RestoresRNG, pl.LightningModule):
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
        x, c, y = _unpack(batch)
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
        x, c, y = _unpack(batch)
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
        x, c, _ = _unpack(batch)
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


class ConceptBottleneckModel(_ConceptModule):
    r"""Concept bottleneck models ("Concept Bottleneck Models", Koh et al., ICML 2020): inputs :math:`x \to`
    concept logits :math:`g(x) \to` bottleneck :math:`z \to` task logits :math:`f(z)`.

    .. math:: \mathcal L = \mathrm{CE}(f(z), y) + \frac{\lambda}{k} \textstyle\sum_j w_j \mathrm{BCE}(g_j(x), c_j)

    (:math:`w_j` = ``concept_weight``, 1 by default). The concept term is the **mean** over the :math:`k`
    concepts, as in cem's ``ConceptBottleneckModel`` (``BCELoss``, mean reduction) and Koh's own concept-model
    training (``sum(losses) / n_attributes``), so :math:`\lambda` does not grow with :math:`k` and cem's values
    carry over. Koh's *joint* code (``CUB/train.py``) instead **sums** one BCE per concept, each times
    ``attr_loss_weight``: their :math:`\lambda_\text{Koh}` is :math:`\lambda = k \lambda_\text{Koh}` here (CUB:
    :math:`112 \times 0.01 = 1.12`). Their ``-normalize_loss`` also divides the total by
    :math:`1 + k \lambda_\text{Koh}`, which rescales the step size only.

    Modes: ``"joint"`` (both terms train everything), ``"sequential"`` (the head learns from the *predicted*
    bottleneck, detached, so only the concept loss trains :math:`g`) and ``"independent"`` (the head learns
    from the *true* concepts; at test it gets :math:`g`'s). Unlike Koh et al., who train the head after
    :math:`g` has converged, both parts train at once here; the head sees :math:`g`'s final outputs by the end.
    Bottleneck: ``"prob"`` :math:`\sigma(g(x))`, ``"logit"`` :math:`g(x)`, or ``"hard"`` :math:`\mathbb
    1[\sigma(g(x)) > .5]` (straight-through gradient). ``extra_dims`` unsupervised outputs of the encoder pass
    to the head beside the concepts (the hybrid CBM of Mahinpei et al.).

    Interventions (:meth:`intervene`, :meth:`intervention_curve`) replace predicted concepts by true ones: 0/1
    for probability and hard bottlenecks, the 5th/95th percentile of each concept's *training* logits for a
    logit bottleneck (computed when training ends, or by :meth:`calibrate_interventions`).

    Args:
        concept_encoder: ``x -> [N, n_concepts + extra_dims]`` logits.
        task_head: ``[N, n_concepts + extra_dims] -> [N, n_classes]`` (a linear layer or an MLP).
        n_concepts: number of supervised concepts.
        mode: ``"joint"``, ``"sequential"`` or ``"independent"``.
        concept_loss_weight: :math:`\lambda`, on the mean over concepts (cem's configs: 1; Koh's CUB joint 0.01
            is a weight on the sum, i.e. :math:`0.01 k` = 1.12 here).
        bottleneck: ``"prob"``, ``"logit"`` or ``"hard"``.
        extra_dims: unsupervised encoder outputs passed to the head (hybrid CBM; 0 for a pure CBM).
        concept_pos_weight: per-concept weights of the *positive* term of the BCE (PyTorch's ``pos_weight``;
            :math:`n_\text{neg}/n_\text{pos}` balances the two classes of each concept).
        concept_weight: per-concept weights :math:`w_j` of the *whole* BCE term of concept :math:`j` (PyTorch's
            ``weight``). Koh's ``-weighted_loss multiple`` and cem's ``weight_loss`` pass :math:`n/n_\text{pos} - 1`
            here, not as ``pos_weight``: it scales rare concepts' positive and negative terms alike (and
            down-weights concepts positive in over half the samples); it does not balance positives against
            negatives.
        concept_groups: lists of concept indices intervened together (e.g. CUB's attribute groups).
        optimizer: ``None``: Adam, lr 1e-2 (cem's toy configs).

    Example::

        >>> import lightning as L
        >>> from torch import nn
        >>> from lit_tricks import ConceptBottleneckModel
        >>> from lit_tricks.data import ConceptToyDataModule
        >>> model = ConceptBottleneckModel(nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 2)),
        ...                                nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 2)), n_concepts=2)
        >>> trainer = L.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        ...                     enable_model_summary=False)
        >>> trainer.fit(model, ConceptToyDataModule("xor", num_samples=600, batch_size=100))
        >>> sorted(k for k in trainer.callback_metrics if k.startswith("val/"))[:3]
        ['val/acc', 'val/acc_intervened', 'val/concept_acc']
    """

    def __init__(
        self,
        concept_encoder: nn.Module,
        task_head: nn.Module,
        n_concepts: int,
        mode: Mode = "joint",
        concept_loss_weight: float = 1.0,
        bottleneck: Bottleneck = "prob",
        extra_dims: int = 0,
        concept_pos_weight: Sequence[float] | None = None,
        concept_weight: Sequence[float] | None = None,
        concept_groups: Sequence[Sequence[int]] | None = None,
        optimizer: OptimizerCallable | None = None,
    ) -> None:
        super().__init__(n_concepts, concept_loss_weight, concept_pos_weight, concept_weight, concept_groups, optimizer)
        if mode not in ("joint", "sequential", "independent"):
            raise ValueError(f"mode must be 'joint', 'sequential' or 'independent', got {mode!r}.")
        if bottleneck not in ("prob", "logit", "hard"):
            raise ValueError(f"bottleneck must be 'prob', 'logit' or 'hard', got {bottleneck!r}.")
        if extra_dims < 0:
            raise ValueError(f"extra_dims must be >= 0, got {extra_dims}.")
        if mode == "independent" and (bottleneck == "logit" or extra_dims):
            raise ValueError("mode='independent' trains the head on true concepts: use bottleneck 'prob' or 'hard' "
                             "and no extra_dims.")  # fmt: skip
        self.save_hyperparameters(ignore=["concept_encoder", "task_head", "optimizer"])
        self.concept_encoder, self.task_head = concept_encoder, task_head
        self.mode, self.bottleneck_kind, self.extra_dims = mode, bottleneck, extra_dims
        self.register_buffer("logit_low", torch.full((n_concepts,), float("nan")))
        self.register_buffer("logit_high", torch.full((n_concepts,), float("nan")))

    def concept_logits(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        out = self.concept_encoder(x)
        if out.shape[1] != self.n_concepts + self.extra_dims:
            raise ValueError(
                f"concept_encoder returns {out.shape[1]} values but n_concepts + extra_dims = "
                f"{self.n_concepts + self.extra_dims}."
            )
        return out[:, : self.n_concepts], out[:, self.n_concepts :] if self.extra_dims else None

    def bottleneck(self, c_logits: Tensor) -> Tensor:
        if self.bottleneck_kind == "logit":
            return c_logits
        probs = c_logits.sigmoid()
        if self.bottleneck_kind == "hard":
            return (probs > 0.5).to(probs.dtype) + probs - probs.detach()
        return probs

    def task_logits(
        self, c_logits: Tensor, state: Any, mask: Tensor | None = None, true: Tensor | None = None
    ) -> Tensor:
        z = self.bottleneck(c_logits)
        if mask is not None:
            low = high = None
            if self.bottleneck_kind == "logit":
                if self.logit_low.isnan().any():
                    raise ValueError("Logit interventions need the training logits' percentiles: fit first, or call "
                                     "calibrate_interventions(train_inputs).")  # fmt: skip
                low, high = self.logit_low, self.logit_high
            z = cf.intervene(z, true, mask, low, high)
        if state is not None:
            z = torch.cat([z, state], dim=1)
        return self.task_head(z)

    def training_head_inputs(self, c_logits: Tensor, state: Any, c: Tensor) -> Tensor:
        if self.mode == "joint":
            return self.task_logits(c_logits, state)
        if self.mode == "sequential":
            return self.task_logits(c_logits.detach(), None if state is None else state.detach())
        return self.task_logits(c_logits.detach(), state, torch.ones_like(c, dtype=torch.bool), c)

    @torch.no_grad()
    def calibrate_interventions(self, inputs: Tensor) -> None:
        """Set the logit-intervention values to the 5th / 95th percentiles of the concept logits on ``inputs``."""
        with eval_mode(self):
            c_logits, _ = self.concept_logits(inputs.to(self.device))
        self.logit_low, self.logit_high = cf.logit_percentiles(c_logits)

    def interventions_ready(self) -> bool:
        return self.bottleneck_kind != "logit" or not self.logit_low.isnan().any()

    def _calibrate_from_training_data(self) -> None:
        """Logit bottleneck: recompute the intervention percentiles from the training inputs, if there are any."""
        loader = self.trainer.train_dataloader if self.bottleneck_kind == "logit" else None
        if loader is None:
            return
        inputs, _ = dataset_tensors(loader.dataset)
        self.calibrate_interventions(inputs)

    def on_validation_epoch_start(self) -> None:
        self._calibrate_from_training_data()  # so val/acc_intervened uses the current model's percentiles

    def on_train_end(self) -> None:
        self._calibrate_from_training_data()


class ConceptEmbeddingModel(_ConceptModule):
    r"""Concept embedding models ("Concept Embedding Models", Espinosa Zarlenga et al., NeurIPS 2022).

    Each concept has a positive and a negative embedding from the shared latent :math:`h`:
    :math:`[c_i^+, c_i^-] = \mathrm{LeakyReLU}(W_i h)`; its probability :math:`p_i = \sigma(w_s \cdot [c_i^+, c_i^-])`
    (:math:`w_s` shared by all concepts) mixes them, :math:`\hat c_i = p_i c_i^+ + (1 - p_i) c_i^-`, and the head
    reads the concatenated :math:`\hat c`. An intervention sets :math:`p_i` to the true :math:`c_i`. RandInt: during
    training each concept is intervened with probability ``training_intervention_prob`` (one mask per batch, as
    the authors' code), which teaches the head to use corrected concepts.

    Args:
        concept_encoder: ``x -> h [N, latent_dim]``.
        n_concepts, n_tasks: numbers of concepts and classes.
        latent_dim: size of ``h``.
        emb_size: :math:`m`, each embedding's size (the authors: 16).
        training_intervention_prob: RandInt probability (the authors: 0.25; 0 disables it).
        task_head: ``[N, n_concepts * emb_size] -> [N, n_tasks]``; default a linear layer.
        concept_loss_weight, concept_pos_weight, concept_weight, concept_groups, optimizer: as
            :class:`ConceptBottleneckModel`.
    """

    def __init__(
        self,
        concept_encoder: nn.Module,
        n_concepts: int,
        n_tasks: int,
        latent_dim: int,
        emb_size: int = 16,
        training_intervention_prob: float = 0.25,
        task_head: nn.Module | None = None,
        concept_loss_weight: float = 1.0,
        concept_pos_weight: Sequence[float] | None = None,
        concept_weight: Sequence[float] | None = None,
        concept_groups: Sequence[Sequence[int]] | None = None,
        optimizer: OptimizerCallable | None = None,
    ) -> None:
        super().__init__(n_concepts, concept_loss_weight, concept_pos_weight, concept_weight, concept_groups, optimizer)
        if not 0.0 <= training_intervention_prob <= 1.0:
            raise ValueError(f"training_intervention_prob must be in [0, 1], got {training_intervention_prob}.")
        if emb_size < 1 or latent_dim < 1 or n_tasks < 2:
            raise ValueError(
                f"Need emb_size, latent_dim >= 1 and n_tasks >= 2, got {emb_size}, {latent_dim}, {n_tasks}."
            )
        self.save_hyperparameters(ignore=["concept_encoder", "task_head", "optimizer"])
        self.concept_encoder, self.emb_size = concept_encoder, emb_size
        self.training_intervention_prob = training_intervention_prob
        self.contexts = nn.Linear(latent_dim, n_concepts * 2 * emb_size)
        self.scorer = nn.Linear(2 * emb_size, 1)  # shared across concepts
        self.task_head = task_head if task_head is not None else nn.Linear(n_concepts * emb_size, n_tasks)

    def concept_logits(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.concept_encoder(x)
        context = F.leaky_relu(self.contexts(h)).view(len(h), self.n_concepts, 2 * self.emb_size)
        return self.scorer(context).squeeze(-1), context

    def task_logits(
        self, c_logits: Tensor, state: Tensor, mask: Tensor | None = None, true: Tensor | None = None
    ) -> Tensor:
        p = c_logits.sigmoid()
        if mask is not None:
            p = cf.intervene(p, true, mask)
        positive, negative = state[..., : self.emb_size], state[..., self.emb_size :]
        mixed = p.unsqueeze(-1) * positive + (1 - p.unsqueeze(-1)) * negative
        return self.task_head(mixed.flatten(1))

    def training_head_inputs(self, c_logits: Tensor, state: Tensor, c: Tensor) -> Tensor:
        if self.training_intervention_prob == 0:
            return self.task_logits(c_logits, state)
        draw = torch.rand(self.n_concepts, device=c.device) < self.training_intervention_prob  # one mask per batch
        return self.task_logits(c_logits, state, draw.expand_as(c), c)


class PostHocCBM(RestoresRNG, pl.LightningModule):
    r"""Post-hoc concept bottleneck models ("Post-hoc Concept Bottleneck Models", Yuksekgonul et al., ICLR 2023)
    on precomputed embeddings :math:`e = f(x)` of a frozen model (batches ``{"inputs": e, "targets": y}``).

    A concept bank :math:`V` ``[k, d]`` (with intercepts :math:`b`) comes from concept examples
    (:meth:`concept_bank_from_examples`: a linear-kernel SVM per concept, i.e. CAVs) or from given concept vectors
    (e.g. text embeddings). The projection is the signed margin :math:`(V e + b) / \lVert v \rVert`
    (``"margin"``, the authors' code) or :math:`\langle e, v \rangle / \lVert v \rVert^2` (``"paper"``). The
    sparse linear head :math:`g(s) = W s + b_g` minimises the authors' code's objective (``train_pcbm.py``:
    scikit-learn's ``SGDClassifier(loss="log_loss", penalty="elasticnet", alpha=lam, l1_ratio)``, one-vs-rest):

    .. math:: \sum_{c=1}^{C} \frac1N \sum_i \mathrm{BCE}(g_c(s_i), \mathbb 1[y_i = c])
              + \lambda \big(\alpha \lVert W \rVert_1 + \tfrac{1 - \alpha}{2} \lVert W \rVert_2^2\big)

    (a sum of :math:`C` independent binary logistic regressions, intercepts unpenalised; for :math:`C = 2`
    scikit-learn fits one, here a second row solves its mirror image), trained by SGD with the
    :math:`\ell_1` part applied as scikit-learn applies it, the cumulative penalty of Tsuruoka et al. (2009): after
    each step every weight moves toward zero, never across it, by the total :math:`\ell_1` penalty
    :math:`\sum_t \eta \lambda \alpha` so far minus what it has already received, so weights reach exact zeros
    (a plain proximal step leaves most of them hovering around zero under minibatch noise). The paper writes the
    penalty as :math:`\frac{\lambda'}{C k}(\alpha\lVert W\rVert_1 + (1 - \alpha)\lVert W\rVert_2^2)` with a mean
    loss; the code's ``lam`` (what ``lam`` is here) enters unscaled (:math:`\lambda' \approx C k \lambda`).
    :meth:`hybrid` returns PCBM-h: :math:`g` frozen plus a residual linear layer on :math:`e` (``train_pcbm_h.py``),
    trained with CE + ``residual_l2`` :math:`\cdot \overline{W_r^2}`.

    Args:
        concept_bank: ``[k, d]`` concept vectors.
        n_classes: number of classes.
        intercepts: ``[k]`` (``None``: zeros, as for text embeddings).
        projection: ``"margin"`` or ``"paper"``.
        lam: :math:`\lambda`, scikit-learn's ``alpha`` (the authors: 1e-5 by default, 2e-4 on CUB).
        l1_ratio: :math:`\alpha` (the authors: 0.99).
        lr: SGD learning rate of the sparse head.
        residual_l2: PCBM-h's penalty on the residual weights (the authors: 1e-3).
    """

    def __init__(
        self,
        concept_bank: Tensor,
        n_classes: int,
        intercepts: Tensor | None = None,
        projection: Literal["margin", "paper"] = "margin",
        lam: float = 1e-5,
        l1_ratio: float = 0.99,
        lr: float = 0.1,
        residual_l2: float = 1e-3,
    ) -> None:
        super().__init__()
        if concept_bank.ndim != 2:
            raise ValueError(f"concept_bank must be [k, d], got shape {tuple(concept_bank.shape)}.")
        if projection not in ("margin", "paper"):
            raise ValueError(f"projection must be 'margin' or 'paper', got {projection!r}.")
        check_number("lam", lam, at_least=0.0)
        check_number("l1_ratio", l1_ratio, at_least=0.0, at_most=1.0)
        check_number("lr", lr, above=0.0)
        k = concept_bank.shape[0]
        self.register_buffer("bank", concept_bank.float())
        self.register_buffer("intercepts", torch.zeros(k) if intercepts is None else intercepts.float().view(k))
        self.projection, self.lam, self.l1_ratio, self.lr, self.residual_l2 = projection, lam, l1_ratio, lr, residual_l2
        self.head = nn.Linear(k, n_classes)
        self.residual: nn.Linear | None = None
        # the cumulative l1 penalty: SGD steps so far (an integer, which low precision leaves exact; the penalty
        # offered is steps * lr * lam * l1_ratio) and what each weight has received
        self.register_buffer("l1_steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("l1_received", torch.zeros(n_classes, k))

    @staticmethod
    def concept_bank_from_examples(
        positives: Sequence[Tensor], negatives: Sequence[Tensor], C: float = 0.1
    ) -> tuple[Tensor, Tensor]:
        """CAVs: for each concept a linear-kernel SVM (scikit-learn ``SVC(kernel="linear", C=C)``, as the authors'
        ``concepts/concept_utils.py``) separating its positive from its negative example embeddings; returns
        ``(vectors [k, d], intercepts [k])``."""
        from sklearn.svm import SVC

        check_number("C", C, above=0.0)
        vectors, intercepts = [], []
        for pos, neg in zip(positives, negatives, strict=True):
            x = torch.cat([pos, neg]).double().numpy()
            y = [1] * len(pos) + [0] * len(neg)
            svm = SVC(C=C, kernel="linear").fit(x, y)
            vectors.append(torch.tensor(svm.coef_[0]))
            intercepts.append(float(svm.intercept_[0]))
        return torch.stack(vectors).float(), torch.tensor(intercepts)

    def project(self, embeddings: Tensor) -> Tensor:
        """Concept activations ``[N, k]``."""
        norms = self.bank.norm(dim=1)
        if self.projection == "paper":
            return embeddings @ self.bank.T / norms**2
        return (embeddings @ self.bank.T + self.intercepts) / norms

    def forward(self, embeddings: Tensor) -> Tensor:
        out = self.head(self.project(embeddings))
        return out if self.residual is None else out + self.residual(embeddings)

    def objective(self, embeddings: Tensor, targets: Tensor) -> Tensor:
        """The sparse head's full objective (data term and both penalties) on ``(embeddings, targets)``."""
        w = self.head.weight
        l1 = self.lam * self.l1_ratio * w.abs().sum()
        return self._one_vs_rest_loss(self.head(self.project(embeddings)), targets) + self._l2(w) + l1

    def _one_vs_rest_loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        one_hot = F.one_hot(targets, logits.shape[1]).to(logits.dtype)
        return F.binary_cross_entropy_with_logits(logits, one_hot, reduction="sum") / len(targets)

    def _l2(self, w: Tensor) -> Tensor:
        return self.lam * (1 - self.l1_ratio) / 2 * w.pow(2).sum()

    def hybrid(self, lr: float = 1e-2) -> PostHocCBM:
        """PCBM-h: this model with its head frozen and a residual ``nn.Linear(d, C)`` on the embeddings to train
        with Adam at ``lr``; like the authors' ``train_pcbm_h.py``, the residual keeps PyTorch's default
        initialisation and lr 0.01."""
        import copy

        check_number("lr", lr, above=0.0)
        model = copy.deepcopy(self)
        model.head.requires_grad_(False)
        model.residual = nn.Linear(self.bank.shape[1], self.head.out_features)
        model.lr = lr
        return model

    def configure_optimizers(self):
        if self.residual is None:  # plain SGD, as the cumulative l1 penalty assumes
            return torch.optim.SGD(self.head.parameters(), lr=self.lr)
        return torch.optim.Adam(self.residual.parameters(), lr=self.lr)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        e, y = batch["inputs"], batch["targets"]
        if self.residual is None:
            loss = self._one_vs_rest_loss(self(e), y) + self._l2(self.head.weight)
        else:
            loss = F.cross_entropy(self(e), y) + self.residual_l2 * self.residual.weight.pow(2).mean()
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        """The SGD step, then the cumulative l1 penalty (scikit-learn's ``l1penalty``); here rather than in
        ``on_train_batch_end`` so it follows every optimiser step (also with gradient accumulation) and a checkpoint
        saved at that batch includes it."""
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        if self.residual is None and self.l1_ratio > 0:
            self.l1_steps += 1
            offered = self.l1_steps.item() * self.lr * self.lam * self.l1_ratio
            with torch.no_grad():
                w = self.head.weight
                sign = w.sign()
                still_due = offered + sign * self.l1_received
                shrunk = sign * (w.abs() - still_due).clamp(min=0)
                self.l1_received += shrunk - w
                w.copy_(shrunk)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._log_accuracy(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._log_accuracy(batch, "test")

    def _log_accuracy(self, batch: Any, stage: str) -> None:
        e, y = batch["inputs"], batch["targets"]
        self.log(f"{stage}/acc", (self(e).argmax(-1) == y).float().mean(), batch_size=len(y), sync_dist=True)
        self.log(f"{stage}/sparsity", (self.head.weight == 0).float().mean())


class SparseCBM(RestoresRNG, pl.LightningModule):
    r"""The Sparse-CBM concept layer (Semenov et al., "Sparse Concept Bottleneck Models", 2024) on precomputed
    image-concept similarities :math:`s` ``[N, k]`` (batches ``{"inputs": s, "targets": y}``): a concept layer
    :math:`Z = W_\text{cbl} s` (``Linear(k, k)``, no bias) and a head ``Linear(k, C)``, trained with

    .. math:: \mathrm{CE}(\text{head}(Z), y) + \mathcal L_\text{Gumbel}(Z)
              + \frac{\lambda_1}{k}\lVert W_\text{cbl}\rVert_1

    (:func:`~lit_tricks.functional.concepts.gumbel_contrastive_loss`; ``concept_loss="l1"`` keeps only the
    :math:`\ell_1` term). For training-free prediction see
    :func:`~lit_tricks.functional.concepts.concept_matrix_search`.

    Args:
        n_concepts, n_classes: sizes.
        concept_loss: ``"gumbel"`` (Sparse-CBM) or ``"l1"`` (the l1-CBM baseline).
        tau: Gumbel-softmax temperature (the authors: 1.0).
        l1_lambda: :math:`\lambda_1` (the authors: 1e-3).
        lr: learning rate of Adam.
    """

    def __init__(
        self, n_concepts: int, n_classes: int, concept_loss: Literal["gumbel", "l1"] = "gumbel", tau: float = 1.0,
        l1_lambda: float = 1e-3, lr: float = 1e-3,
    ) -> None:  # fmt: skip
        super().__init__()
        if concept_loss not in ("gumbel", "l1"):
            raise ValueError(f"concept_loss must be 'gumbel' or 'l1', got {concept_loss!r}.")
        check_number("tau", tau, above=0.0)
        check_number("l1_lambda", l1_lambda, at_least=0.0)
        self.save_hyperparameters()
        self.cbl = nn.Linear(n_concepts, n_concepts, bias=False)
        self.head = nn.Linear(n_concepts, n_classes, bias=False)

    def forward(self, similarities: Tensor) -> tuple[Tensor, Tensor]:
        """``(concept activations Z, class logits)``."""
        z = self.cbl(similarities)
        return z, self.head(z)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        z, logits = self(batch["inputs"])
        task = F.cross_entropy(logits, batch["targets"])
        sparsity = self.hparams.l1_lambda * self.cbl.weight.abs().sum() / self.hparams.n_concepts
        concept = cf.gumbel_contrastive_loss(z, self.hparams.tau) if self.hparams.concept_loss == "gumbel" else 0.0
        loss = task + concept + sparsity
        self.log_dict({"train/loss": loss, "train/task_loss": task, "train/l1": sparsity})
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        _, logits = self(batch["inputs"])
        acc = (logits.argmax(-1) == batch["targets"]).float().mean()
        self.log("val/acc", acc, batch_size=len(logits), sync_dist=True)
