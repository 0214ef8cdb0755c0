"""AdaNPC: a non-parametric k-nearest-neighbour classifier over a memory of source and test features."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_tricks.core.checks import check_number
from lit_tricks.functional.tta import knn_probabilities
from lit_tricks.modules.tta.base import TTAModule


class AdaNPC(TTAModule):
    r"""AdaNPC (Zhang et al., "AdaNPC: Exploring Non-Parametric Classifier for Test-Time Adaptation", ICML 2023):
    a k-nearest-neighbour classifier over a memory of L2-normalised source features; confident test samples
    join the memory with their predicted labels. With cosine similarities :math:`s_j` of the ``k`` nearest
    entries, :math:`p_c = \sum_j \mathrm{softmax}(s/T)_j \mathbb 1[y_j = c]`; a sample joins when
    :math:`\max_c p_c \ge \beta`. (The authors' code thresholds ``softmax(p)``, which compresses confidences;
    we threshold :math:`p` itself.) No gradients.

    Args:
        model: the source model; ``features`` maps inputs to the penultimate features.
        features: ``inputs -> [N, D]`` (default: ``model.forward_features`` if the model has it).
        source_features, source_labels: the memory's source part.
        k, temperature, beta: the authors' defaults 100, 0.1, 0.1.
        domain_names, source_checkpoint: as :class:`TTAModule`.
    """

    needs_grad = False

    def __init__(
        self, model: nn.Module, source_features: Tensor, source_labels: Tensor, features: nn.Module | None = None,
        k: int = 100, temperature: float = 0.1, beta: float = 0.1, domain_names: Sequence[str] | None = None,
        source_checkpoint: str | None = None,
    ) -> None:  # fmt: skip
        if features is None and not hasattr(model, "forward_features"):
            raise ValueError("AdaNPC needs features=... (inputs -> penultimate features) or a model.forward_features.")
        check_number("k", k, at_least=1, integer=True)
        check_number("temperature", temperature, above=0.0)
        if source_features.ndim != 2 or len(source_features) != len(source_labels) or not len(source_labels):
            raise ValueError(
                "source_features must be [N, D] with one label each in source_labels [N], got "
                f"{tuple(source_features.shape)} and {tuple(source_labels.shape)}."
            )
        self._source = source_features, source_labels  # registered in build_models, before the state is snapshot
        super().__init__(model, lr=1.0, steps=0, domain_names=domain_names, source_checkpoint=source_checkpoint)
        self._features = features
        self.k, self.temperature, self.beta = k, temperature, beta
        self.num_classes = int(source_labels.max()) + 1

    def build_models(self) -> None:
        features, labels = self._source
        del self._source  # the buffers below are the memory's only copy
        self.register_buffer("memory", F.normalize(features.float(), dim=1))
        self.register_buffer("memory_labels", labels.long())

    def configure_model(self) -> None:
        self.model.eval().requires_grad_(False)  # a frozen source model with its own statistics

    def features(self, x: Tensor) -> Tensor:
        return self._features(x) if self._features is not None else self.model.forward_features(x)

    def _vote(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = self.features(x)
        probs = knn_probabilities(features, self.memory, self.memory_labels, self.num_classes, self.k, self.temperature)
        return features, probs

    def forward(self, x: Tensor) -> Tensor:
        """Log of the kNN vote over the current memory (nothing joins it)."""
        return self._vote(x)[1].clamp(min=1e-8).log()

    def forward_and_adapt(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            features, probs = self._vote(x)
            confidence, label = probs.max(dim=1)
            keep = confidence >= self.beta
            self.memory = torch.cat([self.memory, F.normalize(features[keep], dim=1)])
            self.memory_labels = torch.cat([self.memory_labels, label[keep]])
        return probs.clamp(min=1e-8).log()

    def reset(self) -> None:
        source = len(self._source_state["memory"])
        self.memory, self.memory_labels = self.memory[:source].clone(), self.memory_labels[:source].clone()
        self.load_state_dict(self._source_state)
