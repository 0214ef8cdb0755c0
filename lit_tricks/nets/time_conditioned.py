"""Noise-level-conditioned networks ``net(x, c_noise)`` for consistency and diffusion models."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class NonScalingLayerNorm(nn.LayerNorm):
    """LayerNorm whose scale is fixed at 1 (only the shift learns), the latent-CT paper's "non-scaling
    LayerNorm": a learned scale amplifies outlier features."""

    def __init__(self, normalized_shape: int, eps: float = 1e-5) -> None:
        super().__init__(normalized_shape, eps=eps)
        self.weight.requires_grad_(False)


def sinusoidal_embedding(t: Tensor, dim: int, max_period: float = 10_000.0, scale: float = 100.0) -> Tensor:
    """``[N, dim]`` sines and cosines of ``scale * t`` at geometric frequencies (``t`` of order 1, e.g.
    ``ln(sigma) / 4``; the scale spreads it over the frequencies). Computed in float32, returned in ``t``'s dtype."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = scale * t.float().view(-1, 1) * freqs
    return torch.cat([angles.sin(), angles.cos()], dim=-1).to(t.dtype)


class TimeMLP(nn.Module):
    """An MLP for low-dimensional data: ``[x, embed(c_noise)]`` through ``depth`` residual SiLU blocks.

    Args:
        dim: data dimension (e.g. 2 for 2-D toy sets).
        hidden: width.
        depth: residual blocks.
        embedding: size of the sinusoidal noise-level embedding.
        dropout: dropout in each block (consistency training likes more dropout than diffusion).
        norm: ``"none"``, ``"layer"`` or ``"nonscaling"`` (the latent-CT paper's non-scaling LayerNorm).
    """

    def __init__(
        self, dim: int = 2, hidden: int = 256, depth: int = 3, embedding: int = 64, dropout: float = 0.0,
        norm: str = "none",
    ) -> None:  # fmt: skip
        super().__init__()
        if norm not in ("none", "layer", "nonscaling"):
            raise ValueError(f"norm must be 'none', 'layer' or 'nonscaling', got {norm!r}.")
        self.dim, self.embedding = dim, embedding
        self.input = nn.Linear(dim + embedding, hidden)
        layer_norm = {"none": nn.Identity, "layer": nn.LayerNorm, "nonscaling": NonScalingLayerNorm}[norm]
        self.blocks = nn.ModuleList(
            nn.Sequential(layer_norm(hidden), nn.SiLU(), nn.Dropout(dropout), nn.Linear(hidden, hidden))
            for _ in range(depth)
        )
        self.output = nn.Sequential(nn.SiLU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor, c_noise: Tensor) -> Tensor:
        h = self.input(torch.cat([x, sinusoidal_embedding(c_noise, self.embedding)], dim=-1))
        for block in self.blocks:
            h = h + block(h)
        return self.output(h)


class TimeCNN(nn.Module):
    """A small conv net for ``[C, 8, 8]`` images: three 3x3 conv blocks with the noise-level embedding added
    per channel (FiLM-style shift), at full resolution.

    Args:
        channels: image channels.
        width: feature channels.
        embedding: size of the noise-level embedding.
        dropout: dropout before the last conv.
    """

    def __init__(self, channels: int = 1, width: int = 64, embedding: int = 64, dropout: float = 0.0) -> None:
        super().__init__()
        self.embedding = embedding
        self.time = nn.Sequential(nn.Linear(embedding, width), nn.SiLU(), nn.Linear(width, 3 * width))
        self.convs = nn.ModuleList(
            [
                nn.Conv2d(channels, width, 3, padding=1),
                nn.Conv2d(width, width, 3, padding=1),
                nn.Conv2d(width, width, 3, padding=1),
            ]
        )
        self.norms = nn.ModuleList(nn.GroupNorm(8, width) for _ in range(3))
        self.dropout = nn.Dropout(dropout)
        self.output = nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, x: Tensor, c_noise: Tensor) -> Tensor:
        shifts = self.time(sinusoidal_embedding(c_noise, self.embedding)).chunk(3, dim=-1)
        h = x
        for conv, norm, shift in zip(self.convs, self.norms, shifts, strict=True):
            h = torch.nn.functional.silu(norm(conv(h)) + shift[:, :, None, None])
        return self.output(self.dropout(h))
