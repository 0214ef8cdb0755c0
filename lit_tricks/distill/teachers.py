"""Frozen teachers for distillation: one model or an ensemble, from modules or Lightning checkpoints."""

from __future__ import annotations

import importlib
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import yaml
from torch import Tensor, nn

from lit_tricks.core.checkpoint import load_checkpoint

#: What a teacher can be given as: a checkpoint path, a module, or a list of them (an ensemble); ``os.PathLike``
#: paths are accepted too (left out of the annotation, which jsonargparse would read a YAML list into).
TeacherSpec = str | nn.Module | Sequence[str | nn.Module]

#: State-dict prefix of the distillation loss a student trained with Distill carries; dropped when such a student
#: is loaded as a teacher.
_LOSS_PREFIX = "distill_loss."


def _run_config(path: Path) -> Path | None:
    """The ``config.yaml`` LightningCLI wrote for the run of ``<run>/checkpoints/<name>.ckpt``, if there is one."""
    config = path.parent.parent / "config.yaml"
    return config if config.is_file() else None


def _import_class(class_path: str) -> type:
    module_name, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module_name), name)


def _build_from_config(config: Path) -> pl.LightningModule:
    """Instantiate the ``model`` section of a LightningCLI run config (jsonargparse, as the CLI did)."""
    from jsonargparse import ArgumentParser

    model = yaml.safe_load(config.read_text()).get("model")
    if not isinstance(model, dict) or "class_path" not in model:
        raise ValueError(f"{config} has no 'model' section with a class_path to rebuild the teacher from.")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(pl.LightningModule, "model", fail_untyped=False)
    return parser.instantiate_classes(parser.parse_object({"model": model})).model


