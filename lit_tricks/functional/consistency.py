r"""Consistency training (Song & Dhariwal, "Improved Techniques for Training Consistency Models", ICLR 2024) and
the options of Dao et al., "Improved Training Technique for Latent Consistency Models" (ICLR 2025).

The consistency function :math:`f_\theta(x, \sigma) = c_\text{skip}(\sigma)\,x + c_\text{out}(\sigma)\,
F_\theta(c_\text{in}(\sigma)\,x, c_\text{noise}(\sigma))` meets the boundary condition
:math:`f_\theta(x, \sigma_\min) = x` exactly. Training pairs adjacent noise levels of a Karras grid and pulls
the student at :math:`\sigma_{i+1}` towards the stop-gradient student at :math:`\sigma_i` (same noise):

.. math:: \mathcal L = \mathbb E\big[\lambda(\sigma_i)\, d\big(f_\theta(x + \sigma_{i+1} z, \sigma_{i+1}),
          f_{\theta^-}(x + \sigma_i z, \sigma_i)\big)\big], \qquad
          \lambda(\sigma_i) = \frac{1}{\sigma_{i+1} - \sigma_i}.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor


def boundary_scalings(sigma: Tensor, sigma_data: float, sigma_min: float) -> tuple[Tensor, Tensor, Tensor]:
    r"""``(c_skip, c_out, c_in)``: :math:`c_\text{skip} = \sigma_d^2 / ((\sigma - \sigma_\min)^2 + \sigma_d^2)`,
    :math:`c_\text{out} = \sigma_d (\sigma - \sigma_\min) / \sqrt{\sigma^2 + \sigma_d^2}`,
    :math:`c_\text{in} = 1 / \sqrt{\sigma^2 + \sigma_d^2}`; so :math:`c_\text{skip}(\sigma_\min) = 1`,
    :math:`c_\text{out}(\sigma_\min) = 0`. With ``sigma_min = 0`` these are EDM's denoiser scalings."""
    c_skip = sigma_data**2 / ((sigma - sigma_min) ** 2 + sigma_data**2)
    c_out = sigma_data * (sigma - sigma_min) / (sigma**2 + sigma_data**2).sqrt()
    c_in = 1.0 / (sigma**2 + sigma_data**2).sqrt()
    return c_skip, c_out, c_in


def noise_conditioning(sigma: Tensor) -> Tensor:
    r""":math:`c_\text{noise}(\sigma) = \ln(\sigma) / 4` (EDM's convention), the network's time input."""
    return sigma.log() / 4


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    r"""The ascending Karras grid :math:`\sigma_i = (\sigma_\min^{1/\rho} + \frac{i-1}{N-1}(\sigma_\max^{1/\rho}
    - \sigma_\min^{1/\rho}))^\rho`, :math:`i = 1..N` (float64)."""
    if n < 2:
        raise ValueError(f"A Karras grid needs at least 2 levels, got {n}.")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    low, high = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (low + ramp * (high - low)) ** rho


def discretisation_steps(step: int, total_steps: int, s0: int = 10, s1: int = 1280) -> int:
    r"""The curriculum :math:`N(k) = \min(s_0 2^{\lfloor k / K' \rfloor}, s_1) + 1` with
    :math:`K' = \lfloor K / (\log_2 \lfloor s_1 / s_0 \rfloor + 1) \rfloor`: the number of levels doubles in
    equal stages of the run's ``total_steps`` :math:`K`. Runs too short for one step per stage (:math:`K' = 0`)
    use :math:`s_1` throughout."""
    stages = math.floor(math.log2(s1 // s0)) + 1
    stage_length = total_steps // stages
    if stage_length == 0:
        return s1 + 1
    return min(s0 * 2 ** (step // stage_length), s1) + 1


def lognormal_index_probabilities(sigmas: Tensor, p_mean: float = -1.1, p_std: float = 2.0) -> Tensor:
    r"""``[N - 1]`` probabilities of the pairs :math:`(\sigma_i, \sigma_{i+1})`:
    :math:`p(i) \propto \mathrm{erf}(\frac{\ln \sigma_{i+1} - P_\text{mean}}{\sqrt2 P_\text{std}}) -
    \mathrm{erf}(\frac{\ln \sigma_i - P_\text{mean}}{\sqrt2 P_\text{std}})` (a discretised lognormal)."""
    cdf = torch.erf((sigmas.log() - p_mean) / (math.sqrt(2) * p_std))
    mass = cdf[1:] - cdf[:-1]
    return mass / mass.sum()


def pseudo_huber(
    x: Tensor, y: Tensor, c: float | Tensor, reduction: Literal["vector", "elementwise"] = "vector"
) -> Tensor:
    r"""Per-sample pseudo-Huber distance: ``"vector"`` :math:`\sqrt{\lVert x - y \rVert_2^2 + c^2} - c` over all
    dimensions (the iCT paper's form), ``"elementwise"`` the mean of :math:`\sqrt{(x_j - y_j)^2 + c^2} - c`."""
    diff2 = (x - y).float().pow(2).flatten(1)
    if reduction == "vector":
        return (diff2.sum(dim=1) + c**2).sqrt() - c
    if reduction == "elementwise":
        return ((diff2 + c**2).sqrt() - c).mean(dim=1)
    raise ValueError(f"reduction must be 'vector' or 'elementwise', got {reduction!r}.")


def cauchy(x: Tensor, y: Tensor, c: float | Tensor) -> Tensor:
    r"""Per-sample Cauchy loss of the latent-CT paper: :math:`\log(1 + \overline{(x - y)^2} / (2c^2))`, with the
    squared error averaged over dimensions (so its :math:`c` schedule applies unchanged)."""
    return torch.log1p((x - y).float().pow(2).flatten(1).mean(dim=1) / (2 * c**2))


def huber_c(dim: int) -> float:
    r"""iCT's pseudo-Huber constant :math:`c = 0.00054 \sqrt d` for data of ``dim`` dimensions."""
    return 0.00054 * math.sqrt(dim)


def adaptive_c(num_levels: int, dim: int, s0: int = 10) -> float:
    r"""The latent-CT paper's scaling-c schedule: :math:`0.00054\sqrt d` in the first stage
    (:math:`N = s_0 + 1`), then :math:`c(N) = e^{-0.85} (N - 1)^{-1.15}` as :math:`N` doubles."""
    if num_levels <= s0 + 1:
        return huber_c(dim)
    return math.exp(-1.15 * math.log(num_levels - 1) - 0.85)


def ot_pairing(x: Tensor, z: Tensor) -> Tensor:
    r"""Minibatch optimal-transport coupling: the permutation :math:`\pi` minimising
    :math:`\sum_b \lVert x_b - z_{\pi(b)} \rVert^2` (exact, by the Hungarian algorithm on the host). Returns
    ``perm`` so that ``z[perm]`` is paired with ``x``. Costs one host round trip per call."""
    cost = torch.cdist(x.flatten(1).double(), z.flatten(1).double()).pow(2).cpu().numpy()
    _, columns = linear_sum_assignment(cost)
    return torch.as_tensor(np.asarray(columns), device=x.device)
