"""Concept bottleneck models (Koh et al. 2020): joint, sequential and independent training; hybrid CBM."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn

from lit_tricks.core.eval_mode import eval_mode
from lit_tricks.data.indexed import dataset_tensors
from lit_tricks.functional import concepts as cf
from lit_tricks.modules.concept_bottleneck.base import Bottleneck, ConceptModule, Mode


class ConceptBottleneckModel(ConceptModule):
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
