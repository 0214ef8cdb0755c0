r"""KnoBo ("A Textbook Remedy for Domain Shifts: Knowledge Priors for Medical Image Analysis", Yang et al.,
NeurIPS 2024) as pure functions: the knowledge prior matrix, its loss on the linear head, and the concept
grounding functions.

Notation as the authors' code (``YueYANG1996/KnoBo``: ``modules/utils.py`` ``get_prior_matrix``,
``compute_prior_loss``; ``modules/train_grounding.py`` ``train_binary_model``; ``modules/cbm.py``): :math:`K`
concepts (statements from a knowledge corpus), :math:`C` classes, the head's weights :math:`W` ``[C, K]``, the
prior :math:`P \in \{-1, 0, 1\}^{C \times K}` from a language model's answer to "does class :math:`y` show
concept :math:`k`?" (yes / no / unknown).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

_ANSWERS = {"yes": 1.0, "no": -1.0, "unknown": 0.0}


def knobo_prior_matrix(answers: Sequence[Sequence[str]]) -> Tensor:
    r"""The prior :math:`P` ``[C, K]`` from answers ``answers[y][k]`` in ``"yes"`` (+1), ``"no"`` (-1),
    ``"unknown"`` (0), as the code's ``get_prior_matrix`` (whose other answers also give 0; here they raise).

    Example::

        >>> knobo_prior_matrix([["yes", "no"], ["unknown", "yes"]]).tolist()
        [[1.0, -1.0], [0.0, 1.0]]
    """
    if not len(answers) or not len(answers[0]):
        raise ValueError("answers must be a non-empty [C][K] table of 'yes' / 'no' / 'unknown'.")
    k = len(answers[0])
    rows = []
    for y, row in enumerate(answers):
        if len(row) != k:
            raise ValueError(f"answers must be a [C][K] table: row {y} has {len(row)} answers, row 0 has {k}.")
        bad = [a for a in row if a not in _ANSWERS]
        if bad:
            raise ValueError(f"answers must be 'yes', 'no' or 'unknown'; row {y} has {bad[:3]}.")
        rows.append([_ANSWERS[a] for a in row])
    return torch.tensor(rows)


def knobo_prior_loss(weight: Tensor, prior: Tensor) -> Tensor:
    r"""The code's prior term (``compute_prior_loss``), added to the cross-entropy with weight 1:

    .. math:: L_{prior} = \frac{1}{CK} \sum_{y,k} \big|\tanh(W_{yk}) - P_{yk}\big|.

    Example::

        >>> w = torch.tensor([[0.0, 100.0]])
        >>> round(knobo_prior_loss(w, torch.tensor([[1.0, -1.0]])).item(), 4)
        1.5
    """
    if weight.shape != prior.shape:
        raise ValueError(f"prior must have the head's shape [C, K] = {tuple(weight.shape)}, got {tuple(prior.shape)}.")
    return (torch.tanh(weight) - prior).abs().sum() / weight.numel()


def knobo_ground_concepts(
    features: Tensor, concept_labels: Tensor, max_iter: int = 1000, C: float = 1.0
) -> tuple[Tensor, Tensor]:
    r"""Grounding functions: one logistic regression per concept from image features to that concept's
    presence (scikit-learn ``LogisticRegression(max_iter=1000, class_weight="balanced")``, as the code's
    ``train_binary_model``), on images whose concept labels are known (the code: from reports a language model
    annotated; ``-1`` here marks an unknown label, skipped). The concept score is the predicted probability
    :math:`\sigma(w_k \cdot x + b_k)` (``predict_proba[:, 1]``). Returns ``(weights [K, D], biases [K])``.

    Example::

        >>> x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
        >>> w, b = knobo_ground_concepts(x, torch.tensor([[1], [1], [0], [0]]))
        >>> torch.sigmoid(x @ w.T + b).round().flatten().tolist()
        [1.0, 1.0, 0.0, 0.0]
    """
    from sklearn.linear_model import LogisticRegression

    if features.ndim != 2 or concept_labels.ndim != 2 or len(features) != len(concept_labels):
        raise ValueError(
            f"features [N, D] and concept_labels [N, K] must have the same N, got {tuple(features.shape)} and "
            f"{tuple(concept_labels.shape)}."
        )
    x = features.detach().double().cpu().numpy()
    weights, biases = [], []
    for k in range(concept_labels.shape[1]):
        labels = concept_labels[:, k]
        known = labels >= 0
        values = labels[known].long()
        if values.numel() == 0 or bool((values == values[0]).all()):
            raise ValueError(
                f"concept {k} needs known positive (1) and negative (0) examples to ground it; got "
                f"{int((values == 1).sum())} positive, {int((values == 0).sum())} negative."
            )
        model = LogisticRegression(max_iter=max_iter, class_weight="balanced", C=C)
        model.fit(x[known.cpu().numpy()], values.cpu().numpy())
        weights.append(torch.tensor(model.coef_[0]))
        biases.append(float(model.intercept_[0]))
    return torch.stack(weights).float(), torch.tensor(biases)
