r"""RCAL's representation calibration (Zhang, Zhao, Yao, Yuan & Huang, "When Noisy Labels Meet Long Tail Dilemmas:
A Representation Calibration Method", ICCV 2023): per-class Gaussians of penultimate features, recovered from
mislabeled and long-tailed data, and features sampled from them.

The steps, each a function here:

1. :func:`lof_inliers` drops, class by class, the features the Local Outlier Factor (Breunig et al., 2000) flags
   as outliers (mostly mislabeled samples: their features sit in another class's cluster);
2. :func:`class_statistics` estimates each class's mean :math:`\hat\mu_k` and covariance :math:`\hat\Sigma_k`
   from the inliers;
3. :func:`calibrate_tail` replaces the statistics of each tail class :math:`k` by averages with the :math:`q` head
   classes :math:`C_k^q` whose means are nearest (Euclidean) to :math:`\hat\mu_k`:

   .. math:: \tilde\mu_k = \frac{\hat\mu_k + \sum_{j \in C_k^q} \hat\mu_j}{q + 1}, \qquad
             \tilde\Sigma_k = \frac{\hat\Sigma_k + \sum_{j \in C_k^q} \hat\Sigma_j}{q + 1} + \alpha;

4. :func:`gaussian_factors` and :func:`sample_features` draw features :math:`z \sim \mathcal N(\tilde\mu_k,
   \tilde\Sigma_k)`, as many from every class, for the classifier to learn from;
5. :func:`representation_distance` is the individual calibration: the squared distance of each learned feature
   to the feature the (frozen) contrastively pre-trained encoder gives the same input.
"""

from __future__ import annotations

import torch
from torch import Tensor


def class_statistics(features: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor, Tensor]:
    r"""Per-class mean, unbiased covariance and count of ``features [N, D]`` under integer ``labels [N]``.

    .. math:: \hat\mu_k = \frac{1}{n_k}\sum_{y_i = k} z_i, \qquad
              \hat\Sigma_k = \frac{1}{n_k - 1}\sum_{y_i = k} (z_i - \hat\mu_k)(z_i - \hat\mu_k)^\top

    Returns ``(means [C, D], covariances [C, D, D], counts [C])`` in float64; a class with no sample has a zero
    mean, a class with fewer than two a zero covariance.

    Example::

        >>> means, covs, counts = class_statistics(torch.tensor([[0.0], [2.0], [5.0]]), torch.tensor([0, 0, 1]), 2)
        >>> means.squeeze(1).tolist(), covs.flatten().tolist(), counts.tolist()
        ([1.0, 5.0], [2.0, 0.0], [2, 1])
    """
    z = features.detach().double()
    labels = labels.long()
    counts = torch.bincount(labels, minlength=num_classes)[:num_classes]
    sums = z.new_zeros(num_classes, z.shape[1]).index_add_(0, labels, z)
    means = sums / counts.clamp_min(1).unsqueeze(1).to(z)
    centred = z - means[labels]
    outer = centred.unsqueeze(2) * centred.unsqueeze(1)  # [N, D, D]
    scatter = z.new_zeros(num_classes, z.shape[1], z.shape[1]).index_add_(0, labels, outer)
    covariances = scatter / (counts - 1).clamp_min(1).view(-1, 1, 1).to(z)
    return means, covariances, counts


def lof_inliers(features: Tensor, labels: Tensor, num_classes: int, n_neighbors: int = 20) -> Tensor:
    """A boolean mask ``[N]``: ``False`` for the features the Local Outlier Factor flags, within each class.

    Uses scikit-learn's ``LocalOutlierFactor`` with its default threshold (``contamination="auto"``: a sample is
    an outlier when its LOF exceeds 1.5) and ``min(n_neighbors, n_k - 1)`` neighbours; classes with fewer than
    three samples keep all of theirs. Deterministic: every DDP rank computes the same mask from the same features.

    Example::

        >>> cluster = torch.randn(30, 2, generator=torch.Generator().manual_seed(0))
        >>> z = torch.cat([cluster, torch.tensor([[40.0, 40.0]])])
        >>> lof_inliers(z, torch.zeros(31, dtype=torch.long), 1).logical_not().nonzero().flatten().tolist()
        [30]
    """
    from sklearn.neighbors import LocalOutlierFactor

    z = features.detach().double().cpu().numpy()
    labels = labels.long().cpu()
    keep = torch.ones(len(labels), dtype=torch.bool)
    for k in range(num_classes):
        rows = (labels == k).nonzero().flatten()
        if len(rows) < 3:
            continue
        lof = LocalOutlierFactor(n_neighbors=min(n_neighbors, len(rows) - 1))
        keep[rows] = torch.from_numpy(lof.fit_predict(z[rows.numpy()]) == 1)
    return keep.to(features.device)


