"""Concept embedding models (Espinosa Zarlenga et al. 2022)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn

from lit_tricks.functional import concepts as cf
from lit_tricks.modules.concept_bottleneck.base import ConceptModule


class ConceptEmbeddingModel(ConceptModule):
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
