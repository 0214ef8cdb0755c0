"""Small reference networks. Each has ``forward_features`` and ``forward_head`` besides ``forward``."""

from lit_tricks import lazy_exports

_EXPORTS = {
    "lit_tricks.nets.cnn": ("CNN1D", "CNN2D"),
    "lit_tricks.nets.hypernetwork": ("HyperNetwork", "encode_input"),
    "lit_tricks.nets.mlp": ("MLP",),
    "lit_tricks.nets.output_scale": ("OutputScale", "lazy_rich_lr"),
    "lit_tricks.nets.time_conditioned": ("NonScalingLayerNorm", "TimeCNN", "TimeMLP"),
    "lit_tricks.nets.vit": ("ViT",),
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(name for names in _EXPORTS.values() for name in names)
