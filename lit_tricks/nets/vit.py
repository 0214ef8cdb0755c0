"""A small Vision Transformer for small images (8x8 digits, 16x16 shapes) whose last attention map can be read."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lit_tricks.core.checks import check_number


class Attention(nn.Module):
    r"""Multi-head self-attention :math:`\mathrm{softmax}(QK^\top/\sqrt{d_h})\,V`, written out so that the
    attention weights can be kept: with ``keep_weights`` set, ``weights`` holds the last call's
    ``[B, heads, T, T]`` (detached; each row sums to 1)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.keep_weights = False
        self.weights: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if not self.keep_weights:  # the fused kernel, when nobody reads the weights
            out = nn.functional.scaled_dot_product_attention(q, k, v)
        else:
            attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
            self.weights = attn.detach()
            out = attn @ v
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """A pre-norm transformer block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    r"""A small Vision Transformer (Dosovitskiy et al., ICLR 2021; DeiT layout): patch embedding by a convolution
    with stride = patch size, a CLS token, learned position embeddings, ``depth`` pre-norm blocks, a final
    LayerNorm and a linear head on the CLS token. Linear layers keep PyTorch's default initialisation (on ~1,000
    digits it leaves the chance-level plateau within an epoch; DeiT's truncated normal with std 0.02 needs several).

    Tokens: :meth:`forward_tokens` returns the normalised tokens ``[B, 1 + P, D]`` (CLS first, then the
    ``P = (H/p)(W/p)`` patches row by row); :meth:`forward_features` the CLS feature ``[B, D]``;
    :meth:`forward_head` the logits. With ``keep_tokens = True`` the last forward's tokens stay in ``tokens``
    (with their graph), so a trick reads them from the module's own training forward.

    Attention: the last block's weights ``[B, heads, 1 + P, 1 + P]`` are kept (detached) in
    ``last_attention`` after every forward; :meth:`cls_attention` (CLS-to-patch) and
    :meth:`patch_attention` (patch-to-patch, averaged over the query patches) reduce them to ``[B, P]``.
    The other blocks use the fused ``scaled_dot_product_attention``.

    Args:
        image_size: image side (square images), divisible by ``patch_size``.
        patch_size: patch side ``p``.
        num_classes: number of outputs.
        in_channels: image channels.
        dim: token width ``D``.
        depth: number of blocks.
        heads: attention heads (``dim`` divisible by it).
        mlp_ratio: hidden width of the blocks' MLP over ``dim``.
        token_head: add ``token_head``, a second linear classifier for pooled patch tokens (SMMix's fine-grained
            labels train it; the CLS head stays the model's output). Under DDP a trick that uses it only on some
            steps needs ``strategy="ddp_find_unused_parameters_true"``.

    Example::

        >>> vit = ViT(image_size=8, patch_size=2, num_classes=10)
        >>> vit(torch.rand(3, 1, 8, 8)).shape, vit.cls_attention().shape, vit.grid_size
        (torch.Size([3, 10]), torch.Size([3, 16]), (4, 4))
    """

    def __init__(
        self,
        image_size: int = 8,
        patch_size: int = 2,
        num_classes: int = 10,
        in_channels: int = 1,
        dim: int = 64,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: float = 2.0,
        token_head: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (("image_size", image_size), ("patch_size", patch_size), ("num_classes", num_classes)):
            check_number(name, value, at_least=1, integer=True)
        for name, value in (("in_channels", in_channels), ("dim", dim), ("depth", depth), ("heads", heads)):
            check_number(name, value, at_least=1, integer=True)
        check_number("mlp_ratio", mlp_ratio, above=0.0)
        if image_size % patch_size:
            raise ValueError(
                f"image_size={image_size} is not divisible by patch_size={patch_size}: choose a patch size that "
                "divides the image side (e.g. 2 or 4 for 8x8 digits)."
            )
        if dim % heads:
            raise ValueError(f"dim={dim} is not divisible by heads={heads}: e.g. dim=64, heads=4.")
        side = image_size // patch_size
        self.image_size, self.patch_size, self.grid_size = image_size, patch_size, (side, side)
        self.num_features = dim
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + side * side, dim))
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.blocks[-1].attn.keep_weights = True
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self.token_head = nn.Linear(dim, num_classes) if token_head else None
        self.keep_tokens = False
        self.tokens: Tensor | None = None
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    @property
    def last_attention(self) -> Tensor | None:
        """The last block's attention weights ``[B, heads, 1 + P, 1 + P]`` of the last forward (``None`` before)."""
        return self.blocks[-1].attn.weights

    def cls_attention(self) -> Tensor:
        """The last forward's CLS-to-patch attention ``[B, P]``, averaged over heads."""
        return self._attention()[:, :, 0, 1:].mean(dim=1)

    def patch_attention(self) -> Tensor:
        """The last forward's attention each patch receives from the patches ``[B, P]``: the patch-to-patch
        weights averaged over heads and query patches (what SMMix's code reads)."""
        return self._attention()[:, :, 1:, 1:].mean(dim=(1, 2))

    def forward_tokens(self, x: Tensor) -> Tensor:
        """Normalised output tokens ``[B, 1 + P, D]``: the CLS token first, then the patches row by row."""
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"ViT(image_size={self.image_size}) got images of size {tuple(x.shape[-2:])}: build it with the "
                "data's image size (and as_image=True for DigitsDataModule)."
            )
        patches = self.patch_embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(len(x), -1, -1), patches], dim=1) + self.pos_embed
        for block in self.blocks:
            tokens = block(tokens)
        tokens = self.norm(tokens)
        self.tokens = tokens if self.keep_tokens else None
        return tokens

    def forward_features(self, x: Tensor) -> Tensor:
        return self.forward_tokens(x)[:, 0]

    def forward_head(self, features: Tensor) -> Tensor:
        return self.head(features)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.forward_features(x))

    def _attention(self) -> Tensor:
        if self.last_attention is None:
            raise RuntimeError("No attention map yet: run the ViT forward first.")
        return self.last_attention
