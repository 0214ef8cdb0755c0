"""lit_tricks: training techniques from recent deep-learning papers as PyTorch Lightning parts.

Public names are imported on first use (``from lit_tricks import Mixup`` works as usual), so that
``python -m lit_tricks --help`` answers without importing torch and Lightning.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping

__version__ = "0.1.0"

_SUBPACKAGES = ("callbacks", "cli", "core", "data", "functional", "metrics", "modules", "nets", "optim", "layers")


def lazy_exports(package: str, exports: Mapping[str, tuple[str, ...]]) -> tuple[Callable, Callable]:
    """A module-level ``__getattr__`` and ``__dir__`` for ``package`` that import each public name from its
    module (``exports``: module -> names) on first access, and the package's subpackages likewise."""
    where = {name: module for module, names in exports.items() for name in names}

    def __getattr__(name: str) -> object:
        if name in where:
            value = getattr(importlib.import_module(where[name]), name)
        elif package == __name__ and name in _SUBPACKAGES:
            value = importlib.import_module(f"{package}.{name}")
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        setattr(sys.modules[package], name, value)  # later look-ups skip __getattr__
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *where})

    return __getattr__, __dir__


_EXPORTS = {
    "lit_tricks.callbacks.adawac": ("AdaWAC",),
    "lit_tricks.callbacks.adversarial_training": ("AdversarialTraining",),
    "lit_tricks.callbacks.bias_loss": ("BiasLoss",),
    "lit_tricks.callbacks.concept_metrics": ("ConceptMetrics",),
    "lit_tricks.callbacks.continual_evaluation": ("ContinualEvaluation",),
    "lit_tricks.callbacks.data_diet": ("DataDietScores",),
    "lit_tricks.callbacks.distill": ("Distill",),
    "lit_tricks.callbacks.efficient_train": ("EfficientTrain",),
    "lit_tricks.callbacks.elr": ("ELR",),
    "lit_tricks.callbacks.ema_teacher": ("EMATeacher",),
    "lit_tricks.callbacks.ensloss": ("EnsLoss",),
    "lit_tricks.callbacks.experience_replay": ("ExperienceReplay",),
    "lit_tricks.callbacks.fpf": ("FPF",),
    "lit_tricks.callbacks.ghost_batch_norm": ("ApplyGhostBatchNorm",),
    "lit_tricks.callbacks.hard_batches": ("HardBatches",),
    "lit_tricks.callbacks.ldr": ("LDRLoss",),
    "lit_tricks.callbacks.mic": ("MIC",),
    "lit_tricks.callbacks.mixoe": ("MixOE",),
    "lit_tricks.callbacks.mixup": ("CutMix", "Mixup"),
    "lit_tricks.callbacks.multi_sample_dropout": ("ApplyMultiSampleDropout",),
    "lit_tricks.callbacks.nested_dropout": ("ApplyNestedDropout",),
    "lit_tricks.callbacks.neural_collapse": ("NeuralCollapse",),
    "lit_tricks.callbacks.ood_evaluation": ("OODEvaluation",),
    "lit_tricks.callbacks.outlier_exposure": ("OutlierExposure",),
    "lit_tricks.callbacks.perp_grad": ("PerpendicularGradient",),
    "lit_tricks.callbacks.prd": ("PRD",),
    "lit_tricks.callbacks.rcal": ("RCAL",),
    "lit_tricks.callbacks.sample_reweighting": ("SampleReweighting",),
    "lit_tricks.callbacks.sbcl": ("SBCL",),
    "lit_tricks.callbacks.selective_backprop": ("SelectiveBackprop",),
    "lit_tricks.callbacks.self_distill": ("SelfDistill",),
    "lit_tricks.callbacks.sla": ("SLA", "sla_head"),
    "lit_tricks.callbacks.smmix": ("SMMix",),
    "lit_tricks.callbacks.temperature_scaling": ("TemperatureScaling",),
    "lit_tricks.callbacks.tract": ("ApplyTrAct",),
    "lit_tricks.core.batch": ("StepOutput", "TrickBatch"),
    "lit_tricks.core.module": ("TrickModule",),
    "lit_tricks.core.trick": ("Trick",),
    "lit_tricks.modules.barlow_twins": ("BarlowTwins",),
    "lit_tricks.modules.classifier": ("Classifier",),
    "lit_tricks.modules.concept_bottleneck.cbm": ("ConceptBottleneckModel",),
    "lit_tricks.modules.concept_bottleneck.cem": ("ConceptEmbeddingModel",),
    "lit_tricks.modules.concept_bottleneck.dn_cbm": ("DNCBM", "DNCBMAutoencoder"),
    "lit_tricks.modules.concept_bottleneck.ecbm": ("ECBM",),
    "lit_tricks.modules.concept_bottleneck.knobo": ("KnoBo",),
    "lit_tricks.modules.concept_bottleneck.labo": ("LaBo",),
    "lit_tricks.modules.concept_bottleneck.post_hoc": ("PostHocCBM",),
    "lit_tricks.modules.consistency": ("ConsistencyModel",),
    "lit_tricks.modules.dkvb": ("DKVB",),
    "lit_tricks.modules.metric_learning": ("MetricLearner",),
    "lit_tricks.modules.moco": ("MoCo",),
    "lit_tricks.modules.mvp": ("MVP",),
    "lit_tricks.modules.nmc": ("NearestMeanClassifier",),
    "lit_tricks.modules.tta.adanpc": ("AdaNPC",),
    "lit_tricks.modules.tta.bn_adapt": ("BNAdapt",),
    "lit_tricks.modules.tta.ecotta": ("EcoTTA",),
    "lit_tricks.modules.tta.few_shot": ("FewShotFineTune",),
    "lit_tricks.modules.tta.rmt": ("RMT",),
    "lit_tricks.modules.tta.tent": ("Tent",),
    "lit_tricks.modules.tta.tfup": ("TFUP",),
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = sorted(name for names in _EXPORTS.values() for name in names)
