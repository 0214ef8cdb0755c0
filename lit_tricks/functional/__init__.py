"""Pure math with no Lightning: losses, divergences, schedules, mixing, scores."""

from lit_tricks.functional.data_diet import el2n_scores, grand_scores, keep_by_scores, load_scores
from lit_tricks.functional.distillation import distillation_kl, pskd_alpha, pskd_targets, sigmoid_rampup
from lit_tricks.functional.elr import elr_penalty, elr_probabilities, elr_targets
from lit_tricks.functional.ema import ema_decay, ema_update_, half_life_to_decay
from lit_tricks.functional.losses import soft_target_cross_entropy, to_probabilities, weighted_mean
from lit_tricks.functional.mixing import (
    cutmix_,
    cutmix_box,
    cutmix_masks,
    mixed_one_hot,
    mixup_,
    one_hot,
    paste_box_,
    sample_mixing,
    smooth_labels,
)
from lit_tricks.functional.reweighting import normalize_losses, reweighting_weights, strategy_scores
from lit_tricks.functional.selective_backprop import select_by_loss, selection_probabilities
from lit_tricks.functional.tta import (
    class_prototypes,
    default_augment,
    filtered_entropy,
    knn_probabilities,
    prototype_contrastive_loss,
    softmax_entropy,
    symmetric_cross_entropy,
)

__all__ = [
    "class_prototypes",
    "default_augment",
    "filtered_entropy",
    "knn_probabilities",
    "prototype_contrastive_loss",
    "softmax_entropy",
    "symmetric_cross_entropy",
    "el2n_scores",
    "grand_scores",
    "keep_by_scores",
    "load_scores",
    "select_by_loss",
    "selection_probabilities",
    "normalize_losses",
    "reweighting_weights",
    "strategy_scores",
    "elr_penalty",
    "elr_probabilities",
    "elr_targets",
    "cutmix_",
    "cutmix_box",
    "cutmix_masks",
    "paste_box_",
    "mixed_one_hot",
    "one_hot",
    "mixup_",
    "sample_mixing",
    "smooth_labels",
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
