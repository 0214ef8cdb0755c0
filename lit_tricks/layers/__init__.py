"""Model transforms that work on any ``nn.Module``, each also switched on from YAML by a callback."""

from lit_tricks.layers.ghost_batch_norm import GhostBatchNorm, ghost_batch_norm
from lit_tricks.layers.multi_sample_dropout import MultiSampleDropout, multi_sample_dropout, multi_sample_loss
from lit_tricks.layers.nested_dropout import NestedDropout, nested_dropout, nested_dropout_probs, truncation_accuracy
from lit_tricks.layers.tract import TrActConv1d, TrActConv2d, TrActLinear, remove_tract, tract, tract_weight_grad

__all__ = [
    "GhostBatchNorm",
    "MultiSampleDropout",
    "NestedDropout",
    "TrActConv1d",
    "TrActConv2d",
    "TrActLinear",
    "ghost_batch_norm",
    "multi_sample_dropout",
    "multi_sample_loss",
    "nested_dropout",
    "nested_dropout_probs",
    "remove_tract",
    "tract",
    "tract_weight_grad",
    "truncation_accuracy",
]
