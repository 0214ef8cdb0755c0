"""The Lightning side of ``python -m lit_tricks``: :class:`LitTricksCLI`, a ``LightningCLI``.

Kept apart from :mod:`lit_tricks.cli` because importing Lightning takes seconds: ``--help`` and the mistakes
:func:`lit_tricks.cli.preflight` finds are answered without it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from jsonargparse import DefaultHelpFormatter
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lit_tricks.cli import (
    PROG,
    ConfigError,
    catalogue,
    check_source_checkpoint,
    condense_error,
    fail,
    fit_summary,
    refusal,
    resolve_checkpoint,
    run_name,
    suggest,
)


class RawEpilogFormatter(DefaultHelpFormatter):
    """Keep the line breaks of the description and the epilog."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "".join(indent + line for line in text.splitlines(keepends=True))


class Parser(LightningArgumentParser):
    """Errors print their cause, short (:func:`condense_error`), not the usage."""

    def error(self, message: str, ex: Exception | None = None) -> None:
        if not self.exit_on_error:
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        unknown = re.match(r"unrecognized arguments: (--[\w.]+)", message, re.IGNORECASE)
        hint = suggest(unknown.group(1), list(parser._option_string_actions)) if unknown else ""
        if re.search(r"arguments are required: .*\bmodel\b", message):
            hint = "; a recipe gives them, e.g. --config configs/quickstart.yaml"
        prog = parser.prog.replace(" [options]", "")
        fail(f"{condense_error(message)}{hint}\n(`{prog} --help` lists the options.)")


class LitTricksCLI(LightningCLI):
    """LightningCLI for any LightningModule and LightningDataModule given by ``class_path``, with named runs,
    checkpoint checks, short errors and an end-of-fit summary (see the module's docstring).

    ``--help`` ends with the catalogue of lit_tricks' tricks, modules, data modules and nets.
    """

    def __init__(self, args: Sequence[str] | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_kwargs", {})
        kwargs["parser_kwargs"].setdefault("prog", PROG)
        kwargs["parser_kwargs"].setdefault("epilog", catalogue())
        kwargs["parser_kwargs"].setdefault("formatter_class", RawEpilogFormatter)
        kwargs.setdefault("parser_class", Parser)
        super().__init__(
            model_class=pl.LightningModule,
            datamodule_class=pl.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=args,
            **kwargs,
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        super().parse_arguments(parser, args)
        command = self.config.get("subcommand")
        config = self.config[command] if command else self.config
        run_name(config)
        check_source_checkpoint(config)
        if command in ("validate", "test", "predict"):
            resolve_checkpoint(config, command)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, TypeError) as error:
            raise ConfigError(refusal(error)) from error

    def after_fit(self) -> None:
        if self.trainer.is_global_zero:
            print(fit_summary(self.trainer, self.config[self.subcommand].get("config") or []))
