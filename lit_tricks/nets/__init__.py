"""Small reference networks. Each has ``forward_features`` and ``forward_head`` besides ``forward``."""

from lit_tricks.nets.cnn import CNN1D, CNN2D
from lit_tricks.nets.mlp import MLP
from lit_tricks.nets.time_conditioned import NonScalingLayerNorm, TimeCNN, TimeMLP

__all__ = ["CNN1D", "CNN2D", "MLP", "NonScalingLayerNorm", "TimeCNN", "TimeMLP"]
