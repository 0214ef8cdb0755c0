"""LightningModules: one file per family (each imported on first use)."""

from lit_tricks import lazy_exports

_EXPORTS = {
    "lit_tricks.modules.barlow_twins": ("BarlowTwins",),
    "lit_tricks.modules.classifier": ("Classifier",),
    "lit_tricks.modules.concept_bottleneck.cbm": ("ConceptBottleneckModel",),
    "lit_tricks.modules.concept_bottleneck.cem": ("ConceptEmbeddingModel",),
    "lit_tricks.modules.concept_bottleneck.dn_cbm": ("DNCBM", "DNCBMAutoencoder"),
    "lit_tricks.modules.concept_bottleneck.ecbm": ("ECBM",),
    "lit_tricks.modules.concept_bottleneck.knobo": ("KnoBo",),
    "lit_tricks.modules.concept_bottleneck.labo": ("LaBo",),
    "lit_tricks.modules.concept_bottleneck.post_hoc": ("PostHocCBM",),
    "lit_tricks.modules.concept_bottleneck.sparse": ("SparseCBM",),
    "lit_tricks.modules.consistency": ("ConsistencyModel",),
    "lit_tricks.modules.dkvb": ("DKVB",),
    "lit_tricks.modules.edm": ("EDMDiffusion",),
    "lit_tricks.modules.generative": ("GenerativeModule",),
    "lit_tricks.modules.hypernetwork": ("LossConditionedRegression",),
    "lit_tricks.modules.metric_learning": ("MetricLearner",),
    "lit_tricks.modules.moco": ("MoCo",),
    "lit_tricks.modules.mvp": ("MVP",),
    "lit_tricks.modules.nmc": ("NearestMeanClassifier",),
    "lit_tricks.modules.tta.adanpc": ("AdaNPC",),
    "lit_tricks.modules.tta.base": ("TTAModule",),
    "lit_tricks.modules.tta.bn_adapt": ("BNAdapt",),
    "lit_tricks.modules.tta.ecotta": ("EcoTTA",),
    "lit_tricks.modules.tta.few_shot": ("FewShotFineTune",),
    "lit_tricks.modules.tta.rmt": ("RMT",),
    "lit_tricks.modules.tta.source_only": ("SourceOnly",),
    "lit_tricks.modules.tta.tent": ("Tent",),
    "lit_tricks.modules.tta.tfup": ("TFUP",),
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(name for names in _EXPORTS.values() for name in names)
