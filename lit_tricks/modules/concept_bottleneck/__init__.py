"""Concept bottleneck models (CBM, hybrid CBM), concept embedding models (CEM), post-hoc CBMs, Sparse-CBM, LaBo,
DN-CBM, ECBM and KnoBo, one file per method (each imported on first use)."""

from lit_tricks import lazy_exports

_EXPORTS = {
    "lit_tricks.modules.concept_bottleneck.base": ("ConceptModule", "unpack_concept_batch"),
    "lit_tricks.modules.concept_bottleneck.cbm": ("ConceptBottleneckModel",),
    "lit_tricks.modules.concept_bottleneck.cem": ("ConceptEmbeddingModel",),
    "lit_tricks.modules.concept_bottleneck.ecbm": ("ECBM",),
    "lit_tricks.modules.concept_bottleneck.dn_cbm": ("DNCBM", "DNCBMAutoencoder", "SparseAutoencoder"),
    "lit_tricks.modules.concept_bottleneck.knobo": ("KnoBo",),
    "lit_tricks.modules.concept_bottleneck.labo": ("LaBo",),
    "lit_tricks.modules.concept_bottleneck.post_hoc": ("PostHocCBM",),
    "lit_tricks.modules.concept_bottleneck.sparse": ("SparseCBM",),
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(name for names in _EXPORTS.values() for name in names)
