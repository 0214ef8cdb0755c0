"""Long-tail metrics: balanced accuracy and many/medium/few-shot accuracy by training-class counts."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric


def shot_groups(class_counts: Sequence[int] | Tensor, many: int = 100, few: int = 20) -> dict[str, Tensor]:
    """The ``many`` (count > ``many``), ``medium`` and ``few`` (count < ``few``) classes by training counts.

    The thresholds 100 and 20 are the CIFAR-LT / ImageNet-LT convention (Liu et al., 2019). On small sets they
    can leave a group empty (e.g. rho=10 on MNIST-1D has no class under 20 samples); then the classes sorted by
    count, most first, are split into thirds instead (sizes differing by at most one, the larger groups first).

    Example::

        >>> {k: v.tolist() for k, v in shot_groups([500, 50, 5]).items()}
        {'many': [0], 'medium': [1], 'few': [2]}
    """
    counts = torch.as_tensor(class_counts)
    if counts.ndim != 1 or len(counts) < 3:
        raise ValueError(f"class_counts must hold the training counts of at least 3 classes, got {class_counts!r}.")
    if not 0 < few <= many:
        raise ValueError(f"the thresholds must satisfy 0 < few <= many, got few={few}, many={many}.")
    classes = torch.arange(len(counts))
    groups = {
        "many": classes[counts > many],
        "medium": classes[(counts >= few) & (counts <= many)],
        "few": classes[counts < few],
    }
    if any(len(members) == 0 for members in groups.values()):
        by_count = counts.argsort(descending=True, stable=True)
        groups = {name: part.sort().values for name, part in zip(groups, by_count.tensor_split(3), strict=True)}
    return groups


class ClassGroupAccuracy(Metric):
    r"""Mean per-class recall over a group of classes: :math:`\frac{1}{|G|}\sum_{c \in G} \mathrm{TP}_c / N_c`.

    Over all classes (``classes=None``) it is the balanced accuracy; over a :func:`shot_groups` group, the
    many/medium/few-shot accuracy of the long-tail papers. Classes without evaluation samples are left out of
    the mean (``nan`` if none has any). ``update(probs_or_logits [N, C], class ids [N])``; the per-class
    counts are summed over processes, so the value is exact under DDP.

    Args:
        num_classes: number of classes ``C``.
        classes: the class ids of the group, or ``None`` for all.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, num_classes: int, classes: Sequence[int] | Tensor | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}.")
        group = torch.arange(num_classes) if classes is None else torch.as_tensor(classes, dtype=torch.long)
        if group.ndim != 1 or len(group) == 0 or int(group.min()) < 0 or int(group.max()) >= num_classes:
            raise ValueError(f"classes must be a non-empty list of class ids in [0, {num_classes}), got {classes!r}.")
        self.num_classes = num_classes
        self.group = group.tolist()
        self.add_state("correct", default=torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        self.correct += torch.bincount(target[preds.argmax(dim=-1) == target], minlength=self.num_classes)
        self.total += torch.bincount(target, minlength=self.num_classes)

    def compute(self) -> Tensor:
        correct, total = self.correct[self.group].double(), self.total[self.group].double()
        seen = total > 0
        return (correct[seen] / total[seen]).mean().float()


def long_tail_metrics(
    num_classes: int, class_counts: Sequence[int] | Tensor, many: int = 100, few: int = 20
) -> dict[str, ClassGroupAccuracy]:
    """``{"balanced_acc", "many_acc", "medium_acc", "few_acc"}``: :class:`ClassGroupAccuracy` metrics whose
    groups come from the training ``class_counts`` by :func:`shot_groups`; add them to a ``MetricCollection``."""
    metrics = {"balanced_acc": ClassGroupAccuracy(num_classes)}
    for name, classes in shot_groups(class_counts, many, few).items():
        metrics[f"{name}_acc"] = ClassGroupAccuracy(num_classes, classes)
    return metrics
