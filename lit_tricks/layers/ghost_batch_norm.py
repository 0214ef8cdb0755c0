"""Ghost Batch Normalization (Hoffer, Hubara and Soudry, "Train longer, generalize better", NeurIPS 2017)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from lit_tricks.core.checks import check_number

_PLAIN_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class GhostBatchNorm(_BatchNorm):
    """Batch normalisation over "ghost" chunks of ``virtual_batch_size`` samples instead of the whole batch.

    In training the batch of ``N`` samples is cut, in order, into chunks of ``virtual_batch_size`` (the last
    chunk holds the remainder; a remainder with one value per channel, which has no variance, joins the chunk
    before it). Chunk ``g`` is normalised with its own statistics:

        y = (x - mu_g) / sqrt(var_g + eps) * weight + bias,   mu_g, var_g over the chunk's samples (and positions)

    The running statistics are updated once per chunk, in chunk order, as if each chunk were its own
    forward pass (what the authors' code does: it runs the model on each chunk): with ``a = momentum``,
    ``r <- (1 - a) r + a s_g`` for ``g = 1..G`` (unbiased chunk variance), i.e. in closed form
    ``r <- (1 - a)^G r + sum_g a (1 - a)^(G - g) s_g``; ``num_batches_tracked`` grows by ``G`` (with
    ``momentum=None`` each chunk is one more term of the cumulative average). A batch of at most
    ``virtual_batch_size`` samples is plain batch normalisation. In eval mode (with running statistics) it is
    plain batch normalisation too. The equal chunks go through one fused ``batch_norm`` call, laid side by side
    as channels (``[v, G * C, *]``), and the remainder through a second: no loop over chunks or samples.

    Parameters and buffers are those of ``torch.nn.BatchNorm*d``, with the same names, so checkpoints load both
    ways. Build one from an existing layer with :meth:`from_batch_norm` or swap a whole model with
    :func:`ghost_batch_norm`.

    Args:
        num_features: channels ``C`` of the input ``[N, C, *]``.
        virtual_batch_size: samples per chunk.
        eps, momentum, affine, track_running_stats: as in ``torch.nn.BatchNorm2d``.
    """

    def __init__(
        self,
        num_features: int,
        virtual_batch_size: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        check_number("virtual_batch_size", virtual_batch_size, at_least=1, integer=True)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.virtual_batch_size = virtual_batch_size

    @classmethod
    def from_batch_norm(cls, bn: _BatchNorm, virtual_batch_size: int) -> GhostBatchNorm:
        """A ghost layer that shares ``bn``'s parameters and buffers (the very tensors) and training mode."""
        ghost = cls(
            bn.num_features, virtual_batch_size, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, device="meta"
        )
        for name, value in [*bn.named_parameters(recurse=False), *bn.named_buffers(recurse=False)]:
            setattr(ghost, name, value)
        return ghost.train(bn.training)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, virtual_batch_size={self.virtual_batch_size}"

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"GhostBatchNorm expects an input [N, C, *] with at least 2 dims, got {input.dim()}.")

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        batch_stats = self.training or not self.track_running_stats
        n, v = input.shape[0], self.virtual_batch_size
        positions = input[0, 0].numel()
        full, rest = divmod(n, v)
        if rest * positions == 1 and full > 0:  # a lone value per channel has no variance: join the last chunk
            full, rest = full - 1, rest + v
        if not batch_stats or full == 0 or (full == 1 and rest == 0):
            return super().forward(input)  # eval with running statistics, or a single chunk: plain BatchNorm

        means, variances = [], []
        outs = [self._normalise(input[: full * v], full, means, variances)]
        if rest:
            outs.append(self._normalise(input[full * v :], 1, means, variances))
        if self.training and self.track_running_stats:
            self._update_running_stats(torch.cat(means), torch.cat(variances))
        return torch.cat(outs) if rest else outs[0]

    def _normalise(self, x: Tensor, chunks: int, means: list[Tensor], variances: list[Tensor]) -> Tensor:
        """Normalise ``chunks`` equal chunks of ``x`` with one fused ``batch_norm`` call: chunk ``g``'s channels
        become channels ``g * C .. (g + 1) * C - 1`` of a ``[chunk size, chunks * C, *]`` tensor. Scratch
        running statistics with momentum 1 receive each chunk's mean and unbiased variance ``[chunks, C]``."""
        size, c, spatial = x.shape[0] // chunks, x.shape[1], x.shape[2:]
        side_by_side = x.unflatten(0, (chunks, size)).transpose(0, 1).reshape(size, chunks * c, *spatial)
        stats = torch.promote_types(x.dtype, torch.float32)
        mean = torch.zeros(chunks * c, dtype=stats, device=x.device)
        var = torch.ones(chunks * c, dtype=stats, device=x.device)
        weight = None if self.weight is None else self.weight.repeat(chunks)
        bias = None if self.bias is None else self.bias.repeat(chunks)
        out = F.batch_norm(side_by_side, mean, var, weight, bias, True, 1.0, self.eps)
        means.append(mean.view(chunks, c))
        variances.append(var.view(chunks, c))
        return out.unflatten(1, (chunks, c)).transpose(0, 1).reshape(x.shape)

    @torch.no_grad()
    def _update_running_stats(self, means: Tensor, variances: Tensor) -> None:
        """``r <- (1 - a_g) r + a_g s_g`` for each chunk ``g`` in order, in closed form over all chunks."""
        chunks = means.shape[0]
        if self.momentum is None:  # cumulative average: chunk g is term number num_batches_tracked + g
            steps = self.num_batches_tracked + torch.arange(1, chunks + 1, device=means.device)
            factors = 1.0 / steps.to(means.dtype)
        else:
            factors = torch.full((chunks,), self.momentum, dtype=means.dtype, device=means.device)
        kept = torch.cumprod((1 - factors).flip(0), 0).flip(0)  # kept[g] = prod_{j >= g} (1 - a_j)
        weights = factors * torch.cat([kept[1:], kept.new_ones(1)])  # a_g prod_{j > g} (1 - a_j)
        for running, stats in ((self.running_mean, means), (self.running_var, variances)):
            running.mul_(kept[0].to(running.dtype)).add_((weights @ stats).to(running.dtype))
        self.num_batches_tracked.add_(chunks)


