r"""Neural collapse (Papyan, Han & Donoho, PNAS 2020) measured from class statistics of penultimate features.

With :math:`n_c` samples of class :math:`c`, class means :math:`\mu_c`, the sample-weighted global mean
:math:`\mu_G`, the centred means :math:`M = [\mu_c - \mu_G]_c` and the classifier rows :math:`w_c`:

* NC1 (within-class variability collapse): :math:`\mathrm{Tr}(\Sigma_W \Sigma_B^{+}) / C` with
  :math:`\Sigma_W = \frac1N \sum_i (h_i - \mu_{y_i})(h_i - \mu_{y_i})^\top` and
  :math:`\Sigma_B = \frac1C \sum_c (\mu_c - \mu_G)(\mu_c - \mu_G)^\top` (its pseudo-inverse on the top
  :math:`C - 1` eigenvalues);
* NC2 (simplex ETF): equinorm, the coefficient of variation (std / mean) of :math:`\lVert \mu_c - \mu_G\rVert`
  and of :math:`\lVert w_c \rVert`; equiangularity, the std of the pairwise cosines and the mean over
  :math:`c \ne c'` of :math:`|\cos(\cdot_c, \cdot_{c'}) + 1/(C-1)|`;
* NC3 (self-duality): :math:`\lVert W/\lVert W\rVert_F - M/\lVert M\rVert_F \rVert_F^2`;
* NC4 (nearest class centre): how often the network's argmax equals :math:`\arg\min_c \lVert h - \mu_c\rVert`.

Everything that needs only sums (NC1-NC3) is computed from the per-class counts, feature sums and the total
second moment :math:`\sum_i h_i h_i^\top`, so the statistics can be accumulated in one pass and summed over
processes; the functions here take them in float64.
"""

from __future__ import annotations

import torch
from torch import Tensor


def class_means(counts: Tensor, sums: Tensor) -> tuple[Tensor, Tensor]:
    """The class means ``[C, D]`` and the sample-weighted global mean ``[D]`` from counts ``[C]`` and sums ``[C, D]``.

    Example::

        >>> means, mu_g = class_means(torch.tensor([1.0, 3.0]), torch.tensor([[2.0, 0.0], [0.0, 3.0]]))
        >>> means, mu_g
        (tensor([[2., 0.],
                [0., 1.]]), tensor([0.5000, 0.7500]))
    """
    if counts.ndim != 1 or sums.ndim != 2 or sums.shape[0] != counts.shape[0]:
        raise ValueError(f"counts must be [C] and sums [C, D], got {tuple(counts.shape)} and {tuple(sums.shape)}.")
    if bool((counts <= 0).any()):
        raise ValueError(f"every class needs at least one sample, got counts {counts.tolist()}.")
    return sums / counts[:, None], sums.sum(0) / counts.sum()


def within_class_covariance(counts: Tensor, sums: Tensor, second_moment: Tensor) -> Tensor:
    r""":math:`\Sigma_W = \frac1N\big(\sum_i h_i h_i^\top - \sum_c n_c \mu_c \mu_c^\top\big)` ``[D, D]``."""
    means, _ = class_means(counts, sums)
    return (second_moment - (means * counts[:, None]).T @ means) / counts.sum()


def between_class_covariance(counts: Tensor, sums: Tensor) -> Tensor:
    r""":math:`\Sigma_B = \frac1C \sum_c (\mu_c - \mu_G)(\mu_c - \mu_G)^\top` ``[D, D]`` (classes weighted equally)."""
    means, mu_g = class_means(counts, sums)
    centred = means - mu_g
    return centred.T @ centred / len(counts)


def nc1(counts: Tensor, sums: Tensor, second_moment: Tensor) -> Tensor:
    r"""NC1, :math:`\mathrm{Tr}(\Sigma_W \Sigma_B^{+}) / C`, with :math:`\Sigma_B^{+}` inverted on its top
    :math:`\min(C - 1, D)` eigenvalues (as Papyan et al. invert it by ``svds(Sb, k=C-1)``). 0 when every
    sample sits on its class mean.

    Example::

        >>> counts, sums = torch.tensor([2.0, 2.0]), torch.tensor([[2.0, 0.0], [-2.0, 0.0]])
        >>> second = torch.tensor([[2.0 + 2.0, 0.0], [0.0, 0.0]])  # h = (1, 0) x2, (-1, 0) x2: collapsed
        >>> nc1(counts, sums, second)
        tensor(0.)
    """
    sigma_w = within_class_covariance(counts, sums, second_moment)
    eigenvalues, eigenvectors = torch.linalg.eigh(between_class_covariance(counts, sums))
    k = min(len(counts) - 1, sigma_w.shape[0])
    eigenvalues, eigenvectors = eigenvalues[-k:], eigenvectors[:, -k:]
    kept = eigenvalues > eigenvalues.max().clamp_min(0) * torch.finfo(eigenvalues.dtype).eps * sigma_w.shape[0]
    eigenvalues, eigenvectors = eigenvalues[kept], eigenvectors[:, kept]
    # Tr(Sw V diag(1/l) V^T) = sum_k v_k^T Sw v_k / l_k
    return ((eigenvectors * (sigma_w @ eigenvectors)).sum(0) / eigenvalues).sum() / len(counts)


