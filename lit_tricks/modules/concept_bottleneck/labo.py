"""LaBo, language-model concept bottlenecks (Yang et al. 2023), on precomputed image embeddings."""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_tricks.core.checks import check_number
from lit_tricks.core.rng import RestoresRNG
from lit_tricks.functional.labo import labo_init_weights, labo_select
from lit_tricks.modules.concept_bottleneck.base import log_embedding_accuracy

Activation = Literal["softmax", "relu", "tanh", "none"]


class LaBo(RestoresRNG, pl.LightningModule):
    r"""LaBo ("Language in a Bottle: Language Model Guided Concept Bottlenecks for Interpretable Image
    Classification", Yang et al., CVPR 2023) on precomputed image embeddings :math:`x` (batches
    ``{"inputs": x, "targets": y}``) in the space of the concepts' text embeddings :math:`T` ``[K, D]``.

    The bottleneck scores the image against every concept, :math:`x T^\top`, and the class-concept matrix
    :math:`A` ``[C, K]`` weighs them (the authors' ``AssoConcept``):

    .. math:: \mathrm{logits}(x) = s\; x\, \big(\sigma(A)\, T\big)^\top,
              \qquad L = \mathrm{CE} - \lambda_{div} \tfrac1C \sum_y \mathrm{Var}_{batch}(\mathrm{sim}_y)
              + \lambda_{1} \max_y \lVert A_y \rVert_1,

    :math:`\sigma` = ``activation`` (softmax over concepts by default), :math:`s` = ``logit_scale`` = 100
    ("as CLIP"), :math:`\mathrm{sim} = \mathrm{logits} / s`. :math:`A` starts from the language prior
    (:func:`~lit_tricks.functional.labo.labo_init_weights`: 1 where the concept was written for the class) and is
    the only trained parameter (Adam). :meth:`from_candidates` first picks ``k`` concepts per class with LaBo's
    submodular selection (:func:`~lit_tricks.functional.labo.labo_select`).

    Example::

        >>> import torch
        >>> model = LaBo(torch.eye(3), torch.tensor([0, 1, 1]), n_classes=2, activation="none")
        >>> model(torch.tensor([[0.0, 1.0, 0.0]])).tolist()
        [[0.0, 100.0]]

    Args:
        concept_embeddings: ``[K, D]`` text embeddings of the selected concepts.
        concept_classes: ``[K]`` the class each concept was written for.
        n_classes: number of classes.
        init_weights: ``[C, K]`` start of :math:`A` (``None``: the language prior).
        activation: :math:`\sigma`: ``"softmax"`` (the code's default), ``"relu"``, ``"tanh"`` or ``"none"``.
        logit_scale: :math:`s`.
        lr: Adam's learning rate (the authors: 5e-6 to 5e-5 over thousands of epochs).
        div_weight: :math:`\lambda_{div}` (the code: off; 0.005 when switched on).
        l1_weight: :math:`\lambda_1` on the raw :math:`A` (the code: off; 0.01 when switched on).
    """

    def __init__(
        self,
        concept_embeddings: Tensor,
        concept_classes: Tensor,
        n_classes: int,
        init_weights: Tensor | None = None,
        activation: Activation = "softmax",
        logit_scale: float = 100.0,
        lr: float = 5e-5,
        div_weight: float = 0.0,
        l1_weight: float = 0.0,
    ) -> None:
        super().__init__()
        if concept_embeddings.ndim != 2 or not len(concept_embeddings):
            raise ValueError(
                f"concept_embeddings must be [K, D] with K >= 1 concepts, got {tuple(concept_embeddings.shape)}."
            )
        if activation not in ("softmax", "relu", "tanh", "none"):
            raise ValueError(f"activation must be 'softmax', 'relu', 'tanh' or 'none', got {activation!r}.")
        if n_classes < 1:
            raise ValueError(f"n_classes must be >= 1, got {n_classes}.")
        check_number("logit_scale", logit_scale, above=0.0)
        check_number("lr", lr, above=0.0)
        check_number("div_weight", div_weight, at_least=0.0)
        check_number("l1_weight", l1_weight, at_least=0.0)
        k = len(concept_embeddings)
        if concept_classes.shape != (k,):
            raise ValueError(f"concept_classes must be [K] = [{k}], got shape {tuple(concept_classes.shape)}.")
        if init_weights is None:
            init_weights = labo_init_weights(concept_classes, n_classes)
        elif init_weights.shape != (n_classes, k):
            raise ValueError(
                f"init_weights must be [n_classes, K] = [{n_classes}, {k}], got {tuple(init_weights.shape)}."
            )
        self.register_buffer("concepts", concept_embeddings.detach().float().clone())
        self.register_buffer("concept_classes", concept_classes.detach().long().clone())
        self.weights = nn.Parameter(init_weights.detach().float().clone())
        self.activation, self.logit_scale, self.lr = activation, logit_scale, lr
        self.div_weight, self.l1_weight = div_weight, l1_weight

    @classmethod
    def from_candidates(
        cls,
        image_embeddings: Tensor,
        labels: Tensor,
        candidate_embeddings: Tensor,
        candidate_classes: Tensor,
        n_classes: int,
        k: int,
        discriminability_weight: float = 1e7,
        coverage_weight: float = 1.0,
        coverage: Literal["cosine", "released"] = "cosine",
        strict: bool = True,
        **kwargs: Any,
    ) -> LaBo:
        """Select ``k`` concepts per class from the candidates with LaBo's submodular selection on the training
        images ``(image_embeddings, labels)``, then build the model on them (``kwargs`` go to ``__init__``); the
        chosen candidate indices are in ``model.selected``."""
        selected = labo_select(
            image_embeddings,
            labels,
            candidate_embeddings,
            candidate_classes,
            n_classes,
            k,
            discriminability_weight=discriminability_weight,
            coverage_weight=coverage_weight,
            coverage=coverage,
            strict=strict,
        )
        model = cls(candidate_embeddings[selected], candidate_classes[selected], n_classes, **kwargs)
        model.selected = selected
        return model

    def class_concept_weights(self) -> Tensor:
        r""":math:`\sigma(A)` ``[C, K]``."""
        if self.activation == "softmax":
            return F.softmax(self.weights, dim=-1)
        if self.activation == "relu":
            return F.relu(self.weights)
        if self.activation == "tanh":
            return torch.tanh(self.weights)
        return self.weights

    def similarity(self, embeddings: Tensor) -> Tensor:
        r""":math:`x (\sigma(A) T)^\top` ``[N, C]``, before the logit scale."""
        if embeddings.ndim != 2 or embeddings.shape[1] != self.concepts.shape[1]:
            raise ValueError(
                f"image embeddings {tuple(embeddings.shape)} do not match the concept embeddings "
                f"{tuple(self.concepts.shape)}: the image encoder must output [N, D] in the text embeddings' space."
            )
        return embeddings @ (self.class_concept_weights() @ self.concepts).T

    def forward(self, embeddings: Tensor) -> Tensor:
        return self.logit_scale * self.similarity(embeddings)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        e, y = batch["inputs"], batch["targets"]
        sim = self.similarity(e)
        loss = F.cross_entropy(self.logit_scale * sim, y)
        if self.div_weight > 0:
            loss = loss - self.div_weight * sim.var(dim=0).mean()
        if self.l1_weight > 0:
            loss = loss + self.l1_weight * self.weights.abs().sum(dim=1).max()
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam([self.weights], lr=self.lr)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        log_embedding_accuracy(self, batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        log_embedding_accuracy(self, batch, "test")
