"""Nested dropout on the penultimate features (Chen, Hu, Shen, Ai and Suykens, "Compressing Features for Learning
with Noisy Labels", TNNLS 2022; after Rippel, Gelbart and Adams, "Learning Ordered Representations with Nested
Dropout", ICML 2014)."""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lit_tricks.core.checks import check_number, named_submodule

Distribution = Literal["gaussian", "geometric"]


def nested_dropout_probs(
    units: int, distribution: Distribution = "gaussian", std: float = 10.0, p: float = 0.1
) -> Tensor:
    """The distribution of the number of kept units ``k = 1..units``, as a float64 vector ``[units]`` summing to 1.

    ``"gaussian"`` (the authors' code): ``P(k) ∝ exp(-(k / std)^2)``, a half-Gaussian on ``k >= 1`` (their
    ``--nested`` is ``std``; note there is no factor 1/2 in the exponent). ``"geometric"`` (Rippel et al.):
    ``P(k) ∝ p (1 - p)^(k - 1)``, truncated at ``units``. Computed as a softmax of the log-weights, so a small
    ``std`` does not underflow to an all-zero vector.

    Example::

        >>> nested_dropout_probs(3, "geometric", p=0.5)
        tensor([0.5714, 0.2857, 0.1429], dtype=torch.float64)
    """
    check_number("units", units, at_least=1, integer=True)
    k = torch.arange(1, units + 1, dtype=torch.float64)
    if distribution == "gaussian":
        check_number("std", std, above=0.0)
        log_weights = -((k / std) ** 2)
    elif distribution == "geometric":
        check_number("p", p, above=0.0, below=1.0)
        log_weights = (k - 1) * math.log1p(-p)
    else:
        raise ValueError(f"distribution must be 'gaussian' (the authors' code) or 'geometric', got {distribution!r}.")
    return torch.softmax(log_weights, dim=0)


