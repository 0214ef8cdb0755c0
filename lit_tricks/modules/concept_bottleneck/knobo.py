"""KnoBo, knowledge-enhanced bottlenecks (Yang et al. 2024), on precomputed image features."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_tricks.core.checks import check_number
from lit_tricks.functional.knobo import knobo_ground_concepts, knobo_prior_loss
from lit_tricks.functional.vl_embeddings import check_embedding_pair
from lit_tricks.modules.concept_bottleneck.base import LinearHeadOnConcepts


class KnoBo(LinearHeadOnConcepts):
    r"""KnoBo ("A Textbook Remedy for Domain Shifts: Knowledge Priors for Medical Image Analysis", Yang et al.,
    NeurIPS 2024) on precomputed image features :math:`x` (batches ``{"inputs": x, "targets": y}``), L2-normalised
    first as the code does (``normalize=True``).

    A bottleneck of :math:`K` concepts, statements from a knowledge corpus, scores each image: by grounding
    functions :math:`s_k(x) = \sigma(w_k \cdot x + b_k)` trained from concept labels (the paper's KnoBo, the code's
    ``binary`` mode; :meth:`from_concept_labels`), or, with no concept labels, by the statements' text embeddings
    :math:`s_k(x) = x \cdot t_k / \lVert t_k \rVert` (the code's ``dot_product`` mode). A linear head
    :math:`W s + c` (with bias) is trained with Adam on

    .. math:: L = \mathrm{CE}(W s(x) + c, y) + \lambda\, \frac{1}{CK} \sum_{y,k} \big|\tanh(W_{yk}) - P_{yk}\big|,

    :math:`P` ``[C, K]`` the knowledge prior (+1 the class shows the concept, -1 it does not, 0 unknown;
    :func:`~lit_tricks.functional.knobo.knobo_prior_matrix`), :math:`\lambda` = ``prior_weight``. The corpus
    retrieval and the language model that writes the statements, annotates reports and answers the prior are not
    part of this module: pass their results.

    Example::

        >>> model = KnoBo(torch.tensor([[1.0, 1.0], [-1.0, 1.0]]), concept_embeddings=torch.eye(2))
        >>> model.concepts(torch.tensor([[3.0, 4.0]])).tolist()
        [[0.6000000238418579, 0.800000011920929]]

    Args:
        prior: :math:`P` ``[C, K]``.
        concept_weights, concept_bias: the grounding functions' :math:`w_k` ``[K, D]`` and :math:`b_k` ``[K]``.
        concept_embeddings: ``[K, D]`` the statements' text embeddings (instead of grounding functions).
        prior_weight: :math:`\lambda` (the code: 1.0).
        lr: Adam's learning rate (the code: 1e-3, batch 64, 200 epochs, the best validation epoch kept).
        normalize: L2-normalise the image features (the code's default).
    """

    penalty_name = "prior"

    def __init__(
        self,
        prior: Tensor,
        concept_weights: Tensor | None = None,
        concept_bias: Tensor | None = None,
        concept_embeddings: Tensor | None = None,
        prior_weight: float = 1.0,
        lr: float = 1e-3,
        normalize: bool = True,
    ) -> None:
        super().__init__()
        check_number("prior_weight", prior_weight, at_least=0.0)
        check_number("lr", lr, above=0.0)
        if prior.ndim != 2 or not prior.numel():
            raise ValueError(f"prior must be [C, K] with C, K >= 1, got shape {tuple(prior.shape)}.")
        if bool((prior.abs() > 1).any()):
            raise ValueError("prior entries must lie in [-1, 1] (+1 yes, -1 no, 0 unknown), as tanh(W) does.")
        if (concept_weights is None) == (concept_embeddings is None):
            raise ValueError(
                "pass exactly one of concept_weights (grounding functions, e.g. from KnoBo.from_concept_labels) "
                "and concept_embeddings (the statements' text embeddings)."
            )
        n_classes, k = prior.shape
        bank = concept_weights if concept_weights is not None else concept_embeddings
        check_embedding_pair(
            bank, bank, text_name="concept_weights" if concept_embeddings is None else "concept_embeddings",
            what="concepts", fix="pass one row per concept statement",
        )  # fmt: skip
        if len(bank) != k:
            raise ValueError(f"the prior has K = {k} concepts (columns) but the bottleneck has {len(bank)}.")
        if concept_embeddings is not None:
            bank, bias = F.normalize(concept_embeddings.float(), dim=1), torch.zeros(k)
        else:
            bias = torch.zeros(k) if concept_bias is None else concept_bias
            if bias.shape != (k,):
                raise ValueError(f"concept_bias must be [K] = [{k}], got {tuple(bias.shape)}.")
        self.grounded = concept_embeddings is None
        self.register_buffer("prior", prior.detach().float().clone())
        self.register_buffer("concept_weights", bank.detach().float().clone())
        self.register_buffer("concept_bias", bias.detach().float().clone())
        self.head = nn.Linear(k, n_classes)
        self.prior_weight, self.lr, self.normalize = prior_weight, lr, normalize

    @classmethod
    def from_concept_labels(
        cls, features: Tensor, concept_labels: Tensor, prior: Tensor, normalize: bool = True, **kwargs: Any
    ) -> KnoBo:
        """Ground each concept with a logistic regression on ``features`` ``[N, D]`` and ``concept_labels``
        ``[N, K]`` (1 present, 0 absent, -1 unknown), e.g. a large unlabelled-for-the-task corpus such as the
        reports' images (:func:`~lit_tricks.functional.knobo.knobo_ground_concepts`), then build the model."""
        x = F.normalize(features.float(), dim=1) if normalize else features
        weights, bias = knobo_ground_concepts(x, concept_labels)
        return cls(prior, concept_weights=weights, concept_bias=bias, normalize=normalize, **kwargs)

    def concepts(self, features: Tensor) -> Tensor:
        """Concept scores :math:`s(x)` ``[N, K]``."""
        if features.ndim != 2 or features.shape[1] != self.concept_weights.shape[1]:
            raise ValueError(
                f"image features {tuple(features.shape)} do not match the concepts' size "
                f"{self.concept_weights.shape[1]}: use the image encoder the concepts were grounded on."
            )
        x = F.normalize(features, dim=1) if self.normalize else features
        scores = x @ self.concept_weights.T + self.concept_bias
        return torch.sigmoid(scores) if self.grounded else scores

    def forward(self, features: Tensor) -> Tensor:
        return self.head(self.concepts(features))

    def penalty(self) -> Tensor:
        return self.prior_weight * knobo_prior_loss(self.head.weight, self.prior)
