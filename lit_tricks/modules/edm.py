"""An EDM-style diffusion model: the baseline consistency models are measured against."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lit_tricks.core.eval_mode import eval_mode
from lit_tricks.functional import consistency as ct
from lit_tricks.modules.generative import GenerativeModule


class EDMDiffusion(GenerativeModule):
    r"""A denoiser trained as in EDM (Karras et al., "Elucidating the Design Space of Diffusion-Based Generative
    Models", NeurIPS 2022) and sampled with its deterministic Heun sampler.

    .. math:: D_\theta(x, \sigma) = c_\text{skip} x + c_\text{out} F_\theta(c_\text{in} x, \tfrac14\ln\sigma),
    .. math:: \mathcal L = \mathbb E_{\ln\sigma \sim \mathcal N(P_\text{mean}, P_\text{std}^2)}
              \Big[\frac{\sigma^2 + \sigma_d^2}{(\sigma \sigma_d)^2}\,
              \overline{(D_\theta(x + \sigma z, \sigma) - x)^2}\Big]

    (the boundary scalings with :math:`\sigma_\min = 0`). ``sample(n, steps=k)`` integrates the probability-flow
    ODE over a Karras grid of ``k`` intervals with Heun's method (Euler on the last), i.e. ``2k - 1`` network
    evaluations.

    Args:
        net, data_shape, sigma_data, sigma_min, sigma_max, rho: as in :class:`~lit_tricks.ConsistencyModel`.
        p_mean, p_std: the training noise distribution (EDM: -1.2, 1.2).
        clamp, ema_decay, optimizer, lr_scheduler, eval_steps, num_eval_samples, figure_every_n_epochs,
            predict_steps: as in :class:`~lit_tricks.ConsistencyModel`.
    """

    def __init__(
        self,
        net: nn.Module,
        data_shape: Sequence[int],
        sigma_data: float = 0.5,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        rho: float = 7.0,
        p_mean: float = -1.2,
        p_std: float = 1.2,
        clamp: Sequence[float] | None = None,
        ema_decay: float | None = 0.999,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        eval_steps: Sequence[int] = (2, 10),
        num_eval_samples: int = 1000,
        figure_every_n_epochs: int = 1,
        predict_steps: int = 10,
    ) -> None:
        super().__init__(net, data_shape, optimizer, lr_scheduler, ema_decay, eval_steps, num_eval_samples,
                         figure_every_n_epochs, predict_steps)  # fmt: skip
        self.check_sigmas(sigma_min, sigma_max)
        self.save_hyperparameters(ignore=["net", "optimizer", "lr_scheduler"])
        self.sigma_data, self.sigma_min, self.sigma_max, self.rho = sigma_data, sigma_min, sigma_max, rho
        self.p_mean, self.p_std = p_mean, p_std
        self.clamp = None if clamp is None else tuple(clamp)

    def forward(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        r"""The denoiser :math:`D_\theta(x, \sigma)`."""
        return self.preconditioned(x, sigma, self.sigma_data, 0.0)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x = self.inputs(batch)
        sigma = (self.p_mean + self.p_std * torch.randn(len(x), device=x.device)).exp().to(x.dtype)
        denoised = self(x + sigma.view(-1, *[1] * (x.ndim - 1)) * torch.randn_like(x), sigma)
        weight = (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2
        loss = (weight * (denoised - x).float().pow(2).flatten(1).mean(dim=1)).mean()
        self.log("train/loss", loss, prog_bar=True)
        return loss

    @torch.no_grad()
    def sample(self, n: int, steps: int = 10, generator: torch.Generator | None = None, use_ema: bool = True) -> Tensor:
        """``n`` samples with ``steps`` Heun steps (``2 * steps - 1`` network evaluations)."""
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}.")
        grid = ct.karras_sigmas(steps + 1, self.sigma_min, self.sigma_max, self.rho).flip(0).tolist() + [0.0]
        grid = grid[:steps] + [0.0]  # sigma_max ... sigma_min-ish, then 0
        with eval_mode(self), self.ema_weights(use_ema):
            x = grid[0] * torch.randn(n, *self.data_shape, generator=generator).to(self.device, self.dtype)
            for sigma, next_sigma in zip(grid[:-1], grid[1:], strict=True):
                slope = (x - self(x, sigma)) / sigma
                x_next = x + (next_sigma - sigma) * slope
                if next_sigma > 0:  # Heun's correction
                    x_next = x + (next_sigma - sigma) * 0.5 * (slope + (x_next - self(x_next, next_sigma)) / next_sigma)
                x = x_next
        return x if self.clamp is None else x.clamp(*self.clamp)
