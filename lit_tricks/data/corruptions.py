"""Common corruptions at severities 1-5, in numpy/torch only, for images in [0, 1] and for 1-D signals.

Parameters are CIFAR-10-C's (Hendrycks & Dietterich, ICLR 2019, ``make_cifar_c.py``), as listed in the
project's reference notes; the closed forms are exact, blurs and fog follow the reference algorithms on our
image sizes (documented per function). Motion blur, snow, frost, glass and elastic need ImageMagick, texture
files or long loops and are left out.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

PARAMS: dict[str, list] = {
    "gaussian_noise": [0.04, 0.06, 0.08, 0.09, 0.10],
    "shot_noise": [500, 250, 100, 75, 50],
    "impulse_noise": [0.01, 0.02, 0.03, 0.05, 0.07],
    "speckle_noise": [0.06, 0.1, 0.12, 0.16, 0.2],
    "gaussian_blur": [0.4, 0.6, 0.7, 0.8, 1.0],
    "defocus_blur": [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)],
    "fog": [(0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)],
    "brightness": [0.05, 0.1, 0.15, 0.2, 0.3],
    "contrast": [0.75, 0.5, 0.4, 0.3, 0.15],
    "pixelate": [0.95, 0.9, 0.85, 0.75, 0.65],
}
CORRUPTIONS = tuple(PARAMS)


def _gaussian_kernel(sigma: float) -> Tensor:
    radius = int(4 * sigma + 0.5)  # scikit-image's truncate=4
    grid = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-(grid**2) / (2 * sigma**2))
    return (kernel / kernel.sum()).float()


def _blur(x: Tensor, kernel_1d: Tensor) -> Tensor:
    """Separable blur over the trailing 1 (signals) or 2 (images) dimensions, replicate padding."""
    k = kernel_1d.to(x.device, x.dtype)
    r = len(k) // 2
    if x.ndim == 2:  # [N, L]
        out = F.conv1d(F.pad(x.unsqueeze(1), (r, r), mode="replicate"), k.view(1, 1, -1))
        return out.squeeze(1)
    n, c, h, w = x.shape
    flat = x.reshape(n * c, 1, h, w)
    flat = F.conv2d(F.pad(flat, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    flat = F.conv2d(F.pad(flat, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))
    return flat.view(n, c, h, w)


def _disk_kernel(radius: float, alias_sigma: float) -> Tensor:
    """Defocus kernel: a disk of ``radius`` on a 17 x 17 grid, normalised, smoothed by a 3 x 3 Gaussian of
    ``alias_sigma`` (cv2.GaussianBlur's role in the reference), cropped to its support."""
    grid = torch.arange(-8, 9, dtype=torch.float64)
    yy, xx = torch.meshgrid(grid, grid, indexing="ij")
    disk = ((xx**2 + yy**2) <= radius**2).double()
    disk /= disk.sum()
    g = torch.exp(-torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64) / (2 * alias_sigma**2))
    g = (g / g.sum()).view(1, 1, 3)
    smooth = F.conv2d(F.conv2d(disk.view(1, 1, 17, 17), g.view(1, 1, 1, 3), padding=(0, 1)), g.view(1, 1, 3, 1),
                      padding=(1, 0))[0, 0]  # fmt: skip
    rows, cols = smooth.abs().sum(dim=1) > 1e-12, smooth.abs().sum(dim=0) > 1e-12
    return (smooth[rows][:, cols] / smooth.sum()).float()


def _plasma(size: int, wibble_decay: float, rng: np.random.Generator) -> np.ndarray:
    """Diamond-square plasma fractal on a ``size`` x ``size`` grid (size a power of two), scaled to [0, 1]."""
    maparray = np.zeros((size, size))
    step, wibble = size, 100.0
    while step >= 2:
        half = step // 2
        wibble /= wibble_decay
        # squares: the centre of each square gets the mean of its corners plus noise
        corners = maparray[0:size:step, 0:size:step]
        mean = corners + np.roll(corners, -1, 0) + np.roll(corners, -1, 1) + np.roll(np.roll(corners, -1, 0), -1, 1)
        maparray[half:size:step, half:size:step] = mean / 4 + wibble * rng.uniform(-wibble, wibble, mean.shape) / 100
        # diamonds: the edge midpoints get the mean of their four neighbours plus noise
        for offset_r, offset_c in ((0, half), (half, 0)):
            r, c = np.meshgrid(np.arange(offset_r, size, step), np.arange(offset_c, size, step), indexing="ij")
            neighbours = (maparray[(r - half) % size, c] + maparray[(r + half) % size, c]
                          + maparray[r, (c - half) % size] + maparray[r, (c + half) % size])  # fmt: skip
            maparray[r, c] = neighbours / 4 + wibble * rng.uniform(-wibble, wibble, r.shape) / 100
        step = half
    maparray -= maparray.min()
    return maparray / max(maparray.max(), 1e-12)


