"""LightningModules: one file per family (each imported on first use)."""

from lit_tricks import lazy_exports

_EXPORTS = {
    "lit_tricks.modules.classifier": ("Classifier",),
    "lit_tricks.modules.concept_bottleneck": (
        "ConceptBottleneckModel",
        "ConceptEmbeddingModel",
        "PostHocCBM",
        "SparseCBM",
    ),
    "lit_tricks.modules.consistency": ("ConsistencyModel",),
    "lit_tricks.modules.edm": ("EDMDiffusion",),
    "lit_tricks.modules.generative": ("GenerativeModule",),
    "lit_tricks.modules.hypernetwork": ("LossConditionedRegression",),
    "lit_tricks.modules.tta": ("RMT", "AdaNPC", "BNAdapt", "EcoTTA", "SourceOnly", "Tent", "TTAModule"),
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(name for names in _EXPORTS.values() for name in names)
