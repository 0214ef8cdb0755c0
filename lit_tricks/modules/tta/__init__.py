"""Test-time adaptation: LightningModules that adapt a trained source model while they predict a test stream,
one file per method (each imported on first use)."""

from lit_tricks import lazy_exports

_EXPORTS = {
    "lit_tricks.modules.tta.adanpc": ("AdaNPC",),
    "lit_tricks.modules.tta.base": ("TTAModule", "load_source_weights", "use_batch_statistics"),
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