def equinorm(vectors: Tensor) -> Tensor:
    """NC2 equinorm: std / mean of the row norms of ``vectors [C, D]`` (unbiased std, as ``torch.std``); 0 when all
    rows have the same length.

    Example::

        >>> equinorm(torch.tensor([[3.0, 4.0], [0.0, 5.0], [5.0, 0.0]]))
        tensor(0.)
    """
    norms = vectors.norm(dim=1)
    return norms.std() / norms.mean()


def cosines(vectors: Tensor) -> Tensor:
    """The pairwise cosine similarities ``[C, C]`` of the rows of ``vectors [C, D]``."""
    unit = vectors / vectors.norm(dim=1, keepdim=True)
    return unit @ unit.T


def equiangularity(vectors: Tensor) -> tuple[Tensor, Tensor]:
    r"""NC2 equiangularity of the rows of ``vectors [C, D]``: ``(std, etf_gap)``, the std of the cosines over pairs
    :math:`c < c'` and the mean over :math:`c \ne c'` of :math:`|\cos + 1/(C-1)|` (Papyan et al.'s ``coherence``).
    Both are 0 for a simplex ETF.

    Example::

        >>> etf = torch.tensor([[1.0, 0.0], [-0.5, 3**0.5 / 2], [-0.5, -(3**0.5) / 2]])
        >>> [round(float(v), 6) for v in equiangularity(etf)]
        [0.0, 0.0]
    """
    c = vectors.shape[0]
    cos = cosines(vectors)
    upper = torch.triu_indices(c, c, offset=1, device=vectors.device)
    pairs = cos[upper[0], upper[1]]
    return pairs.std(), (pairs + 1.0 / (c - 1)).abs().mean()


def self_duality(weight: Tensor, centred_means: Tensor) -> Tensor:
    r"""NC3: :math:`\lVert W/\lVert W\rVert_F - M/\lVert M\rVert_F \rVert_F^2` for classifier rows ``weight [C, D]``
    and centred class means ``[C, D]``; 0 when the classifier is proportional to the means.

    Example::

        >>> m = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
        >>> round(float(self_duality(3 * m, m)), 6)
        0.0
    """
    if weight.shape != centred_means.shape:
        raise ValueError(
            f"the classifier weight {tuple(weight.shape)} and the class means {tuple(centred_means.shape)} must "
            "both be [C, D]."
        )
    return (weight / weight.norm() - centred_means / centred_means.norm()).square().sum()


def nearest_class_centre(features: Tensor, means: Tensor) -> Tensor:
    r"""The nearest-class-centre prediction :math:`\arg\min_c \lVert h - \mu_c\rVert` ``[N]`` of ``features [N, D]``.

    Example::

        >>> nearest_class_centre(torch.tensor([[0.9, 0.0], [-2.0, 0.1]]), torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))
        tensor([0, 1])
    """
    return torch.cdist(features.to(means.dtype), means).argmin(dim=1)


def neural_collapse(
    counts: Tensor, sums: Tensor, second_moment: Tensor, weight: Tensor | None = None
) -> dict[str, Tensor]:
    """NC1, NC2 (of the centred class means and, with ``weight [C, D]``, of the classifier rows) and NC3 from the
    class statistics: counts ``[C]``, feature sums ``[C, D]`` and the total second moment ``[D, D]``.

    Keys: ``nc1``, ``nc2_equinorm_means``, ``nc2_cos_std_means``, ``nc2_equiangular_means`` and, with ``weight``,
    ``nc2_equinorm_classifier``, ``nc2_cos_std_classifier``, ``nc2_equiangular_classifier``, ``nc3_self_duality``.
    """
    means, mu_g = class_means(counts, sums)
    centred = means - mu_g
    cos_std, etf_gap = equiangularity(centred)
    out = {
        "nc1": nc1(counts, sums, second_moment),
        "nc2_equinorm_means": equinorm(centred),
        "nc2_cos_std_means": cos_std,
        "nc2_equiangular_means": etf_gap,
    }
    if weight is not None:
        weight = weight.to(centred.dtype)
        cos_std, etf_gap = equiangularity(weight)
        out.update(
            nc2_equinorm_classifier=equinorm(weight),
            nc2_cos_std_classifier=cos_std,
            nc2_equiangular_classifier=etf_gap,
            nc3_self_duality=self_duality(weight, centred),
        )
    return out
