"""Sample-quality metrics for generative models, as torchmetrics ``Metric``s over real and generated samples.

Each metric gathers ``update(real, fake)`` batches (``dist_reduce_fx="cat"``, so DDP ranks pool their
samples) and compares the pooled sets in ``compute()``. Report them beside the real-vs-real floor
(``update(real_a, real_b)`` with two independent real sets).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat


class _TwoSampleMetric(Metric):
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("real", default=[], dist_reduce_fx="cat")
        self.add_state("fake", default=[], dist_reduce_fx="cat")

    def update(self, real: Tensor, fake: Tensor) -> None:
        self.real.append(real.detach().flatten(1).double())
        self.fake.append(fake.detach().flatten(1).double())

    def _pooled(self) -> tuple[Tensor, Tensor]:
        return dim_zero_cat(self.real), dim_zero_cat(self.fake)


def _mean_off_diagonal(k: Tensor) -> Tensor:
    n = k.shape[0]
    return (k.sum() - k.diagonal().sum()) / (n * (n - 1))


class MaximumMeanDiscrepancy(_TwoSampleMetric):
    r"""Unbiased squared MMD with a mixture of RBF kernels :math:`\sum_b \exp(-\lVert x - y \rVert^2 / (2 b^2))`.

    Args:
        bandwidths: the kernel bandwidths :math:`b` (the defaults suit data of standard deviation ~0.5).
    """

    def __init__(self, bandwidths: tuple[float, ...] = (0.05, 0.1, 0.2, 0.5, 1.0), **kwargs) -> None:
        super().__init__(**kwargs)
        self.bandwidths = bandwidths

    def _kernel(self, a: Tensor, b: Tensor) -> Tensor:
        d2 = torch.cdist(a, b).pow(2)
        return sum(torch.exp(-d2 / (2 * w**2)) for w in self.bandwidths)

    def compute(self) -> Tensor:
        x, y = self._pooled()
        kxy = self._kernel(x, y).mean()
        return _mean_off_diagonal(self._kernel(x, x)) + _mean_off_diagonal(self._kernel(y, y)) - 2 * kxy


class EnergyDistance(_TwoSampleMetric):
    r"""Energy distance :math:`2\,\mathbb E\lVert X - Y \rVert - \mathbb E\lVert X - X' \rVert
    - \mathbb E\lVert Y - Y' \rVert` over all pairs (the V-statistic, as ``dcor.energy_distance``: zero for
    identical sets, never negative)."""

    def compute(self) -> Tensor:
        x, y = self._pooled()
        return 2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean()


class SlicedWasserstein(_TwoSampleMetric):
    r"""Sliced 2-Wasserstein distance: the root mean over random unit directions :math:`\theta` of
    :math:`W_2^2` between the 1-D projections (sorted, so the two sets must have equal size).

    Args:
        projections: number of directions.
        seed: seed of the directions (fixed, so values are comparable across calls).
    """

    def __init__(self, projections: int = 200, seed: int = 0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.projections, self.seed = projections, seed

    def compute(self) -> Tensor:
        x, y = self._pooled()
        if len(x) != len(y):
            raise ValueError(f"SlicedWasserstein needs as many generated as real samples, got {len(y)} and {len(x)}.")
        generator = torch.Generator().manual_seed(self.seed)
        theta = torch.randn(x.shape[1], self.projections, generator=generator, dtype=torch.float64).to(x.device)
        theta = theta / theta.norm(dim=0, keepdim=True)
        px, py = (x @ theta).sort(dim=0).values, (y @ theta).sort(dim=0).values
        return (px - py).pow(2).mean().sqrt()


class FrechetDistance(_TwoSampleMetric):
    r"""Fréchet distance between Gaussians fitted to features:
    :math:`\lVert \mu_1 - \mu_2 \rVert^2 + \mathrm{Tr}(\Sigma_1 + \Sigma_2 - 2 (\Sigma_1 \Sigma_2)^{1/2})`.

    Args:
        features: maps samples to feature vectors (e.g. :func:`digits_features`); identity if ``None``.
    """

    def __init__(self, features: Callable[[Tensor], Tensor] | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.features = features

    def update(self, real: Tensor, fake: Tensor) -> None:
        if self.features is not None:
            real, fake = self.features(real), self.features(fake)
        super().update(real, fake)

    def compute(self) -> Tensor:
        x, y = self._pooled()
        mu1, mu2 = x.mean(dim=0), y.mean(dim=0)
        s1, s2 = torch.cov(x.T), torch.cov(y.T)
        # Tr((S1 S2)^{1/2}) from the eigenvalues of S1^{1/2} S2 S1^{1/2} (symmetric, so real and >= 0)
        e1, v1 = torch.linalg.eigh(s1)
        root1 = v1 @ torch.diag(e1.clamp(min=0).sqrt()) @ v1.T
        cross = torch.linalg.eigvalsh(root1 @ s2 @ root1).clamp(min=0).sqrt().sum()
        return (mu1 - mu2).pow(2).sum() + s1.trace() + s2.trace() - 2 * cross


class KernelInceptionDistance(FrechetDistance):
    r"""KID: unbiased squared MMD with the polynomial kernel :math:`k(x, y) = (x^\top y / d + 1)^3` on features
    (less biased than the Fréchet distance for small sample sizes)."""

    def compute(self) -> Tensor:
        x, y = self._pooled()
        d = x.shape[1]

        def kernel(a: Tensor, b: Tensor) -> Tensor:
            return (a @ b.T / d + 1) ** 3

        return _mean_off_diagonal(kernel(x, x)) + _mean_off_diagonal(kernel(y, y)) - 2 * kernel(x, y).mean()


@functools.lru_cache(maxsize=1)
def _digits_classifier() -> nn.Module:
    from sklearn.datasets import load_digits

    from lit_tricks.core.rng import collect_rng_states, set_rng_states

    states = collect_rng_states()
    # it may first be needed inside a validation loop (no_grad / inference_mode): train with gradients anyway
    with torch.inference_mode(False), torch.enable_grad():
        torch.manual_seed(0)
        images, labels = load_digits(return_X_y=True)
        x = torch.as_tensor(images, dtype=torch.float32) / 8.0 - 1.0  # [-1, 1], as the generative digits
        y = torch.as_tensor(labels)
        net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))
        optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
        for _ in range(400):  # full batch, deterministic on the CPU
            optimizer.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            optimizer.step()
    set_rng_states(states)
    return net.eval().requires_grad_(False)


def digits_features(images: Tensor) -> Tensor:
    """64-D penultimate features of a small MLP classifier of the 8x8 digits (inputs in [-1, 1], ``[N, 64]``
    or ``[N, 1, 8, 8]``), trained once per process, deterministically, in about a second. It stands in for
    Inception features, which cannot be downloaded here."""
    net = _digits_classifier()
    with torch.no_grad():
        return net[:4](images.detach().float().flatten(1).cpu())
