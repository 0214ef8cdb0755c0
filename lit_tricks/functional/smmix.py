r"""SMMix (Chen et al., ICCV 2023): max-min attention region mixing, fine-grained token labels, feature consistency.

For a pair ``(i, j = \pi(i))`` and a square side ``k`` (in patches), the ``k x k`` window of patches where image
``i``'s attention is smallest receives the ``k x k`` window where image ``j``'s attention is largest, patch for
patch in row-major order. The label weight is the kept area, :math:`\lambda = 1 - k^2/P` (``P`` patches).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from lit_tricks.functional.losses import soft_target_cross_entropy


def window_patches(grid: tuple[int, int], k: int, device: torch.device | None = None) -> Tensor:
    """The patch indices ``[W, k*k]`` (row-major inside each window) of every ``k x k`` window of a patch grid
    ``(h, w)`` at stride 1, the windows themselves in row-major order of their top-left corner."""
    h, w = grid
    ids = torch.arange(h * w, device=device).view(h, w)
    return ids.unfold(0, k, 1).unfold(1, k, 1).reshape(-1, k * k)


def max_min_windows(attention: Tensor, grid: tuple[int, int], k: int) -> tuple[Tensor, Tensor]:
    r"""The patches ``[B, k*k]`` of each image's ``k x k`` window of least total attention and of most:
    :math:`\arg\min_W \sum_{p \in W} a_p` and :math:`\arg\max_W \sum_{p \in W} a_p` over all windows ``W`` at
    stride 1 (ties: the first window in row-major order).

    Args:
        attention: ``[B, P]`` attention scores of the patches, ``P = h * w``, row-major.
        grid: the patch grid ``(h, w)``.
        k: the window side, ``1 <= k <= min(h, w)``.
    """
    windows = window_patches(grid, k, attention.device)  # [W, k*k]
    scores = attention[:, windows].sum(dim=-1)  # [B, W]
    return windows[scores.argmin(dim=1)], windows[scores.argmax(dim=1)]


def patchify(images: Tensor, patch: int) -> Tensor:
    """``[B, C, H, W]`` images to ``[B, P, C*p*p]`` patches, row-major over the ``(H/p, W/p)`` grid."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // patch) * (w // patch), c * patch * patch)


def unpatchify(patches: Tensor, shape: torch.Size, patch: int) -> Tensor:
    """The inverse of :func:`patchify` for images of ``shape`` ``[B, C, H, W]``."""
    b, c, h, w = shape
    x = patches.reshape(b, h // patch, w // patch, c, patch, patch).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, h, w)


def smmix_images(
    images: Tensor, attention: Tensor, grid: tuple[int, int], k: int, perm: Tensor
) -> tuple[Tensor, Tensor, float]:
    r"""Max-min attention region mixing: image ``i``'s least-attended ``k x k`` patch window is replaced by its
    partner ``perm[i]``'s most-attended window (both found by :func:`max_min_windows`).

    Args:
        images: ``[B, C, H, W]``, with ``H/h = W/w`` the patch size.
        attention: ``[B, P]`` attention scores of the unmixed images' patches.
        grid: the patch grid ``(h, w)``.
        k: the window side in patches.
        perm: ``[B]`` partners.

    Returns:
        the mixed images (a new tensor), ``source_mask`` ``[B, P]`` (True on the pasted patches) and the area
        weight of the image's own label, :math:`\lambda = 1 - k^2/P`.
    """
    patch = images.shape[-1] // grid[1]
    low, high = max_min_windows(attention, grid, k)
    patches = patchify(images, patch)
    rows = torch.arange(len(images), device=images.device).unsqueeze(1)
    mixed = patches.clone()
    mixed[rows, low] = patches[perm.unsqueeze(1), high[perm]]
    source_mask = torch.zeros(attention.shape, dtype=torch.bool, device=images.device)
    source_mask[rows, low] = True
    return unpatchify(mixed, images.shape, patch), source_mask, 1.0 - k * k / attention.shape[1]


def fine_grained_loss(
    patch_tokens: Tensor,
    source_mask: Tensor,
    head: Callable[[Tensor], Tensor],
    own_targets: Tensor,
    partner_targets: Tensor,
) -> Tensor:
    r"""SMMix's fine-grained label assignment: the mean token of each region of a mixed image is classified as
    the image the region came from,

    .. math:: \mathcal L_{fine} = \tfrac12\big[\mathrm{CE}(h(\bar t_{own}), y_i)
              + \mathrm{CE}(h(\bar t_{src}), y_j)\big],

    with :math:`\bar t_{own}`, :math:`\bar t_{src}` the mean output patch tokens outside / inside ``source_mask``,
    averaged over the batch.

    Args:
        patch_tokens: ``[B, P, D]`` output patch tokens of the mixed images (no CLS token).
        source_mask: ``[B, P]`` True on the pasted patches.
        head: the token classifier, ``[B, D] -> [B, C]``.
        own_targets, partner_targets: ``[B, C]`` probabilities (or ``[B]`` class ids) of the two images.
    """
    inside = source_mask.unsqueeze(-1).to(patch_tokens.dtype)
    source = (patch_tokens * inside).sum(dim=1) / inside.sum(dim=1)
    own = (patch_tokens * (1 - inside)).sum(dim=1) / (1 - inside).sum(dim=1)
    own_loss = soft_target_cross_entropy(head(own), own_targets)
    source_loss = soft_target_cross_entropy(head(source), partner_targets)
    return 0.5 * (own_loss.mean() + source_loss.mean())


def consistency_loss(logits: Tensor, unmixed_logits: Tensor, perm: Tensor, lam: float) -> Tensor:
    r"""SMMix's feature consistency: the mixed image's prediction is pulled towards the softmax of the unmixed
    images' logits mixed by the label weight,

    .. math:: \mathcal L_{con} = \tfrac1B \sum_i \mathrm{KL}\big(\mathrm{softmax}(\lambda z_i + (1-\lambda) z_{\pi(i)})
              \,\big\|\, \mathrm{softmax}(\hat z_i)\big),

    with :math:`z` the unmixed logits (no gradient) and :math:`\hat z` the mixed image's logits."""
    target = F.softmax(lam * unmixed_logits + (1.0 - lam) * unmixed_logits[perm], dim=-1)
    return F.kl_div(F.log_softmax(logits, dim=-1), target, reduction="batchmean")