def calibrate_tail(
    means: Tensor, covariances: Tensor, counts: Tensor, q: int, alpha: float, head_ratio: float
) -> tuple[Tensor, Tensor, Tensor]:
    r"""RCAL's tail calibration: average each tail class's statistics with those of its ``q`` nearest head classes.

    Head classes have at least ``head_ratio`` times the largest count; each other class with at least one sample
    is a tail class :math:`k`, whose :math:`C_k^q` are the ``min(q, number of head classes)`` head classes nearest
    to :math:`\hat\mu_k`. Then :math:`\tilde\mu_k = (\hat\mu_k + \sum_{j \in C_k^q}\hat\mu_j)/(q + 1)` and
    :math:`\tilde\Sigma_k = (\hat\Sigma_k + \sum_{j \in C_k^q}\hat\Sigma_j)/(q + 1) + \alpha`, ``alpha`` added to
    every entry (as in the distribution calibration of Yang et al., ICLR 2021, which RCAL adapts). Head classes
    keep their statistics.

    Returns ``(means, covariances, valid [C] bool)``; ``valid`` marks the classes with a distribution to sample
    (those with at least one sample).

    Example::

        >>> means = torch.tensor([[0.0], [10.0], [1.0]])
        >>> covs = torch.tensor([[[1.0]], [[3.0]], [[0.0]]])
        >>> m, c, valid = calibrate_tail(means, covs, torch.tensor([100, 90, 2]), q=1, alpha=0.5, head_ratio=0.5)
        >>> m.flatten().tolist(), c.flatten().tolist(), valid.tolist()
        ([0.0, 10.0, 0.5], [1.0, 3.0, 1.0], [True, True, True])
    """
    valid = counts > 0
    head = counts >= head_ratio * counts.max()
    tail = (valid & ~head).nonzero().flatten()
    means, covariances = means.clone(), covariances.clone()
    if len(tail) == 0 or q == 0:
        return means, covariances, valid
    head_ids = head.nonzero().flatten()
    q = min(q, len(head_ids))
    nearest = head_ids[torch.cdist(means[tail], means[head_ids]).topk(q, largest=False).indices]  # [T, q]
    means[tail] = (means[tail] + means[nearest].sum(dim=1)) / (q + 1)
    covariances[tail] = (covariances[tail] + covariances[nearest].sum(dim=1)) / (q + 1) + alpha
    return means, covariances, valid


def gaussian_factors(covariances: Tensor) -> Tensor:
    r"""Square roots :math:`L_k` with :math:`L_k L_k^\top = \Sigma_k`, from the eigendecomposition (negative
    eigenvalues of a rounding-error-indefinite matrix set to zero), so singular covariances (fewer samples than
    dimensions) are fine. ``[C, D, D] -> [C, D, D]``, in the input's dtype."""
    values, vectors = torch.linalg.eigh(covariances.double())
    return (vectors * values.clamp_min(0).sqrt().unsqueeze(-2)).to(covariances.dtype)


def sample_features(
    means: Tensor, factors: Tensor, per_class: int, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    r"""Draw ``per_class`` features from each of the ``C`` Gaussians: :math:`z = \mu_k + L_k \varepsilon`,
    :math:`\varepsilon \sim \mathcal N(0, I)` from ``generator`` (on the CPU; moved to ``means``' device). One
    batched product per class's block (no gather of a ``[D, D]`` factor per sample).

    Returns ``(features [C * per_class, D], rows [C * per_class])`` in ``means``' dtype, ``rows`` the position in
    ``means`` of each feature's class (``per_class`` copies of 0, then of 1, ...).

    Example::

        >>> means, factors = torch.tensor([[1.0, -1.0]]), torch.eye(2).unsqueeze(0) * 2
        >>> z, rows = sample_features(means, factors, 4000, torch.Generator().manual_seed(0))
        >>> z.shape, bool((z.mean(0) - means[0]).abs().max() < 0.15), bool((z.std(0) - 2).abs().max() < 0.1)
        (torch.Size([4000, 2]), True, True)
    """
    num_classes, dim = means.shape
    noise = torch.randn(num_classes, per_class, dim, generator=generator, dtype=means.dtype).to(means.device)
    features = means.unsqueeze(1) + noise @ factors.transpose(1, 2)  # [C, per_class, D]
    rows = torch.arange(num_classes, device=means.device).repeat_interleave(per_class)
    return features.reshape(-1, dim), rows


def representation_distance(features: Tensor, anchors: Tensor) -> Tensor:
    r"""RCAL's individual representation calibration, per sample: :math:`\lVert z_i - z^{\rm c}_i \rVert_2^2`,
    the learned feature's squared distance to the contrastive encoder's (``anchors``, no gradient). ``[N]``."""
    return (features - anchors.detach()).pow(2).sum(dim=-1)
