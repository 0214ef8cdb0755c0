"""Pure math with no Lightning: losses, divergences, schedules, mixing, scores."""

from lit_tricks.functional.losses import soft_target_cross_entropy, to_probabilities, weighted_mean

__all__ = ["soft_target_cross_entropy", "to_probabilities", "weighted_mean"]
