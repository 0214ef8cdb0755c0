"""Optimizers: ``torch.optim.Optimizer`` subclasses with multi-tensor (``torch._foreach_*``) updates.

In YAML: ``optimizer: {class_path: lit_tricks.optim.Lion, init_args: {lr: 1e-4}}`` under a ``Classifier``.
"""

from lit_tricks import lazy_exports

_EXPORTS = {
    "lit_tricks.optim.adabelief": ("AdaBelief",),
    "lit_tricks.optim.lion": ("Lion",),
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(name for names in _EXPORTS.values() for name in names)
