"""Teacher-to-student feature distillation: ND's class-mean directions and its norm-and-direction loss."""

from __future__ import annotations

from torch import Tensor


def class_mean_directions(feature_sums: Tensor, counts: Tensor) -> Tensor:
    r"""Unit class-mean directions :math:`\hat e_c = \bar t_c / \|\bar t_c\|_2`, :math:`\bar t_c` the mean
    teacher feature of class :math:`c` (ND, Wang et al. 2023), from per-class sums ``[C, D]`` and counts ``[C]``.

    Raises a ``ValueError`` naming the classes with no sample (their direction is undefined).
    """
    empty = (counts == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(
            f"classes {empty} have no training sample, so ND has no teacher class mean for them: check num_classes "
            "and the training labels."
        )
    means = feature_sums / counts[:, None].to(feature_sums.dtype)
    return means / means.norm(dim=1, keepdim=True)


def nd_loss(student_features: Tensor, teacher_features: Tensor, directions: Tensor, targets: Tensor) -> Tensor:
    r"""Per-sample ND loss ("Improving Knowledge Distillation via Regularizing Feature Norm and Direction",
    Wang et al. 2023):

    .. math:: \ell_i = 1 - \frac{\langle s_i, \hat e_{y_i} \rangle}{\max(\|s_i\|_2, \|t_i\|_2)},

    with :math:`s_i` the student's (projected) features, :math:`t_i` the teacher's and :math:`\hat e_c` the
    unit teacher class mean (:func:`class_mean_directions`). It pulls :math:`s_i` towards its class
    direction and rewards a norm at least the teacher's. ``targets`` are class ids ``[N]``, or probabilities
    ``[N, C]`` (e.g. mixed by Mixup), for which :math:`\hat e_{y_i}` becomes :math:`\sum_c y_{ic}\hat e_c`
    (the paper uses class ids only). Returns ``[N]``.
    """
    direction = directions[targets] if targets.ndim == 1 else targets.to(directions.dtype) @ directions
    scale = student_features.norm(dim=1).maximum(teacher_features.norm(dim=1))
    return 1.0 - (student_features * direction).sum(dim=1) / scale