def corrupt(x: Tensor, name: str, severity: int, generator: torch.Generator | None = None) -> Tensor:
    """``x`` corrupted by ``name`` at ``severity`` (1-5): images ``[N, C, H, W]`` in [0, 1], or 1-D signals
    ``[N, L]`` in [0, 1] (rescale signals first, see :func:`corrupt_signals`). Randomness from ``generator``."""
    if name not in PARAMS:
        raise ValueError(f"Unknown corruption {name!r}; choose from {', '.join(CORRUPTIONS)}.")
    if not 1 <= severity <= 5:
        raise ValueError(f"severity must be in 1..5, got {severity}.")
    if x.ndim not in (2, 4):
        raise ValueError(f"corrupt expects images [N, C, H, W] or signals [N, L], got shape {tuple(x.shape)}.")
    c = PARAMS[name][severity - 1]
    generator = generator or torch.Generator().manual_seed(0)

    def noise(shape) -> Tensor:
        return torch.randn(shape, generator=generator).to(x.device, x.dtype)

    spatial = tuple(range(1, x.ndim)) if x.ndim == 2 else (2, 3)
    if name == "gaussian_noise":
        out = x + c * noise(x.shape)
    elif name == "speckle_noise":
        out = x + x * c * noise(x.shape)
    elif name == "shot_noise":
        out = torch.poisson((x.clamp(min=0) * c).cpu(), generator=generator).to(x.device) / c
    elif name == "impulse_noise":
        u = torch.rand((2, *x.shape), generator=generator).to(x.device)
        out = torch.where(u[0] < c, (u[1] < 0.5).to(x.dtype), x)  # salt or pepper, each w.p. c/2
    elif name == "contrast":
        means = x.mean(dim=spatial, keepdim=True)
        out = (x - means) * c + means
    elif name == "brightness":
        if x.ndim == 4 and x.shape[1] == 3:  # HSV value channel, closed form
            v = x.amax(dim=1, keepdim=True)
            v_new = (v + c).clamp(0, 1)
            out = torch.where(v > 0, x * v_new / v.clamp(min=1e-12), v_new.expand_as(x))
        else:
            out = x + c
    elif name == "gaussian_blur":
        out = _blur(x, _gaussian_kernel(c))
    elif name == "defocus_blur":
        kernel = _disk_kernel(*c).to(x.device, x.dtype)
        if x.ndim == 2:  # a signal: the kernel's central row, renormalised
            row = kernel[kernel.shape[0] // 2]
            out = _blur(x, row / row.sum())
        else:
            kh, kw = kernel.shape
            n, ch, h, w = x.shape
            padded = F.pad(x.reshape(n * ch, 1, h, w), (kw // 2, kw // 2, kh // 2, kh // 2), mode="reflect")
            out = F.conv2d(padded, kernel.view(1, 1, kh, kw)).view(n, ch, h, w)
    elif name == "pixelate":
        if x.ndim == 2:
            small = F.interpolate(x.unsqueeze(1), size=max(1, int(x.shape[1] * c)), mode="area")
            out = F.interpolate(small, size=x.shape[1], mode="nearest").squeeze(1)
        else:
            h, w = x.shape[2:]
            small = F.interpolate(x, size=(max(1, int(h * c)), max(1, int(w * c))), mode="area")
            out = F.interpolate(small, size=(h, w), mode="nearest")
    else:  # fog
        strength, decay = c
        size = 2 ** math.ceil(math.log2(max(x.shape[-2:] if x.ndim == 4 else x.shape[-1:])))
        rng = np.random.default_rng(int(torch.randint(2**31, (1,), generator=generator)))
        fields = np.stack([_plasma(size, decay, rng) for _ in range(len(x))])
        if x.ndim == 4:
            field = torch.as_tensor(fields[:, None, : x.shape[2], : x.shape[3]], dtype=x.dtype, device=x.device)
        else:
            field = torch.as_tensor(fields[:, 0, : x.shape[1]], dtype=x.dtype, device=x.device)
        m = x.amax(dim=spatial, keepdim=True) if x.ndim == 2 else x.amax(dim=(1, 2, 3), keepdim=True)
        out = (x + strength * field) * m / (m + strength)
    return out.clamp(0, 1)


def corrupt_signals(
    x: Tensor, name: str, severity: int, low: float, high: float, generator: torch.Generator | None = None
) -> Tensor:
    """1-D signals in any range: mapped to [0, 1] with the data set's ``low``/``high``, corrupted by
    :func:`corrupt` (its 1-D analogues), mapped back."""
    unit = ((x - low) / (high - low)).clamp(0, 1)
    return corrupt(unit, name, severity, generator) * (high - low) + low
