"""Model transforms that work on any ``nn.Module``, each also switched on from YAML by a callback."""

from lit_tricks.layers.ghost_batch_norm import GhostBatchNorm, ghost_batch_norm
from lit_tricks.layers.multi_sample_dropout import MultiSampleDropout, multi_sample_dropout, multi_sample_loss
from lit_tricks.layers.tract import TrActConv1d, TrActConv2d, TrActLinear, remove_tract, tract, tract_weight_grad

__all__ = [
    "GhostBatchNorm",
    "MultiSampleDropout",
    "TrActConv1d",
    "TrActConv2d",
    "TrActLinear",
    "ghost_batch_norm",
    "multi_sample_dropout",
    "multi_sample_loss",
    "remove_tract",
    "tract",
    "tract_weight_grad",
]