def ghost_batch_norm(model: nn.Module, virtual_batch_size: int) -> nn.Module:
    """Swap every ``BatchNorm1d/2d/3d`` of ``model`` for a :class:`GhostBatchNorm` that shares its parameters
    and buffers (state-dict keys unchanged), in place; return ``model``.

    Layers that already are ghost layers take the new ``virtual_batch_size``, so applying it twice is safe.
    ``SyncBatchNorm`` and lazy, not yet initialised layers are refused: they cannot be chunked.

    Example::

        >>> from lit_tricks.nets import CNN2D
        >>> net = ghost_batch_norm(CNN2D(), virtual_batch_size=32)
        >>> type(net.body[0][1]).__name__
        'GhostBatchNorm'
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    if isinstance(model, _BatchNorm):
        raise TypeError("model is itself a BatchNorm layer: use GhostBatchNorm.from_batch_norm(model, ...).")
    check_number("virtual_batch_size", virtual_batch_size, at_least=1, integer=True)
    found = 0
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            where = f"{parent_name}.{name}".lstrip(".")
            if isinstance(child, GhostBatchNorm):
                child.virtual_batch_size = virtual_batch_size
            elif isinstance(child, _PLAIN_BATCH_NORMS):
                setattr(parent, name, GhostBatchNorm.from_batch_norm(child, virtual_batch_size))
            elif isinstance(child, _BatchNorm):
                raise TypeError(
                    f"{where} is a {type(child).__name__}, which ghost_batch_norm cannot chunk: use plain "
                    "BatchNorm1d/2d/3d (run one forward pass first to materialise lazy layers; do not combine "
                    "Ghost BatchNorm with SyncBatchNorm)."
                )
            else:
                continue
            found += 1
    if not found:
        raise ValueError(
            f"{type(model).__name__} has no BatchNorm1d/2d/3d layer for ghost_batch_norm to swap: use a network "
            "with batch normalisation (e.g. lit_tricks.nets.CNN2D), or drop Ghost BatchNorm."
        )
    return model
