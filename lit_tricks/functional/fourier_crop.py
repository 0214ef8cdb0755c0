"""Low-frequency cropping in the Fourier spectrum (EfficientTrain, Wang et al., ICCV 2023)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def spatial_dims(x: Tensor) -> int:
    """Spatial dimensions of a batch: 2 for images ``[N, C, H, W]``, 1 for signals ``[N, L]`` or ``[N, C, L]``."""
    if x.ndim == 4:
        return 2
    if x.ndim in (2, 3):
        return 1
    raise ValueError(
        f"fourier_crop takes images [N, C, H, W] or 1-D signals [N, L] / [N, C, L], got shape {tuple(x.shape)}."
    )


def fourier_crop(x: Tensor, size: int | Sequence[int]) -> Tensor:
    r"""Keep the centred ``B x B`` (images) or ``B`` (signals) low-frequency window of the spectrum and map it
    back to pixels: a smaller input that holds only the lower frequencies of ``x``.

    Per spatial dimension of length :math:`S`, with :math:`X = \mathrm{FFT}(x)` (unnormalised),

    .. math:: \tilde X[k] = \frac{B}{S}\, X[k] \ \text{ for } -\lfloor B/2 \rfloor \le k < \lceil B/2 \rceil,
              \qquad \tilde x = \mathrm{Re}\, \mathrm{IFFT}_B(\tilde X),

    the product of the factors :math:`B/S` over the dimensions keeping the mean (the DC component) and the
    amplitude of every kept frequency, so :math:`\cos(2\pi k n / S)` becomes :math:`\cos(2\pi k m / B)` exactly
    for :math:`|k| < B/2`. For an even :math:`B` this is the authors' ``freq_crop`` (frequencies
    :math:`-B/2 .. B/2 - 1`, scaled by :math:`(B/S)^2` for images, real part); an odd :math:`B` keeps
    :math:`-(B-1)/2 .. (B-1)/2`. ``size == S`` returns ``x`` unchanged.

    Args:
        x: images ``[N, C, H, W]`` (cropped over ``H, W``) or signals ``[N, L]`` / ``[N, C, L]`` (over ``L``),
            floating point.
        size: the new side ``B`` (an int, the same for ``H`` and ``W``) or ``(B_H, B_W)`` for images.

    Returns:
        ``x`` with each spatial side replaced by its ``B``, in ``x``'s dtype.

    Example::

        >>> n = torch.arange(8.0)
        >>> fourier_crop(torch.cos(2 * math.pi * n / 8).view(1, 8), 4).round(decimals=4) + 0.0
        tensor([[ 1.,  0., -1.,  0.]])
    """
    dims = spatial_dims(x)
    if not x.is_floating_point():
        raise TypeError(f"fourier_crop needs floating-point inputs, got {x.dtype}: convert them, e.g. x.float().")
    sizes = (size,) * dims if isinstance(size, int) else tuple(size)
    if len(sizes) != dims or any(isinstance(b, bool) or not isinstance(b, int) for b in sizes):
        raise TypeError(f"size must be an int or {dims} ints for an input of shape {tuple(x.shape)}, got {size!r}.")
    spatial = tuple(x.shape[-dims:])
    if any(not 1 <= b <= s for b, s in zip(sizes, spatial, strict=True)):
        raise ValueError(f"size must be in [1, side] for spatial sides {spatial}, got {size!r}: it crops, never pads.")
    if sizes == spatial:
        return x
    axes = tuple(range(-dims, 0))
    spectrum = torch.fft.fftn(x.float() if x.dtype in (torch.float16, torch.bfloat16) else x, dim=axes)
    for axis, b, s in zip(axes, sizes, spatial, strict=True):
        keep = torch.cat([torch.arange(0, (b + 1) // 2), torch.arange(s - b // 2, s)]).to(x.device)
        spectrum = spectrum.index_select(axis, keep)
    scale = math.prod(b / s for b, s in zip(sizes, spatial, strict=True))
    return torch.fft.ifftn(spectrum * scale, dim=axes).real.to(x.dtype)
