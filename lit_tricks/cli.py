"""``python -m lit_tricks {fit,validate,test,predict} --config A.yaml [--config B.yaml ...]``.

Later ``--config`` files override earlier ones key by key; add-on snippets in ``configs/tricks/`` append
their callbacks with ``trainer: callbacks+: [...]`` (a plain ``callbacks:`` would replace the list).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import lightning.pytorch as pl
from jsonargparse import DefaultHelpFormatter
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import LightningCLI
from torch import nn

import lit_tricks
import lit_tricks.data
import lit_tricks.nets
from lit_tricks.core.trick import Trick


def catalogue() -> str:
    """The public parts of lit_tricks, by kind, as the ``class_path`` names a config uses."""
    kinds: dict[str, list[str]] = {"tricks": [], "callbacks": [], "modules": [], "data": [], "nets": []}
    for package in (lit_tricks, lit_tricks.data, lit_tricks.nets):
        for name in package.__all__:
            obj = getattr(package, name)
            if not inspect.isclass(obj):
                continue
            path = f"{package.__name__}.{name}"
            if issubclass(obj, Trick):
                kind = "callbacks" if obj is Trick else "tricks"
            elif issubclass(obj, Callback):
                kind = "callbacks"
            elif issubclass(obj, pl.LightningModule):
                kind = "modules"
            elif issubclass(obj, pl.LightningDataModule):
                kind = "data"
            elif issubclass(obj, nn.Module):
                kind = "nets"
            else:
                continue
            if obj is not Trick:
                kinds[kind].append(path)
    lines = ["lit_tricks parts (use as class_path in a --config file):"]
    for kind, paths in kinds.items():
        lines.append(f"  {kind:<10} {', '.join(sorted(paths)) or '(none yet)'}")
    lines.append("Example: python -m lit_tricks fit --config configs/quickstart.yaml")
    return "\n".join(lines)


class _RawEpilogFormatter(DefaultHelpFormatter):
    """Keep the line breaks of the description and the epilog."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "".join(indent + line for line in text.splitlines(keepends=True))


class LitTricksCLI(LightningCLI):
    """LightningCLI for any LightningModule and LightningDataModule given by ``class_path``.

    ``--help`` ends with the catalogue of lit_tricks' tricks, modules, data modules and nets.
    """

    def __init__(self, args: Sequence[str] | None = None, **kwargs) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_kwargs", {})
        kwargs["parser_kwargs"].setdefault("epilog", catalogue())
        kwargs["parser_kwargs"].setdefault("formatter_class", _RawEpilogFormatter)
        super().__init__(
            model_class=pl.LightningModule,
            datamodule_class=pl.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=args,
            **kwargs,
        )


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of ``python -m lit_tricks`` and the ``lit-tricks`` script."""
    LitTricksCLI(args=args)
