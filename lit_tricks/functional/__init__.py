"""Pure math with no Lightning: losses, divergences, schedules, mixing, scores."""

from lit_tricks.functional.distillation import distillation_kl, pskd_alpha, pskd_targets, sigmoid_rampup
from lit_tricks.functional.ema import ema_decay, ema_update_, half_life_to_decay
from lit_tricks.functional.losses import soft_target_cross_entropy, to_probabilities, weighted_mean

__all__ = [
    "distillation_kl",
    "pskd_alpha",
    "pskd_targets",
    "sigmoid_rampup",
    "ema_decay",
    "ema_update_",
    "half_life_to_decay",
    "soft_target_cross_entropy",
    "to_probabilities",
    "weighted_mean",
]