class NestedDropout(nn.Module):
    """Keep the first ``k`` feature units and zero the rest, with ``k`` random in training.

    For features ``h [N, D, *]`` (units along dim 1, as the authors' pooled ResNet/VGG features ``[N, D]``),
    ``k ~ P(k)`` on ``1..D`` (see :func:`nested_dropout_probs`) and

        y_{n, j} = h_{n, j} * 1[j < k]      (units j = 0..D-1; kept units are not rescaled)

    One ``k`` for the whole batch (``per_sample=False``, the authors' code: one draw per step) or one per sample
    (``per_sample=True``, Rippel et al.). The head after this layer thus learns to classify from every prefix of
    the features, which orders them by importance and compresses what the head can rely on.

    In eval mode it is the identity, or, with ``eval_units=K``, keeps the first ``K`` units (the authors'
    test-time use: ``K`` chosen on clean validation data, e.g. with :func:`truncation_accuracy`). Units the
    training distribution almost never keeps are barely trained, so with a small ``std`` evaluate truncated.

    The draws come from the global torch generator (on the CPU, then moved), or from a private one when ``seed``
    is given; its state is part of this layer's ``state_dict`` (``_extra_state``), so a checkpoint resumes the
    same draws, and under DDP every rank with the same seed keeps the same ``k``.

    Args:
        std: width of the half-Gaussian ``P(k) ∝ exp(-(k / std)^2)`` (the authors: 10 for CIFAR-10,
            100 for CIFAR-100, Clothing1M and ANIMAL-10N).
        distribution: ``"gaussian"`` (the authors') or ``"geometric"`` (Rippel et al.).
        p: parameter of the geometric distribution (used only with ``distribution="geometric"``).
        per_sample: draw ``k`` per sample instead of once per batch.
        eval_units: units kept in eval mode (``None``: all).
        seed: seed of a private generator (``None``: the global one).

    Example::

        >>> layer = NestedDropout(std=2.0, seed=0)
        >>> out = layer(torch.ones(2, 6))
        >>> bool((out[0] == out[1]).all()), int(out[0].sum()) in range(1, 7)  # one k for the batch
        (True, True)
        >>> layer.eval()(torch.ones(1, 6))
        tensor([[1., 1., 1., 1., 1., 1.]])
    """

    def __init__(
        self,
        std: float = 10.0,
        distribution: Distribution = "gaussian",
        p: float = 0.1,
        per_sample: bool = False,
        eval_units: int | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        nested_dropout_probs(1, distribution, std, p)  # validates distribution, std, p
        if not isinstance(per_sample, bool):
            raise TypeError(f"per_sample must be a bool, got {per_sample!r}.")
        if eval_units is not None:
            check_number("eval_units", eval_units, at_least=1, integer=True, hint="Use None to keep every unit.")
        if seed is not None:
            check_number("seed", seed, integer=True, hint="Use None for the global generator.")
        self.std, self.distribution, self.p = std, distribution, p
        self.per_sample, self.eval_units, self.seed = per_sample, eval_units, seed
        self._generator = None if seed is None else torch.Generator().manual_seed(seed)
        self._probs: Tensor | None = None
        self.last_units: Tensor | None = None  # the k of the last training forward, [1] or [N]

    def extra_repr(self) -> str:
        shape = f"std={self.std}" if self.distribution == "gaussian" else f"p={self.p}"
        return (
            f"{self.distribution}, {shape}, per_sample={self.per_sample}, eval_units={self.eval_units}, "
            f"seed={self.seed}"
        )

    def get_extra_state(self) -> dict[str, Any]:
        return {} if self._generator is None else {"generator": self._generator.get_state()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if self._generator is not None and "generator" in state:
            self._generator.set_state(state["generator"])

    def _kept_units(self, units: int, draws: int) -> Tensor:
        if self._probs is None or self._probs.numel() != units:
            self._probs = nested_dropout_probs(units, self.distribution, self.std, self.p)
        return torch.multinomial(self._probs, draws, replacement=True, generator=self._generator) + 1

    def forward(self, features: Tensor) -> Tensor:
        if features.dim() < 2:
            raise ValueError(
                f"NestedDropout expects features [N, D, *] with units along dim 1, got {features.dim()} dims."
            )
        units = features.shape[1]
        if not self.training:
            if self.eval_units is None:
                return features
            if self.eval_units > units:
                raise ValueError(f"eval_units={self.eval_units} is more than the {units} feature units: lower it.")
            kept = torch.tensor([self.eval_units])
        else:
            kept = self._kept_units(units, features.shape[0] if self.per_sample else 1)
            self.last_units = kept
        kept = kept.to(features.device, non_blocking=True)
        mask = torch.arange(units, device=features.device) < kept[:, None]  # [N or 1, D]
        mask = mask.view(*mask.shape, *([1] * (features.dim() - 2)))
        return features * mask.to(features.dtype)


def truncation_accuracy(features: Tensor, head: nn.Linear, targets: Tensor) -> Tensor:
    """Accuracy of a linear ``head`` on every prefix of the features: entry ``k - 1`` of the ``[D]`` result is the
    accuracy with units ``k..D-1`` zeroed, for features ``[N, D]`` and class ids ``[N]``. The authors pick the
    ``k`` of the best clean-validation accuracy (``int(acc.argmax()) + 1``: ties go to the fewest units) and test
    with it (``NestedDropout(eval_units=k)``). All prefixes in one pass: the logits of prefix ``k`` are
    ``b + sum_{j<k} h_j W[:, j]``, a cumulative sum over ``[N, D, C]`` (mind the memory for large ``N D C``).

    Example::

        >>> head = nn.Linear(2, 2, bias=False)
        >>> _ = head.weight.data.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        >>> truncation_accuracy(torch.tensor([[2.0, 1.0], [1.0, 3.0]]), head, torch.tensor([0, 1]))
        tensor([0.5000, 1.0000])
    """
    if not isinstance(head, nn.Linear):
        raise TypeError(f"head must be a torch.nn.Linear (the layer after the features), got {type(head).__name__}.")
    if features.dim() != 2 or features.shape[1] != head.in_features:
        raise ValueError(f"features must be [N, {head.in_features}] for this head, got {list(features.shape)}.")
    if targets.shape != features.shape[:1]:
        raise ValueError(f"targets must be class ids [N] = [{features.shape[0]}], got {list(targets.shape)}.")
    logits = torch.cumsum(features.unsqueeze(2) * head.weight.T.unsqueeze(0), dim=1)  # [N, D, C]
    if head.bias is not None:
        logits = logits + head.bias
    return (logits.argmax(dim=2) == targets.unsqueeze(1)).to(features.dtype).mean(dim=0)


def nested_dropout(
    model: nn.Module,
    std: float = 10.0,
    distribution: Distribution = "gaussian",
    p: float = 0.1,
    per_sample: bool = False,
    eval_units: int | None = None,
    seed: int | None = None,
    head: str = "head",
) -> nn.Module:
    """Put a :class:`NestedDropout` in front of ``model``'s submodule ``head`` (a dotted path), in place; return
    ``model``. The head becomes ``nn.Sequential(NestedDropout(...), head)``, so it acts between our nets'
    ``forward_features`` and ``forward_head``; for a :class:`~lit_tricks.Classifier` pass ``head="backbone.head"``.
    A head already wrapped gets a new layer with the new settings. The head's state-dict keys gain a ``.1``
    level (``head.weight`` -> ``head.1.weight``) and ``head.0._extra_state`` holds the layer's generator.

    Example::

        >>> from lit_tricks.nets import MLP
        >>> net = nested_dropout(MLP(in_features=64, num_classes=10), std=10.0)
        >>> net.head
        Sequential(
          (0): NestedDropout(gaussian, std=10.0, per_sample=False, eval_units=None, seed=None)
          (1): Linear(in_features=256, out_features=10, bias=True)
        )
    """
    target = named_submodule(model, head, "the layers after the features, to put nested dropout before")
    layer = NestedDropout(std, distribution, p, per_sample, eval_units, seed)
    if isinstance(target, nn.Sequential) and len(target) == 2 and isinstance(target[0], NestedDropout):
        target[0] = layer.train(target[0].training)
        return model
    parent_name, _, name = head.rpartition(".")
    setattr(model.get_submodule(parent_name), name, nn.Sequential(layer.train(target.training), target))
    return model
