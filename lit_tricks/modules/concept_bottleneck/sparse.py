"""Sparse-CBM: sparse concept bottleneck models."""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_tricks.core.checks import check_number
from lit_tricks.core.rng import RestoresRNG
from lit_tricks.functional import concepts as cf


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
