"""Mixup and CutMix on batches: partner permutations, mixing weights, boxes, in-place mixing of inputs and targets."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor


def sample_mixing(
    rng: np.random.Generator, n: int, alpha: float, per_sample: bool, device: torch.device
) -> tuple[Tensor, Tensor]:
    r"""Partners and weights of one batch: ``perm`` ``[N]`` on ``device`` (a random permutation, so odd batch
    sizes work) and :math:`\lambda \sim \mathrm{Beta}(\alpha, \alpha)`, one for the batch (shape ``[1]``) or
    one per sample (``[N]``), left on the host in float64 as numpy drew it (the mixing functions move it; a
    batch's box is computed from it, as the references do, without a device synchronisation). Drawn from ``rng``."""
    perm = torch.as_tensor(rng.permutation(n), device=device)
    lam = torch.as_tensor(rng.beta(alpha, alpha, size=n if per_sample else 1), dtype=torch.float64)
    return perm, lam


def mixup_(inputs: Tensor, perm: Tensor, lam: Tensor | float) -> Tensor:
    r"""In place, :math:`x_i \leftarrow \lambda_i x_i + (1 - \lambda_i) x_{\pi(i)}` (Zhang et al., 2018);
    for inputs and for probability targets ``[N, C]`` alike. ``lam``: one number for the batch, or ``[N]``
    (or ``[1]``) weights."""
    if isinstance(lam, Tensor):
        lam = lam.to(device=inputs.device, dtype=inputs.dtype, non_blocking=True).view(-1, *[1] * (inputs.ndim - 1))
    partners = inputs.index_select(0, perm)  # a gathered copy, so the in-place update reads unmixed partners
    return inputs.lerp_(partners, 1.0 - lam)  # x + (1 - lam)(x_perm - x): one pass over the inputs


def cutmix_masks(
    sizes: tuple[int, ...], lam: Tensor, rng: np.random.Generator, device: torch.device | None = None
) -> tuple[Tensor, Tensor]:
    r"""CutMix regions (Yun et al., 2019): per row of ``lam``, a box (or a segment for 1-D signals) of side
    about :math:`S\sqrt[d]{1 - \lambda}` along each axis of size :math:`S`, centred uniformly and clipped.

    The box follows ``rand_bbox`` of the official code (clovaai/CutMix-PyTorch) and of timm: along each axis,
    in order, a centre :math:`c \sim \mathcal U\{0, \dots, S-1\}`, a half-side
    :math:`h = \lfloor \lfloor S \sqrt[d]{1-\lambda} \rfloor / 2 \rfloor` and the region
    :math:`[\max(c - h, 0), \min(c + h, S))`. Its side :math:`2h` is even, on average one pixel shorter than
    the paper's :math:`S\sqrt{1-\lambda}` before clipping; the corrected :math:`\lambda` below keeps the
    labels equal to the pasted fraction either way.

    Args:
        sizes: the spatial sizes, ``(L,)`` for signals or ``(H, W)`` for images.
        lam: ``[B]`` drawn weights on the host (``B`` = 1 for one box per batch).
        rng: the generator of the centres.
        device: where to build the masks (default: ``lam``'s device).

    Returns:
        ``mask`` ``[B, *sizes]`` (True inside the pasted region) and the corrected
        :math:`\lambda = 1 - \text{area}/\text{total}` ``[B]`` of the clipped regions.
    """
    device = lam.device if device is None else device
    d, rows = len(sizes), len(lam)
    # the side fraction in float64 with numpy's (correctly rounded) sqrt, so that the floor below matches the
    # references' arithmetic exactly (torch's float64 sqrt and pow(x, 0.5) can be one ulp off)
    kept = np.clip(1.0 - lam.detach().cpu().double().numpy(), 0.0, 1.0)
    ratio = np.sqrt(kept) if d == 2 else kept ** (1.0 / d)  # [B]
    mask = torch.ones(rows, *sizes, dtype=torch.bool, device=device)
    for axis, size in enumerate(sizes):
        centre = rng.integers(0, size, size=rows)
        half = np.floor(ratio * size).astype(np.int64) // 2
        low = torch.as_tensor(np.clip(centre - half, 0, size), device=device)
        high = torch.as_tensor(np.clip(centre + half, 0, size), device=device)
        coords = torch.arange(size, device=device)
        inside = (coords >= low[:, None]) & (coords < high[:, None])  # [B, size]
        mask &= inside.view(rows, *[size if a == axis else 1 for a in range(d)])
    area = mask.flatten(1).float().mean(dim=1)
    return mask, 1.0 - area


def cutmix_box(sizes: tuple[int, ...], lam: float, rng: np.random.Generator) -> tuple[tuple[slice, ...], float]:
    r"""One CutMix region for the whole batch, as slices, computed on the host: the same region and corrected
    :math:`\lambda` as :func:`cutmix_masks` with one row (and the same draws from ``rng``), i.e. the official
    code's and timm's ``rand_bbox`` with half-side ``int(S * (1 - lam) ** (1 / d)) // 2``."""
    kept = min(max(1.0 - lam, 0.0), 1.0)
    ratio = math.sqrt(kept) if len(sizes) == 2 else kept ** (1.0 / len(sizes))
    region, area = [], 1.0
    for size in sizes:
        centre = int(rng.integers(0, size, size=1)[0])
        half = int(ratio * size) // 2
        low, high = min(max(centre - half, 0), size), min(max(centre + half, 0), size)
        region.append(slice(low, high))
        area *= (high - low) / size
    return tuple(region), 1.0 - area


def paste_box_(inputs: Tensor, perm: Tensor, box: tuple[slice, ...]) -> Tensor:
    """In place, paste the partners' ``box`` (slices of the trailing spatial dimensions) into ``inputs``;
    reads and writes only the box, so it costs a fraction of a full-tensor mix."""
    region = inputs[(..., *box)]
    region.copy_(region.index_select(0, perm))  # the gather copies first, so partners are read unmixed
    return inputs


def cutmix_(inputs: Tensor, perm: Tensor, mask: Tensor) -> Tensor:
    """In place, paste ``inputs[perm]`` into ``inputs`` where ``mask`` (``[B, *spatial]``, B = 1 or N) is True;
    channels (the dimensions between batch and spatial) share the mask."""
    channels = inputs.ndim - mask.ndim
    mask = mask.view(mask.shape[0], *([1] * channels), *mask.shape[1:])
    partners = inputs.index_select(0, perm)
    return inputs.copy_(torch.where(mask, partners, inputs))


def one_hot(targets: Tensor, num_classes: int) -> Tensor:
    """Class ids ``[N]`` to float32 one-hot probabilities ``[N, C]`` (whatever the default dtype), in one allocation."""
    probs = torch.zeros(len(targets), num_classes, dtype=torch.float32, device=targets.device)
    return probs.scatter_(1, targets.view(-1, 1), 1.0)


def mixed_one_hot(targets: Tensor, perm: Tensor, lam: Tensor | float, num_classes: int) -> Tensor:
    r"""Mixed one-hot targets :math:`\lambda_i e_{y_i} + (1 - \lambda_i) e_{y_{\pi(i)}}` ``[N, C]`` from class ids,
    written with two scatters: the same as ``mixup_(one_hot(targets, C), perm, lam)`` at a fraction of its cost.
    ``lam``: one number for the batch, or ``[N]`` (or ``[1]``) weights. Float32 whatever the default dtype
    (``precision="bf16-true"`` sets it to bfloat16)."""
    n = len(targets)
    probs = torch.zeros(n, num_classes, dtype=torch.float32, device=targets.device)
    if isinstance(lam, Tensor):
        lam = lam.to(targets.device, torch.float32).expand(n).view(-1, 1)
        partner_weight = 1.0 - lam
    else:
        partner_weight = probs.new_full((n, 1), 1.0 - lam)
    probs.scatter_(1, targets.view(-1, 1), lam)
    return probs.scatter_add_(1, targets.index_select(0, perm).view(-1, 1), partner_weight)


def smooth_labels(probs: Tensor, smoothing: float) -> Tensor:
    r"""Label smoothing :math:`(1 - \epsilon)\,y + \epsilon / C`."""
    return probs * (1.0 - smoothing) + smoothing / probs.shape[-1]
