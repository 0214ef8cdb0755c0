"""Pure math with no Lightning: losses, divergences, schedules, mixing, scores."""

from lit_tricks.functional.adawac import adawac_consistency, adawac_objective, adawac_weights
from lit_tricks.functional.barlow_twins import (
    barlow_twins_loss,
    cross_correlation,
    mixbt_loss,
    mixbt_targets,
    standardise,
)
from lit_tricks.functional.concept_metrics import (
    concept_activation_maps,
    concept_existence,
    concept_global_importance,
    concept_location,
    input_gradient_maps,
)
from lit_tricks.functional.constrained_cbm import (
    concept_saliency,
    cooccurrence_matrix,
    independence_weights,
    pointing_game,
    saliency_in_region,
)
from lit_tricks.functional.data_diet import el2n_scores, grand_scores, keep_by_scores, load_scores
from lit_tricks.functional.distillation import distillation_kl, pskd_alpha, pskd_targets, sigmoid_rampup
from lit_tricks.functional.dkvb import ema_kmeans_step, nearest_keys, retrieve
from lit_tricks.functional.dn_cbm import name_directions, probe_l1, resample_dead_neurons, sae_loss
from lit_tricks.functional.ecbm import (
    concept_class_joint,
    concept_given_class,
    concept_given_concept,
    ecbm_loss,
    state_prior,
)
from lit_tricks.functional.elr import elr_penalty, elr_probabilities, elr_targets
from lit_tricks.functional.ema import ema_decay, ema_update_, half_life_to_decay
from lit_tricks.functional.fpf import forgetting_prone, group_drift, parameter_groups
from lit_tricks.functional.hard_batches import fixed_batches, hard_batch_round
from lit_tricks.functional.knobo import knobo_ground_concepts, knobo_prior_loss, knobo_prior_matrix
from lit_tricks.functional.labo import (
    labo_class_name_prior,
    labo_class_similarity,
    labo_discriminability,
    labo_init_weights,
    labo_select,
)
from lit_tricks.functional.loss_ranking import highest_losses, kept_count
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
from lit_tricks.functional.mochi import hardest_negatives, mochi_negatives
from lit_tricks.functional.moco import enqueue_, moco_logits, moco_loss
from lit_tricks.functional.neural_collapse import (
    equiangularity,
    equinorm,
    nc1,
    nearest_class_centre,
    neural_collapse,
    self_duality,
)
from lit_tricks.functional.outlier_exposure import mixoe_inputs, mixoe_targets, ood_score, uniform_cross_entropy
from lit_tricks.functional.pgd import class_balanced_weights, pgd_attack
from lit_tricks.functional.prd import prototype_loss, prototype_scores, relation_distillation_loss
from lit_tricks.functional.prior_correction import class_priors, prior_correction
from lit_tricks.functional.reweighting import normalize_losses, reweighting_weights, strategy_scores
from lit_tricks.functional.sbcl import class_temperatures, cluster_subclasses, sbcl_loss, subclass_counts
from lit_tricks.functional.selective_backprop import select_by_loss, selection_probabilities
from lit_tricks.functional.stablemax import log_stablemax, stablemax, stablemax_cross_entropy, stablemax_s
from lit_tricks.functional.temperature_scaling import fit_temperature, scale_logits
from lit_tricks.functional.tfup import cache_shots, kl_similarity, select_cache, tfup_logits
from lit_tricks.functional.tta import (
    class_prototypes,
    default_augment,
    filtered_entropy,
    knn_probabilities,
    prototype_contrastive_loss,
    softmax_entropy,
    symmetric_cross_entropy,
)
from lit_tricks.functional.vl_embeddings import check_embedding_pair, embed

__all__ = [
    "adawac_consistency",
    "adawac_objective",
    "adawac_weights",
    "barlow_twins_loss",
    "cache_shots",
    "check_embedding_pair",
    "class_balanced_weights",
    "class_priors",
    "class_prototypes",
    "class_temperatures",
    "cluster_subclasses",
    "concept_activation_maps",
    "concept_class_joint",
    "concept_existence",
    "concept_given_class",
    "concept_given_concept",
    "concept_global_importance",
    "concept_location",
    "concept_saliency",
    "cooccurrence_matrix",
    "cross_correlation",
    "cutmix_",
    "cutmix_box",
    "cutmix_masks",
    "default_augment",
    "distillation_kl",
    "ecbm_loss",
    "el2n_scores",
    "elr_penalty",
    "elr_probabilities",
    "elr_targets",
    "ema_decay",
    "ema_kmeans_step",
    "ema_update_",
    "embed",
    "enqueue_",
    "equiangularity",
    "equinorm",
    "filtered_entropy",
    "fit_temperature",
    "fixed_batches",
    "forgetting_prone",
    "grand_scores",
    "group_drift",
    "half_life_to_decay",
    "hard_batch_round",
    "hardest_negatives",
    "highest_losses",
    "independence_weights",
    "input_gradient_maps",
    "keep_by_scores",
    "kept_count",
    "kl_similarity",
    "knn_probabilities",
    "knobo_ground_concepts",
    "knobo_prior_loss",
    "knobo_prior_matrix",
    "labo_class_name_prior",
    "labo_class_similarity",
    "labo_discriminability",
    "labo_init_weights",
    "labo_select",
    "load_scores",
    "log_stablemax",
    "mixbt_loss",
    "mixbt_targets",
    "mixed_one_hot",
    "mixoe_inputs",
    "mixoe_targets",
    "mixup_",
    "mochi_negatives",
    "moco_logits",
    "moco_loss",
    "name_directions",
    "nc1",
    "nearest_class_centre",
    "nearest_keys",
    "neural_collapse",
    "normalize_losses",
    "one_hot",
    "ood_score",
    "parameter_groups",
    "paste_box_",
    "pgd_attack",
    "pointing_game",
    "prior_correction",
    "probe_l1",
    "prototype_contrastive_loss",
    "prototype_loss",
    "prototype_scores",
    "pskd_alpha",
    "pskd_targets",
    "relation_distillation_loss",
    "resample_dead_neurons",
    "retrieve",
    "reweighting_weights",
    "sae_loss",
    "saliency_in_region",
    "sample_mixing",
    "sbcl_loss",
    "scale_logits",
    "select_by_loss",
    "select_cache",
    "selection_probabilities",
    "self_duality",
    "sigmoid_rampup",
    "smooth_labels",
    "soft_target_cross_entropy",
    "softmax_entropy",
    "stablemax",
    "stablemax_cross_entropy",
    "stablemax_s",
    "standardise",
    "state_prior",
    "strategy_scores",
    "subclass_counts",
    "symmetric_cross_entropy",
    "tfup_logits",
    "to_probabilities",
    "uniform_cross_entropy",
    "weighted_mean",
]
