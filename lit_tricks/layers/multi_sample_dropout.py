"""Multi-sample dropout (Inoue, "Multi-Sample Dropout for Accelerated Training and Better Generalization", 2019)."""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor, nn

from lit_tricks.core.checks import check_number, named_submodule


class MultiSampleDropout(nn.Module):
    """Run ``samples`` dropout masks through one shared ``head`` and keep every sample's logits.

    In training, for features ``h [N, D]`` and ``K = samples`` independent masks ``m_k`` (keep probability
    ``1 - p``, kept units scaled by ``1 / (1 - p)``): ``z_k = head(m_k * h)``. The forward returns their mean
    ``mean_k z_k [N, C]`` and keeps ``z [K, N, C]`` in :attr:`sample_logits` for the paper's loss, the mean of
    the ``K`` losses, ``l_i = (1/K) sum_k loss(z_{k,i}, y_i)``, which
    :func:`multi_sample_loss` (and the :class:`~lit_tricks.callbacks.multi_sample_dropout.ApplyMultiSampleDropout`
    trick) computes per sample. The ``K`` head passes run as one batched call on ``[K * N, D]``. In eval it is
    one pass of ``head`` without dropout.

    Args:
        head: the layers after the dropout, shared by all samples (e.g. the last ``nn.Linear``).
        p: dropout probability.
        samples: number of dropout samples ``K`` (the paper: 8).
    """

    def __init__(self, head: nn.Module, p: float = 0.5, samples: int = 8) -> None:
        super().__init__()
        if not isinstance(head, nn.Module):
            raise TypeError(f"head must be a torch.nn.Module, got {type(head).__name__}.")
        check_number("p", p, at_least=0.0, below=1.0)
        check_number("samples", samples, at_least=1, integer=True)
        self.head = head
        self.p = p
        self.samples = samples
        self.sample_logits: Tensor | None = None

    def extra_repr(self) -> str:
        return f"p={self.p}, samples={self.samples}"

    def forward(self, features: Tensor) -> Tensor:
        if not self.training:
            self.sample_logits = None
            return self.head(features)
        stacked = features.unsqueeze(0).expand(self.samples, *features.shape)  # [K, N, D], one mask each
        dropped = F.dropout(stacked, self.p, training=True).flatten(0, 1)
        logits = self.head(dropped)
        self.sample_logits = logits.unflatten(0, (self.samples, features.shape[0]))
        return self.sample_logits.mean(dim=0)


def multi_sample_loss(sample_logits: Tensor, targets: Tensor, loss: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """The paper's loss per sample: ``l_i = (1/K) sum_k loss(z_{k,i}, y_i)`` for ``sample_logits z [K, N, C]``,
    targets ``[N]`` (class ids) or ``[N, C]`` (probabilities) and a per-sample ``loss(logits, targets) -> [M]``;
    returns ``[N]``. One call of ``loss`` on all ``K * N`` rows."""
    samples, n = sample_logits.shape[:2]
    if targets.shape[0] != n:
        raise ValueError(f"sample_logits hold {n} samples per dropout sample but targets have {targets.shape[0]}.")
    repeated = targets.unsqueeze(0).expand(samples, *targets.shape).flatten(0, 1)
    return loss(sample_logits.flatten(0, 1), repeated).view(samples, n).mean(dim=0)


def multi_sample_dropout(model: nn.Module, p: float = 0.5, samples: int = 8, head: str = "head") -> nn.Module:
    """Wrap ``model``'s submodule named ``head`` (a dotted path) in :class:`MultiSampleDropout`, in place;
    return ``model``. Our nets (``lit_tricks.nets``) call their ``head`` after ``forward_features``; for a
    :class:`~lit_tricks.Classifier` pass ``head="backbone.head"``. A head already wrapped takes the new
    ``p`` and ``samples``. The head's state-dict keys gain a ``.head`` level (``head.weight`` ->
    ``head.head.weight``).

    Example::

        >>> from lit_tricks.nets import MLP
        >>> net = multi_sample_dropout(MLP(in_features=64, num_classes=10), p=0.5, samples=8)
        >>> net.head
        MultiSampleDropout(
          p=0.5, samples=8
          (head): Linear(in_features=256, out_features=10, bias=True)
        )
    """
    target = named_submodule(model, head, "the layers after the features, to wrap")
    check_number("p", p, at_least=0.0, below=1.0)
    check_number("samples", samples, at_least=1, integer=True)
    if isinstance(target, MultiSampleDropout):
        target.p, target.samples = p, samples
        return model
    parent_name, _, name = head.rpartition(".")
    setattr(model.get_submodule(parent_name), name, MultiSampleDropout(target, p, samples))
    return model
