"""Prototype-sample relation distillation: replay-free class-incremental learning with SupCon, class prototypes
and a distillation of the old prototypes' similarities to new samples."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_tricks.core.batch import StepOutput, TrickBatch
from lit_tricks.core.checks import check_number, classifier_layer
from lit_tricks.core.tasks import batch_task
from lit_tricks.core.trick import Trick, logging_due
from lit_tricks.functional.prd import prototype_loss, prototype_scores, relation_distillation_loss
from lit_tricks.functional.sbcl import sbcl_loss
from lit_tricks.functional.tta import default_augment


class PrototypeHead(nn.Module):
    r"""Cosine classifier on class prototypes: logits :math:`\cos(f, p_c)`, ``weight`` ``[C, d]`` the prototypes
    (initialised as an ``nn.Linear`` without bias, as the authors' heads)."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(nn.Linear(in_features, num_classes, bias=False).weight.detach().clone())

    def forward(self, features: Tensor) -> Tensor:
        return F.normalize(features.flatten(1), dim=1) @ F.normalize(self.weight, dim=1).T


class PRD(Trick):
    r"""PRD ("Prototype-Sample Relation Distillation: Towards Replay-Free Continual Learning", Asadi, Davari,
    Mudur, Aljundi & Belilovsky, ICML 2023; authors' code ``naderAsadi/Probing-Continual-Learning``,
    ``methods/repe.py`` and ``losses/supcon_loss.py``).

    No sample of an old task is kept. The representation is learned by supervised contrastive learning on unit
    projections :math:`z = g(f(x)) / \lVert g(f(x)) \rVert` of two views; class prototypes :math:`p_c` live beside
    it in the feature space of :math:`f` and classify by cosine similarity. At setup the module's classifier (its
    last ``nn.Linear`` with ``num_classes`` outputs) is replaced by a :class:`PrototypeHead`, so the module's logits,
    its evaluation and :class:`~lit_tricks.ContinualEvaluation` use the prototypes, and the module's cross-entropy
    is switched off (PRD trains no softmax classifier). The loss of a step on task :math:`t` is

    .. math:: \mathcal L = \mathcal L_{\mathrm{SupCon}}(z; y) + \lambda_p\,\frac1N \sum_i
              \big(1 - \cos(\operatorname{sg}[f_i], p_{y_i})\big) + \lambda_d\,\frac1N \sum_i \sum_{t' < t}
              \mathrm{KL}\big(q^{t'}_i \,\Vert\, p^{t'}_i\big),

    :math:`\mathcal L_{\mathrm{SupCon}}` at temperature :math:`\tau` scaled by :math:`\tau/\tau_b`
    (:func:`~lit_tricks.functional.sbcl.sbcl_loss`), the prototype loss
    (:func:`~lit_tricks.functional.prd.prototype_loss`) on detached features so that only the prototypes learn
    from it, and the relation distillation (:func:`~lit_tricks.functional.prd.relation_distillation_loss`):
    :math:`q^{t'}_i` / :math:`p^{t'}_i` the softmax at temperature :math:`T` of the scores
    :math:`f_i \cdot p_c / \lVert p_c\rVert` over the classes of old task :math:`t'`, from the model frozen at the
    last task switch and from the current one. The prototypes of old tasks learn only through the distillation.
    View 1 is the batch the module trains on, view 2 ``augment(inputs)`` (one more forward pass per step, and one
    forward of the frozen model per view once a task has ended); both views enter all three terms, as in the
    authors' code. :math:`g` is the authors' projection head (Linear-ReLU-Linear), attached to the module as
    ``module.prd_projection`` so that its optimizer trains it and its checkpoint holds it.

    ``batch["task"]`` (from :class:`~lit_tricks.data.ContinualDataModule`) marks the task switches (the highest task
    so far; one host read per step): at each switch the module is copied and frozen (eval mode). A class belongs to
    the task in which it was first seen. The frozen copy's weights, the task and the classes' tasks are saved in
    checkpoints; the prototypes and the projection are in the module's own state.

    It logs ``train/prd_supcon``, ``train/prd_prototypes`` and ``train/prd_distill`` (the scaled terms) and, every
    logging step, ``tricks/PRD/old_classes`` (the classes distilled).

    Args:
        prototype_weight: :math:`\lambda_p` (authors' ``prototypes_coef``: 2.0 in their README's commands).
        distill_weight: :math:`\lambda_d` (authors' ``distill_coef``: 4.0).
        temperature: :math:`\tau`, SupCon's temperature (authors' ``supcon_temperature``: 0.1).
        base_temperature: :math:`\tau_b` (authors' ``SupConLoss`` default: 0.07).
        distill_temperature: :math:`T` (authors' ``distill_temp``: 1).
        projection_dim: output width of :math:`g` (authors: 128).
        projection_hidden_dim: hidden width of :math:`g` (authors: 512).
        in_features: width of the module's ``forward_features``; ``None``: the input width of its classifier.
        augment: ``x -> x~`` for the second view; ``None``: :func:`~lit_tricks.functional.tta.default_augment`.

    Example::

        >>> import lightning as L
        >>> from lit_tricks import Classifier
        >>> from lit_tricks.data import ContinualDataModule, DigitsDataModule
        >>> from lit_tricks.nets import MLP
        >>> prd = PRD(projection_dim=16, projection_hidden_dim=32)
        >>> trainer = L.Trainer(max_epochs=1, callbacks=[prd], logger=False, enable_checkpointing=False,
        ...                     enable_progress_bar=False, enable_model_summary=False)
        >>> stream = ContinualDataModule(DigitsDataModule(val_fraction=0.0), num_tasks=5)
        >>> trainer.fit(Classifier(MLP(64, 10, hidden=(32,)), num_classes=10), stream)
        >>> prd.task, prd.class_task.tolist()
        (4, [0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
    """

    needs_features = True

    def __init__(
        self,
        prototype_weight: float = 2.0,
        distill_weight: float = 4.0,
        temperature: float = 0.1,
        base_temperature: float = 0.07,
        distill_temperature: float = 1.0,
        projection_dim: int = 128,
        projection_hidden_dim: int = 512,
        in_features: int | None = None,
        augment: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        check_number("prototype_weight", prototype_weight, above=0.0, hint="The authors use 2.0.")
        check_number("distill_weight", distill_weight, at_least=0.0, hint="The authors use 4.0; 0 turns it off.")
        check_number("temperature", temperature, above=0.0, hint="The authors use 0.1.")
        check_number("base_temperature", base_temperature, above=0.0, hint="The authors use 0.07.")
        check_number("distill_temperature", distill_temperature, above=0.0, hint="The authors use 1.")
        check_number("projection_dim", projection_dim, at_least=1, integer=True)
        check_number("projection_hidden_dim", projection_hidden_dim, at_least=1, integer=True)
        if in_features is not None:
            check_number("in_features", in_features, at_least=1, integer=True)
        if augment is not None and not callable(augment):
            raise TypeError(f"augment must be a callable x -> x~ (or None), got {type(augment).__name__}.")
        self.prototype_weight, self.distill_weight = prototype_weight, distill_weight
        self.temperature, self.base_temperature = temperature, base_temperature
        self.distill_temperature = distill_temperature
        self.projection_dim, self.projection_hidden_dim, self.in_features = (
            projection_dim,
            projection_hidden_dim,
            in_features,
        )
        self.augment = augment or default_augment
        self.projection: nn.Module | None = None
        self.head: PrototypeHead | None = None
        self.previous: pl.LightningModule | None = None  # the module frozen at the last task switch
        self._previous_state: dict[str, Tensor] | None = None  # its weights, from a checkpoint, until training starts
        self.class_task: Tensor | None = None  # [C] the task in which each class was first seen, -1 unseen
        self.task = -1  # the highest task seen so far (-1: none yet)

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        num_classes = pl_module.num_classes
        if self.head is None:
            self.head = self._replace_classifier(pl_module, num_classes)
        if self.projection is None:
            width = self.head.weight.shape[1]
            self.projection = nn.Sequential(
                nn.Linear(width, self.projection_hidden_dim),
                nn.ReLU(inplace=True),
                nn.Linear(self.projection_hidden_dim, self.projection_dim),
            ).to(self.head.weight.device)
        pl_module.prd_projection = self.projection
        if self.class_task is None:
            self.class_task = torch.full((num_classes,), -1, dtype=torch.long)

    def _replace_classifier(self, module: pl.LightningModule, num_classes: int) -> PrototypeHead:
        classifier = classifier_layer(module, num_classes)
        if classifier is None:
            raise ValueError(
                f"PRD replaces the classifier of {type(module).__name__} (an nn.Linear with {num_classes} outputs) by "
                "class prototypes, but found none: give the module's backbone such a final nn.Linear."
            )
        name, linear = classifier
        parent_name, _, attribute = name.rpartition(".")
        parent = module.get_submodule(parent_name)
        width = self.in_features or linear.in_features
        if width != linear.in_features:
            raise ValueError(
                f"in_features={self.in_features} but the classifier {name} takes {linear.in_features} features: "
                "leave in_features=None or make them agree."
            )
        head = PrototypeHead(width, num_classes).to(linear.weight.device)
        setattr(parent, attribute, head)
        return head

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.class_task = self.class_task.to(pl_module.device)
        if self._previous_state is not None:  # resumed: rebuild the frozen copy from its saved weights
            self._freeze_copy(pl_module)
            self.previous.load_state_dict(self._previous_state)
            self._previous_state = None

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        task = batch_task(trainer, pl_module, batch, reader="PRD")  # the same on every rank
        if task > self.task:
            if self.task >= 0:
                self._freeze_copy(pl_module)
            self.task = task

    def after_loss(
        self, trainer: pl.Trainer, module: pl.LightningModule, batch: TrickBatch, out: StepOutput
    ) -> StepOutput:
        labels = batch.hard_targets
        self._record_classes(module, labels)
        inputs2 = self.augment(batch.inputs)
        _, features2 = module.forward_features(inputs2)
        features = torch.cat([out.features.flatten(1), features2.flatten(1)])
        z1, z2 = F.normalize(self.projection(features), dim=1).chunk(2)
        supcon = sbcl_loss(
            z1, z2, labels, labels, self.temperature, base_temperature=self.base_temperature, class_weight=0
        )
        prototypes = self.head.weight
        proto = prototype_loss(features.detach(), prototypes, labels.repeat(2))
        out.per_sample_loss = torch.zeros_like(out.per_sample_loss)  # no softmax classifier is trained
        out.aux_losses["prd_supcon"] = supcon.mean()
        out.aux_losses["prd_prototypes"] = self.prototype_weight * proto.mean()
        if self.previous is not None and self.distill_weight > 0:
            with torch.no_grad():
                _, old1 = self.previous.forward_features(batch.inputs)
                _, old2 = self.previous.forward_features(inputs2)
                old_features = torch.cat([old1.flatten(1), old2.flatten(1)])
                old_scores = prototype_scores(old_features, self._head_of(self.previous).weight)
            groups = torch.where(self.class_task < self.task, self.class_task, -1)
            distill = relation_distillation_loss(
                prototype_scores(features, prototypes), old_scores, groups, self.distill_temperature
            )
            out.aux_losses["prd_distill"] = self.distill_weight * distill.mean()
            if logging_due(trainer):
                module.log(self.tag("old_classes"), (groups >= 0).sum().float())
        return out

    # ------------------------------------------------------------------ helpers
    def _record_classes(self, module: pl.LightningModule, labels: Tensor) -> None:
        """Classes first seen now belong to the current task (from every rank's labels, on the device)."""
        seen = torch.zeros_like(self.class_task, dtype=torch.bool).index_fill_(0, labels, True)
        if module.trainer.world_size > 1:
            seen = module.all_gather(seen).any(dim=0)
        self.class_task = torch.where(seen & (self.class_task < 0), self.task, self.class_task)

    def _freeze_copy(self, module: pl.LightningModule) -> None:
        """``self.previous`` becomes a frozen copy of the module (its tricks, trainer and the old copy not copied)."""
        memo = {id(obj): obj for obj in (module._trainer, *getattr(module, "_tricks", [])) if obj is not None}
        self.previous = None
        trainer, module._trainer = module._trainer, None
        try:
            frozen = copy.deepcopy(module, memo)
        finally:
            module._trainer = trainer
        frozen._tricks = []
        self.previous = frozen.requires_grad_(False).eval()

    def _head_of(self, module: nn.Module) -> PrototypeHead:
        return next(m for m in module.modules() if isinstance(m, PrototypeHead))

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"task": self.task, "class_task": self.class_task}
        if self.previous is not None:
            state["previous"] = self.previous.state_dict()
        elif self._previous_state is not None:
            state["previous"] = self._previous_state
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.task = state_dict.get("task", -1)
        self.class_task = state_dict.get("class_task", self.class_task)
        self.previous, self._previous_state = None, state_dict.get("previous")
