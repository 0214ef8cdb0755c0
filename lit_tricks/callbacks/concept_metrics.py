"""Concept global importance, existence and location of a concept model, measured at validation and test."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor

from lit_tricks.core.checks import check_number
from lit_tricks.core.trick import log_tag
from lit_tricks.functional import concept_metrics as cmf
from lit_tricks.metrics.concepts import VARIANTS, ConceptExistence, ConceptGlobalImportance, ConceptLocation
from lit_tricks.modules.concept_bottleneck.base import ConceptModule, unpack_concept_batch
from lit_tricks.modules.concept_bottleneck.post_hoc import PostHocCBM


@dataclass
class ConceptView:
    """What the concept metrics read from one batch of a concept model.

    Attributes:
        activations: concept activations :math:`\\hat u` ``[N, L]`` (probabilities, or PCBM's projections).
        concepts: the true concepts ``[N, L]``.
        targets: class ids ``[N]``.
        logits: task logits ``[N, K]``.
        head: ``activations -> logits``, differentiable (``None``: the model has none, e.g. ECBM's minimisation).
        maps: ``(H, W) -> [N, L, H, W]`` concept attribution maps at the image size (``None``: not available).
    """

    activations: Tensor
    concepts: Tensor
    targets: Tensor
    logits: Tensor
    head: Callable[[Tensor], Tensor] | None = None
    maps: Callable[[tuple[int, int]], Tensor] | None = None


def concept_view(module: pl.LightningModule, batch: Any) -> ConceptView:
    """The :class:`ConceptView` of ``batch``: from ``module.concept_view(batch)`` if the module defines it, else
    for a :class:`~lit_tricks.modules.concept_bottleneck.base.ConceptModule` (CBM, CEM: probabilities, the head
    through the intervention path, input-gradient maps of the concept logits for image inputs) or a
    :class:`~lit_tricks.PostHocCBM` (projections, the sparse head, CoAM maps when the batch has
    ``"feature_maps"``, the backbone's pre-pooling features ``[N, d, h, w]``)."""
    check_concept_model(module)
    if callable(getattr(module, "concept_view", None)):
        return module.concept_view(batch)
    if isinstance(module, PostHocCBM):
        return _post_hoc_view(module, batch)
    return _concept_module_view(module, batch)


def check_concept_model(module: object) -> None:
    """Raise a ``TypeError`` unless :func:`concept_view` can read ``module``."""
    if not isinstance(module, (ConceptModule, PostHocCBM)) and not callable(getattr(module, "concept_view", None)):
        raise TypeError(
            f"ConceptMetrics reads concept models (ConceptModule: CBM, CEM; PostHocCBM), got {type(module).__name__}: "
            "give it a method concept_view(batch) -> lit_tricks.callbacks.concept_metrics.ConceptView."
        )


def _concept_module_view(module: ConceptModule, batch: Any) -> ConceptView:
    x, c, y = unpack_concept_batch(batch)
    c_logits, state = module.concept_logits(x)
    logits = module.task_logits(c_logits, state)
    head = None
    if module.interventions_ready():  # the head reads the activations where an intervention puts true concepts
        everywhere = torch.ones_like(c_logits, dtype=torch.bool)

        def head(u: Tensor) -> Tensor:
            return module.task_logits(c_logits, state, everywhere, u)

    maps = None
    if x.ndim == 4:

        def maps(size: tuple[int, int]) -> Tensor:
            return cmf.input_gradient_maps(lambda inputs: module.concept_logits(inputs)[0], x)

    return ConceptView(c_logits.sigmoid(), c, y, logits, head, maps)


def _post_hoc_view(module: PostHocCBM, batch: Mapping[str, Tensor]) -> ConceptView:
    if not isinstance(batch, Mapping) or "concepts" not in batch:
        raise ValueError("ConceptMetrics on a PostHocCBM needs batches {'inputs', 'targets', 'concepts'}.")
    e = batch["inputs"]
    residual = None if module.residual is None else module.residual(e)

    def head(u: Tensor) -> Tensor:
        out = module.head(u)
        return out if residual is None else out + residual

    u = module.project(e)
    maps = None
    if "feature_maps" in batch:

        def maps(size: tuple[int, int]) -> Tensor:
            return cmf.concept_activation_maps(batch["feature_maps"], module.bank, size)

    return ConceptView(u, batch["concepts"].float(), batch["targets"], head(u), head, maps)


def _points(batch: Any, concepts: Tensor) -> Tensor | None:
    """Ground-truth points ``[N, L, 2]`` from ``batch["masks"]``: ``[N, H, W]`` (one region for every present
    concept, as in the shapes) or ``[N, L, H, W]``; -1 for absent concepts."""
    masks = batch.get("masks") if isinstance(batch, Mapping) else None
    if masks is None:
        return None
    if masks.ndim == 3:
        masks = masks.unsqueeze(1).expand(-1, concepts.shape[1], -1, -1)
    if masks.ndim != 4 or masks.shape[:2] != concepts.shape:
        raise ValueError(f"batch['masks'] must be [N, H, W] or [N, L, H, W], got {tuple(masks.shape)}.")
    points = cmf.mask_centroids(masks)
    return points.masked_fill((concepts <= 0.5).unsqueeze(-1), -1)


class ConceptMetrics(Callback):
    r"""The three metrics of "Concept-Based Explainable Artificial Intelligence: Metrics and Benchmarks" (Aysel, Cai
    & Prugel-Bennett, 2025) on every validation and test epoch of a concept model (CBM, CEM, PCBM; any module
    with a ``concept_view(batch)``, see :func:`concept_view`):

    - **global importance** (CGIM, :class:`~lit_tricks.metrics.concepts.ConceptGlobalImportance`): per concept,
      the cosine over classes between its importance :math:`\Theta(j, :)` and its presence :math:`V(j, :)`, with
      :math:`\Theta` the head's weights :math:`\theta` (``cgim_weights``), the mean activations of correctly
      classified samples :math:`\hat U^*` (``cgim_mean_prediction``) or :math:`\theta \odot \hat U^*`
      (``cgim_weighted``); logged as the mean over concepts (per concept to TensorBoard);
    - **existence** (CEM, ``existence``): the fraction of each sample's ``top_l`` concepts by local importance
      :math:`\theta_{jk}\hat u_{ij}` (:math:`k` the predicted class) that are present;
    - **location** (CLM, ``location``): for its ``top_l`` most important *present* concepts, whether the
      concept's ground-truth point (the centroid of ``batch["masks"]``) lies in the :math:`\alpha/12` most activated
      pixels of its attribution map: input-gradient saliency of the concept logit (CBM, CEM) or CoAM,
      :math:`\frac1d\sum_k c_{jk} E(:, :, k)` on ``batch["feature_maps"]`` (PCBM).

    For a head that is not linear in the concepts, :math:`\theta_{jk}` is the derivative
    :math:`\partial z_k/\partial \hat u_j` (per sample for the local importance, averaged for CGIM); for a linear
    head it is the weight. Cost per evaluated batch: one forward of the concept model, one backward per class,
    and, for location, one backward per concept. Logged as ``tricks/ConceptMetrics/<stage>/<metric>``
    (``stage`` ``val`` or ``test``); sanity-check batches are skipped. No state outlives an epoch.

    Args:
        top_l: concepts per sample for existence and location (the paper: 1, 3, 5).
        alpha: location region, in twelfths of the image (the paper varies it).
        correct_only: existence and location on correctly classified samples only (the paper reports both).
        use_head: differentiate the task head for :math:`\theta` (off for models without a differentiable head,
            e.g. ECBM's energy minimisation: then the local importance is :math:`\hat u` itself and only
            ``cgim_mean_prediction`` is logged).
        location: measure location when batches carry ``"masks"`` and the model has maps.

    Example::

        >>> import lightning as L
        >>> from torch import nn
        >>> from lit_tricks import ConceptBottleneckModel
        >>> from lit_tricks.callbacks.concept_metrics import ConceptMetrics
        >>> from lit_tricks.data import ShapesDataModule
        >>> encoder = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 32), nn.ReLU(), nn.Linear(32, 12))
        >>> model = ConceptBottleneckModel(encoder, nn.Linear(12, 9), n_concepts=12)
        >>> trainer = L.Trainer(max_epochs=1, callbacks=[ConceptMetrics()], logger=False, enable_checkpointing=False,
        ...                     enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(model, ShapesDataModule(num_samples=300, batch_size=50, with_masks=True))
        >>> 0 <= float(trainer.callback_metrics["tricks/ConceptMetrics/val/location"]) <= 1
        True
    """

    def __init__(
        self,
        top_l: int = 1,
        alpha: float = 1.0,
        correct_only: bool = False,
        use_head: bool = True,
        location: bool = True,
    ) -> None:
        check_number("top_l", top_l, at_least=1, integer=True, hint="(the number of top concepts per sample)")
        check_number("alpha", alpha, above=0.0, at_most=12.0, hint="(the region is alpha/12 of the image)")
        for name, value in (("correct_only", correct_only), ("use_head", use_head), ("location", location)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be True or False, got {value!r}.")
        self.top_l, self.alpha, self.correct_only = top_l, alpha, correct_only
        self.use_head, self.location = use_head, location
        self.metrics: dict[str, Any] = {}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_concept_model(pl_module)

    def _build(self, n_concepts: int, n_classes: int, device: torch.device) -> None:
        variants = VARIANTS if self.use_head else ("mean_prediction",)
        metrics: dict[str, Any] = {
            f"cgim_{v}": ConceptGlobalImportance(n_concepts, n_classes, v, average="none") for v in variants
        }
        metrics["existence"] = ConceptExistence(self.top_l, self.correct_only)
        if self.location:
            metrics["location"] = ConceptLocation(self.top_l, self.alpha, self.correct_only)
        self.metrics = {name: metric.to(device) for name, metric in metrics.items()}

    def _reset(self) -> None:
        for metric in self.metrics.values():
            metric.reset()

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reset()

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reset()

    def _update(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, dataloader_idx: int) -> None:
        if trainer.sanity_checking or dataloader_idx != 0:
            return
        # the evaluation loop runs in inference mode: the gradients are taken on a clone of the batch out of it,
        # the metrics (whose states a reset made there) are updated back in it
        with torch.inference_mode(False), torch.no_grad():
            batch = _clone(batch)
            view = concept_view(pl_module, batch)
            jacobian, importance, maps, points = self._read(view, batch)
        u, c, y, logits = view.activations, view.concepts, view.targets, view.logits
        if not self.metrics:
            self._build(u.shape[1], logits.shape[1], pl_module.device)
        for name, metric in self.metrics.items():
            if name.startswith("cgim_"):
                metric.update(u, c, logits, y, jacobian)
        self.metrics["existence"].update(importance, c, logits, y)
        if maps is not None:
            self.metrics["location"].update(importance, maps, points, logits, y)

    def _read(self, view: ConceptView, batch: Any) -> tuple[Tensor | None, Tensor, Tensor | None, Tensor | None]:
        """``(jacobian, local importance, maps, points)`` of a batch (``None``: not measured)."""
        jacobian = None
        if self.use_head:
            if view.head is None:
                raise ValueError(
                    "ConceptMetrics(use_head=True) needs a differentiable task head (a logit bottleneck needs its "
                    "intervention percentiles first); use use_head=False for models without one."
                )
            jacobian = cmf.concept_jacobian(view.head, view.activations)
        u = view.activations
        importance = u if jacobian is None else cmf.local_importance(jacobian, u, view.logits.argmax(dim=-1))
        points = _points(batch, view.concepts) if self.location else None
        if points is None or view.maps is None:
            return jacobian, importance, None, None
        return jacobian, importance, view.maps(tuple(batch["masks"].shape[-2:])), points

    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        self._update(trainer, pl_module, batch, dataloader_idx)

    def on_test_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        self._update(trainer, pl_module, batch, dataloader_idx)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log(trainer, pl_module, "test")

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.sanity_checking or not self.metrics:
            return
        # every rank computes the same values (the states are summed over ranks); every rank sees the same batch
        # layout, so location is measured on all ranks or on none
        values = {name: metric.compute() for name, metric in self.metrics.items() if metric.update_called}
        tensorboard = isinstance(trainer.logger, TensorBoardLogger) and trainer.is_global_zero
        names = getattr(trainer.datamodule, "concept_names", None)
        for name, value in values.items():
            if value.ndim == 1:  # CGIM per concept
                if tensorboard:
                    for j, rho in enumerate(value.tolist()):
                        label = names[j] if names is not None and len(names) == len(value) else str(j)
                        trainer.logger.experiment.add_scalar(
                            log_tag(self, f"{stage}/{name}/{label}"), rho, trainer.global_step
                        )
                value = value.nanmean()
            pl_module.log(log_tag(self, f"{stage}/{name}"), value.float(), sync_dist=False)


def _clone(batch: Any) -> Any:
    if isinstance(batch, Tensor):
        return batch.clone()
    if isinstance(batch, Mapping):
        return {key: _clone(value) for key, value in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_clone(value) for value in batch)
    return batch