def load_teacher(path: str | os.PathLike) -> pl.LightningModule:
    """Rebuild the LightningModule saved in the checkpoint ``path`` and load its weights.

    The module is built from the run's ``config.yaml`` (``<run>/config.yaml`` beside ``<run>/checkpoints/``,
    written by ``python -m lit_tricks fit``) when there is one, since a :class:`~lit_tricks.Classifier`
    does not keep its backbone in its hyperparameters; otherwise by ``load_from_checkpoint`` of the class
    named in the checkpoint's hyperparameters (``_class_path``). A missing or damaged file raises a clear error.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"No teacher checkpoint at {str(path)!r}: check the path (a student resumed from a checkpoint needs its "
            "teacher's file where it was at training, or Distill(teacher=...) with the new path)."
        )
    checkpoint = load_checkpoint(path)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"{str(path)!r} is not a Lightning checkpoint (no 'state_dict'): pass a .ckpt of a fit.")
    state = {key: value for key, value in checkpoint["state_dict"].items() if not key.startswith(_LOSS_PREFIX)}
    config = _run_config(path)
    with torch.random.fork_rng(devices=[]):  # building the model draws initial weights: keep the run's stream
        if config is not None:
            model = _build_from_config(config)
        else:
            class_path = checkpoint.get("hyper_parameters", {}).get("_class_path")
            if class_path is None:
                raise ValueError(
                    f"Cannot tell which module {str(path)!r} holds: no config.yaml at {path.parent.parent} and no "
                    "_class_path in its hyperparameters. Train the teacher with `python -m lit_tricks fit` (which "
                    "writes both), or load it yourself and pass the module: Distill(teacher=model)."
                )
            try:
                model = _import_class(class_path).load_from_checkpoint(path, map_location="cpu", strict=False)
            except TypeError as error:
                raise ValueError(
                    f"Cannot rebuild {class_path} from {str(path)!r}: {error}. Its hyperparameters do not hold every "
                    f"argument (a Classifier does not keep its backbone); keep the run's config.yaml at "
                    f"{path.parent.parent}, or load it yourself: Distill(teacher={class_path.rpartition('.')[2]}"
                    ".load_from_checkpoint(path, backbone=...))."
                ) from error
    model.load_state_dict(state)
    return model


class Teacher:
    r"""One frozen model, or an ensemble, that distillation losses read.

    Not an ``nn.Module`` on purpose: the student holding it would put the teacher's weights in its state dict
    and its parameters. The models are frozen (``requires_grad=False``), kept in eval mode, moved to the
    student's device by :meth:`to`, and run under ``torch.no_grad()`` (and ``torch.autocast`` if asked).

    An ensemble's logits are the log of the mean of the teachers' softmax (MEAL V2, Shen & Savvides 2020):

    .. math:: z = \log \frac1K \sum_{k=1}^K \sigma(z_k),

    so :math:`\sigma(z)` is the averaged soft label; a single teacher's logits are returned as they are.

    Args:
        models: a module, a Lightning checkpoint path (see :func:`load_teacher`), or a list of them.
        autocast: run the teachers under ``torch.autocast`` on the inputs' device (float16/bfloat16 defaults).
    """

    def __init__(self, models: TeacherSpec, autocast: bool = False) -> None:
        specs = list(models) if isinstance(models, Sequence) and not isinstance(models, str) else [models]
        if not specs:
            raise ValueError("teacher is an empty list: give a module, a checkpoint path, or a list of them.")
        for spec in specs:
            if not isinstance(spec, (nn.Module, str, os.PathLike)):
                raise TypeError(
                    f"teacher must be an nn.Module, a checkpoint path or a list of them, got {type(spec).__name__}."
                )
        if not isinstance(autocast, bool):
            raise TypeError(f"autocast must be True or False, got {autocast!r}.")
        #: the checkpoint paths given (``None`` for modules given directly), in the order of ``models``
        self.paths: list[str | None] = [None if isinstance(s, nn.Module) else os.fspath(s) for s in specs]
        self.models: list[nn.Module] = [s if isinstance(s, nn.Module) else load_teacher(s) for s in specs]
        for model in self.models:
            model.eval().requires_grad_(False)
        self.autocast = autocast

    def __len__(self) -> int:
        return len(self.models)

    @property
    def num_classes(self) -> int | None:
        """The class count the teachers declare (``num_classes`` attribute), if they all declare one."""
        counts = {getattr(model, "num_classes", None) for model in self.models}
        return counts.pop() if len(counts) == 1 else None

    def to(self, device: torch.device | str) -> Teacher:
        """Move every teacher to ``device`` (and back to eval mode); returns ``self``."""
        for model in self.models:
            model.to(device).eval()
        return self

    def __call__(self, inputs: Tensor, features: bool = False) -> tuple[Tensor, Tensor | None]:
        """``(logits [N, C], features [N, D] or None)`` for ``inputs``; features only from a single teacher."""
        if features and len(self.models) > 1:
            raise ValueError(
                "A loss that reads the teacher's features needs a single teacher, not an ensemble of "
                f"{len(self.models)} (their feature spaces differ)."
            )
        with torch.no_grad(), torch.autocast(inputs.device.type, enabled=self.autocast):
            if features:
                logits, feats = _forward_features(self.models[0], inputs)
                return logits.float(), feats.float()
            outputs = [model(inputs).float() for model in self.models]
        if len(outputs) == 1:
            return outputs[0], None
        log_probs = torch.stack([logits.log_softmax(dim=-1) for logits in outputs])
        return torch.logsumexp(log_probs, dim=0) - math.log(len(outputs)), None

    def state(self) -> dict[str, Any]:
        """What a student's checkpoint keeps to reload the teacher: the checkpoint paths."""
        return {"teacher_paths": list(self.paths)}


def _forward_features(model: nn.Module, inputs: Tensor) -> tuple[Tensor, Tensor]:
    """``(logits, penultimate features)`` of a TrickModule (``forward_features``) or of a network with
    ``forward_features`` and ``forward_head`` (as ``lit_tricks.nets`` and timm models)."""
    from lit_tricks.core.module import TrickModule

    if isinstance(model, TrickModule):
        return model.forward_features(inputs)
    if hasattr(model, "forward_features") and hasattr(model, "forward_head"):
        feats = model.forward_features(inputs)
        return model.forward_head(feats), feats
    raise TypeError(
        f"The loss needs the teacher's penultimate features, but {type(model).__name__} has no way to give them: "
        "use a lit_tricks TrickModule/Classifier teacher, or a network with forward_features and forward_head."
    )
