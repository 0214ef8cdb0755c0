"""``python -m lit_tricks {fit,validate,test,predict} --config A.yaml [--config B.yaml ...]``.

Later ``--config`` files override earlier ones key by key; add-on snippets in ``configs/tricks/`` append
their callbacks with ``trainer: callbacks+: [...]`` (a plain ``callbacks:`` would replace the list).

On top of LightningCLI: runs are named after the recipe and its snippets (``lightning_logs/quickstart+mixup/
version_0``); ``fit`` ends with a summary; ``validate``/``test``/``predict`` refuse to run an untrained model and
accept ``--ckpt_path last`` / ``best`` for the newest run of the recipe; errors name the key, the bad value and
the accepted names first. ``--help``, a mistyped command, a missing config file and an unknown ``lit_tricks``
class or argument name are answered before torch and Lightning are imported (which takes seconds).
"""

from __future__ import annotations

import ast
import difflib
import hashlib
import importlib
import inspect
import re
import sys
import textwrap
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

PROG = "python -m lit_tricks"
COMMANDS = {
    "fit": "train (and validate); ends with a summary: metrics, run directory, checkpoints",
    "validate": "one pass over the validation set with a trained model (--ckpt_path PATH, last or best)",
    "test": "one pass over the test set with a trained model (--ckpt_path PATH, last or best)",
    "predict": "predictions on the predict set with a trained model (--ckpt_path PATH, last or best)",
    "tune": "PBT or random search over any config key on Ray Tune: --tune configs/tune/pbt_mixup.yaml [--address]",
}
# Every public part by kind, as the `class_path` a config names; tests/test_cli.py checks it against the classes.
CATALOGUE: dict[str, tuple[str, ...]] = {
    "tricks": (
        "lit_tricks.AdversarialTraining",
        "lit_tricks.ApplyMultiSampleDropout",
        "lit_tricks.BiasLoss",
        "lit_tricks.CutMix",
        "lit_tricks.Distill",
        "lit_tricks.EfficientTrain",
        "lit_tricks.ELR",
        "lit_tricks.EnsLoss",
        "lit_tricks.LDRLoss",
        "lit_tricks.ExperienceReplay",
        "lit_tricks.HardBatches",
        "lit_tricks.MIC",
        "lit_tricks.Mixup",
        "lit_tricks.SMMix",
        "lit_tricks.SampleReweighting",
        "lit_tricks.SelectiveBackprop",
        "lit_tricks.SLA",
        "lit_tricks.SelfDistill",
        "lit_tricks.MixOE",
        "lit_tricks.OutlierExposure",
        "lit_tricks.SBCL",
        "lit_tricks.AdaWAC",
        "lit_tricks.RCAL",
        "lit_tricks.FPF",
        "lit_tricks.PRD",
    ),
    "callbacks": (
        "lit_tricks.ApplyGhostBatchNorm",
        "lit_tricks.ApplyNestedDropout",
        "lit_tricks.ApplyTrAct",
        "lit_tricks.ContinualEvaluation",
        "lit_tricks.DataDietScores",
        "lit_tricks.EMATeacher",
        "lit_tricks.PerpendicularGradient",
        "lit_tricks.NeuralCollapse",
        "lit_tricks.TemperatureScaling",
        "lit_tricks.OODEvaluation",
        "lit_tricks.ConceptMetrics",
    ),
    "modules": (
        "lit_tricks.AdaNPC",
        "lit_tricks.BNAdapt",
        "lit_tricks.Classifier",
        "lit_tricks.ConceptBottleneckModel",
        "lit_tricks.ConceptEmbeddingModel",
        "lit_tricks.ConsistencyModel",
        "lit_tricks.EcoTTA",
        "lit_tricks.PostHocCBM",
        "lit_tricks.RMT",
        "lit_tricks.Tent",
        "lit_tricks.modules.EDMDiffusion",
        "lit_tricks.modules.LossConditionedRegression",
        "lit_tricks.modules.SourceOnly",
        "lit_tricks.modules.SparseCBM",
        "lit_tricks.NearestMeanClassifier",
        "lit_tricks.FewShotFineTune",
        "lit_tricks.TFUP",
        "lit_tricks.MetricLearner",
        "lit_tricks.DKVB",
        "lit_tricks.LaBo",
        "lit_tricks.BarlowTwins",
        "lit_tricks.MoCo",
        "lit_tricks.DNCBMAutoencoder",
        "lit_tricks.DNCBM",
        "lit_tricks.KnoBo",
        "lit_tricks.MVP",
        "lit_tricks.ECBM",
    ),
    "data": (
        "lit_tricks.data.ArrayDataModule",
        "lit_tricks.data.ConceptToyDataModule",
        "lit_tricks.data.ContinualDataModule",
        "lit_tricks.data.CorruptionStreamDataModule",
        "lit_tricks.data.DigitsConceptDataModule",
        "lit_tricks.data.DigitsDataModule",
        "lit_tricks.data.MNIST1DDataModule",
        "lit_tricks.data.ModularArithmeticDataModule",
        "lit_tricks.data.ShapesDataModule",
        "lit_tricks.data.Toy2DDataModule",
        "lit_tricks.data.OpenSetDigitsDataModule",
        "lit_tricks.data.FewShotDataModule",
        "lit_tricks.data.UnseenClassesDataModule",
        "lit_tricks.data.ShapeScenesDataModule",
    ),
    "optimizers": ("lit_tricks.optim.AdaBelief", "lit_tricks.optim.Lion"),
    "nets": (
        "lit_tricks.nets.CNN1D",
        "lit_tricks.nets.CNN2D",
        "lit_tricks.nets.ViT",
        "lit_tricks.nets.HyperNetwork",
        "lit_tricks.nets.MLP",
        "lit_tricks.nets.NonScalingLayerNorm",
        "lit_tricks.nets.OutputScale",
        "lit_tricks.nets.TimeCNN",
        "lit_tricks.nets.TimeMLP",
    ),
    "bases": (
        "lit_tricks.Trick",
        "lit_tricks.TrickModule",
        "lit_tricks.modules.GenerativeModule",
        "lit_tricks.modules.TTAModule",
    ),
}
# Parts whose arguments a YAML file cannot give, with what to do instead.
PYTHON_ONLY = {
    "lit_tricks.AdaNPC": "its memory (source_features, source_labels) is tensors: build it in Python (docs/tta.md)",
    "lit_tricks.DNCBM": "its concept names are vocabulary embeddings (tensors): build it in Python (docs/dn_cbm.md)",
    "lit_tricks.KnoBo": "its prior matrix and concept scores are tensors: build it in Python (docs/knobo.md)",
}
_CHECKED_PACKAGES = ("lit_tricks", "lit_tricks.data", "lit_tricks.modules", "lit_tricks.nets", "lit_tricks.optim")


class ConfigError(ValueError):
    """A problem with the configuration, reported to the user as one short message (no traceback)."""


def catalogue() -> str:
    """The public parts of lit_tricks, by kind, as the ``class_path`` names a config uses."""
    lines = ["lit_tricks parts (use as class_path in a --config file):"]
    for kind, paths in CATALOGUE.items():
        names = ", ".join(f"{path} (Python only)" if path in PYTHON_ONLY else path for path in paths)
        label = f"  {kind}{' (subclass these in Python)' if kind == 'bases' else ''}: "
        lines.append(textwrap.fill(names, 116, initial_indent=label, subsequent_indent=" " * 4))
    lines.append(f"Example: {PROG} fit --config configs/quickstart.yaml --config configs/tricks/mixup.yaml")
    return "\n".join(lines)


def help_text() -> str:
    """``python -m lit_tricks --help``, written without importing Lightning."""
    commands = "\n".join(f"  {name:<10} {text}" for name, text in COMMANDS.items())
    return f"""usage: {PROG} [-h] COMMAND --config RECIPE.yaml [--config SNIPPET.yaml ...] [--key value ...]

Train and evaluate lit_tricks recipes (a LightningCLI).

commands:
{commands}

options (after the command):
  -h, --help                      every option of the command, e.g. `{PROG} fit --help`
  -c, --config FILE               a recipe, then snippets; later files override earlier ones key by key
  --print_config                  print the merged config and exit
  --ckpt_path PATH|last|best      validate/test/predict: the trained weights (last, best: of the recipe's runs)
  --trainer.callbacks.help CLASS  the arguments of a trick, e.g. lit_tricks.Mixup (--model.help, --data.help)

Runs are named after the recipe and its snippets: lightning_logs/quickstart+mixup/version_0. After `fit`,
evaluate its newest checkpoint with `{PROG} test --config configs/quickstart.yaml --ckpt_path last`.

{catalogue()}"""


def suggest(word: str, choices: Sequence[str]) -> str:
    """`` (did you mean X?)`` for the closest of ``choices``, else an empty string."""
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def _class_problem(class_path: str) -> str | None:
    """Why ``class_path`` names no lit_tricks part, checked without importing the part; None if it does or if it
    is not a ``lit_tricks.<Name>`` / ``lit_tricks.{data,modules,nets}.<Name>`` path."""
    if class_path in PYTHON_ONLY:
        return f"{class_path} cannot be built from a config file: {PYTHON_ONLY[class_path]}."
    package, _, name = class_path.rpartition(".")
    if package not in _CHECKED_PACKAGES or name in importlib.import_module(package).__all__:
        return None
    known = [path for paths in CATALOGUE.values() for path in paths]
    same_name = [path for path in known if path.rpartition(".")[2] == name]
    hint = f" (did you mean {same_name[0]}?)" if same_name else suggest(class_path, known)
    return f"{class_path!r} is not a lit_tricks part{hint}; `{PROG} --help` lists them."


def _parts(node: Any, key: str = "") -> Iterator[tuple[str, dict]]:
    """``(key, part)`` of every mapping with a ``class_path`` in a loaded YAML tree."""
    if isinstance(node, dict):
        if isinstance(node.get("class_path"), str):
            yield key, node
        for k, v in node.items():
            yield from _parts(v, f"{key}.{k}" if key else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _parts(v, f"{key}[{i}]")


def source_arguments(class_path: str) -> list[str] | None:
    """The constructor arguments of a ``lit_tricks.<Name>`` / ``lit_tricks.{data,modules,nets}.<Name>`` class,
    read from its source file without importing it; None if they are not that simple to read (another path, no
    ``__init__`` of its own, ``*args`` or ``**kwargs``)."""
    package, _, name = class_path.rpartition(".")
    if package not in _CHECKED_PACKAGES:
        return None
    exports = importlib.import_module(package)._EXPORTS  # the lazy packages' name -> module table
    module = next((module for module, names in exports.items() if name in names), None)
    if module is None:
        return None
    source = Path(__file__).parent.joinpath(*module.split(".")[1:]).with_suffix(".py")
    tree = ast.parse(source.read_text())
    cls = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name), None)
    init = next((n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"), None) if cls else None
    if init is None or init.args.vararg or init.args.kwarg:
        return None
    return [arg.arg for arg in [*init.args.posonlyargs, *init.args.args, *init.args.kwonlyargs][1:]]


def preflight(argv: Sequence[str]) -> str | None:
    """The first problem in the command line that needs no Lightning to find: an unknown command, a missing or
    invalid config file, an unknown lit_tricks class or argument name in a config file; None if there is none."""
    import yaml  # a light import, unlike Lightning's

    if not argv or argv[0].startswith("-"):
        return None  # options before the command: jsonargparse's business
    command = argv[0]
    if command not in COMMANDS:
        return f"unknown command {command!r}{suggest(command, list(COMMANDS))}; choose one of {', '.join(COMMANDS)}."
    configs = [value for flag, value in zip(argv, argv[1:], strict=False) if flag in ("-c", "--config")]
    configs += [arg.split("=", 1)[1] for arg in argv if arg.startswith("--config=")]
    for config in configs:
        path = Path(config)
        if not path.is_file():
            siblings = [str(p) for p in path.parent.glob("*.yaml")] if path.parent.is_dir() else []
            return f"--config {config}: no such file{suggest(config, siblings)}."
        try:
            tree = yaml.safe_load(path.read_text())
        except yaml.YAMLError as error:
            return f"--config {config} is not valid YAML: {error}"
        for key, part in _parts(tree):
            problem = _class_problem(part["class_path"])
            if problem:
                return f"{config}: {key}.class_path: {problem}"
            accepted = source_arguments(part["class_path"])
            given = part.get("init_args") if isinstance(part.get("init_args"), dict) else {}
            unknown = [name for name in given if accepted is not None and name not in accepted]
            if unknown:
                return f"{config}: {key}: {_unknown_argument(part['class_path'], unknown[0], accepted)}"
    return None


def condense_error(message: str) -> str:
    """The cause of a jsonargparse error, short: the key, the class, what is wrong and the accepted names,
    without the union-type noise; other messages unchanged."""
    problems = re.findall(r"Problem with given class_path '([^']+)':\s*\n\s*(.+)", message)
    if not problems:
        return message
    keys = re.findall(r'Parser key "([^"]+)"', message)
    where = ".".join(keys) + ": " if keys else ""
    class_path, reason = problems[-1]  # the innermost part
    option = re.fullmatch(r"Option '([^']+)' is not accepted", reason.strip())
    if option:
        return where + _unknown_argument(class_path, option.group(1), init_arguments(class_path))
    if "has no attribute" in reason or "No module named" in reason or "Unable to" in reason:
        return f"{where}{_class_problem(class_path) or f'{class_path!r} cannot be imported: {reason.strip()}'}"
    return f"{where}{class_path}: {reason.strip()}"


def _unknown_argument(class_path: str, name: str, accepted: list[str]) -> str:
    return f"{class_path} has no argument {name!r}{suggest(name, accepted)}; it accepts: {', '.join(accepted)}."


def init_arguments(class_path: str) -> list[str]:
    """The argument names ``class_path``'s constructor accepts (with those its ``**kwargs`` pass to its bases)."""
    module, _, name = class_path.rpartition(".")
    accepted: list[str] = []
    for cls in inspect.getmro(getattr(importlib.import_module(module), name)):
        params = list(inspect.signature(cls.__init__).parameters.values())[1:]
        accepted += [
            p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name not in accepted
        ]
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return accepted


def refusal(error: BaseException) -> str:
    """``Class refused its arguments: ErrorType: message`` of the constructor error jsonargparse wrapped."""
    while error.__cause__ is not None:
        error = error.__cause__
    frames = traceback.walk_tb(error.__traceback__)
    refuser = next(
        (f.f_locals["self"] for f, _ in frames if f.f_code.co_name == "__init__" and "self" in f.f_locals), None
    )
    where = f"{type(refuser).__name__} refused its arguments: " if refuser is not None else ""
    return f"{where}{type(error).__name__}: {error}"


def fail(message: str) -> None:
    sys.stderr.write(f"error: {message}\n")
    raise SystemExit(2)


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of ``python -m lit_tricks`` and the ``lit-tricks`` script: answers ``--help`` and the
    mistakes :func:`preflight` finds before importing Lightning, then runs :class:`LitTricksCLI`."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv in ([], ["-h"], ["--help"]):
        print(help_text())
        if not argv:
            fail(f"choose a command: {', '.join(COMMANDS)}.")
        return
    problem = preflight(argv)
    if problem:
        fail(problem)
    if argv[0] == "tune":
        return tune_main(argv[1:])
    try:
        __getattr__("LitTricksCLI")(args=None if args is None else argv)
    except ConfigError as error:
        fail(str(error))


def tune_main(argv: Sequence[str]) -> None:
    """``python -m lit_tricks tune --config RECIPE.yaml [--config SNIPPET.yaml ...] --tune TUNE.yaml [--address A]
    [--run-dir DIR]``: :func:`lit_tricks.tune.tune` with the tuning file's settings; prints the results."""
    import argparse
    import importlib.util

    parser = argparse.ArgumentParser(prog=f"{PROG} tune", description=tune_main.__doc__)
    parser.add_argument("-c", "--config", action="append", required=True, help="a recipe, then snippets")
    parser.add_argument("--tune", required=True, help="the tuning file, e.g. configs/tune/pbt_mixup.yaml")
    parser.add_argument("--address", default=None, help="an existing Ray cluster (default: start Ray here)")
    parser.add_argument("--run-dir", default="tune_runs", help="where results and every member's logs go")
    args = parser.parse_args(argv)
    if importlib.util.find_spec("ray") is None:
        fail('tune needs Ray Tune, an optional extra: pip install -e ".[tune]"  (or: pip install "ray[tune]")')
    from lit_tricks.tune import read_tune_file, tune

    try:
        settings = read_tune_file(args.tune)
        result = tune(args.config, address=args.address, run_dir=args.run_dir, **settings)
    except (ValueError, TypeError) as error:
        fail(str(error))
    print(result.report())


def __getattr__(name: str) -> Any:
    """``LitTricksCLI`` is imported on first use (:mod:`lit_tricks.lightning_cli`): it needs Lightning, whose
    import takes seconds."""
    if name != "LitTricksCLI":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from lit_tricks.lightning_cli import LitTricksCLI

    globals()[name] = LitTricksCLI
    return LitTricksCLI


# ---------------------------------------------------------------------------- the parsed config
def run_name(config: Any) -> None:
    """Name the run after the config files (``lightning_logs/quickstart+mixup/version_N``) when the logger keeps
    Lightning's default name and directory (``name: lightning_logs``, ``save_dir: .``); other names stay. A name
    longer than a file name may be becomes ``<first>+<n>_more-<hash of the whole name>``."""
    args = _logger_args(config)
    files = config.get("config") or []
    if files and args is not None and args.get("name") == "lightning_logs" and str(args.get("save_dir")) == ".":
        args.save_dir = "lightning_logs"
        args.name = _joined_name([Path(str(file)).stem for file in files])


def _joined_name(stems: list[str], limit: int = 120) -> str:
    """``a+b+c``, or, past ``limit`` characters, ``a+2_more-<8 hex digits>`` (distinct stacks stay distinct)."""
    name = "+".join(stems)
    if len(name) <= limit:
        return name
    return f"{stems[0][: limit // 2]}+{len(stems) - 1}_more-{hashlib.sha1(name.encode()).hexdigest()[:8]}"


def _logger_args(config: Any) -> Any:
    """The ``init_args`` of the configured logger if it has a ``name`` and a ``save_dir``, else None."""
    logger = config.get("trainer.logger")
    args = logger.get("init_args") if hasattr(logger, "get") else None
    return args if args is not None and "name" in args and "save_dir" in args else None


def _checkpoints(config: Any) -> list[Path]:
    """The checkpoint files the configured run writes, newest last: ``ModelCheckpoint(dirpath=...)`` files, else
    ``<save_dir>/<name>/version_*/checkpoints/*.ckpt`` of the logger."""
    found: list[Path] = []
    for callback in config.get("trainer.callbacks") or []:
        args = callback.get("init_args") if hasattr(callback, "get") else None
        if str(callback.get("class_path", "")).endswith("ModelCheckpoint") and args and args.get("dirpath"):
            stem = (args.get("filename") or "").split("{")[0]
            found += Path(args.dirpath).glob(f"{stem}*.ckpt")
            found += Path(args.dirpath).glob("last*.ckpt") if args.get("save_last") else []
    logger = _logger_args(config)
    if not found and logger is not None:
        found += Path(str(logger.save_dir), str(logger.name)).glob("version_*/checkpoints/*.ckpt")
    return sorted(set(found), key=lambda path: path.stat().st_mtime)


def resolve_checkpoint(config: Any, command: str) -> None:
    """``--ckpt_path last`` -> the newest checkpoint of the recipe's runs; ``best`` -> the best one that checkpoint
    records. No ``--ckpt_path`` is an error unless the model needs no trained checkpoint
    (:func:`needs_fit_checkpoint`): it would evaluate an untrained model."""
    ckpt_path = config.get("ckpt_path")
    configs = " ".join(f"--config {file}" for file in config.get("config") or [])
    if ckpt_path is None and not needs_fit_checkpoint(config.get("model")):
        return
    if ckpt_path not in (None, "last", "best"):
        return
    found = _checkpoints(config)
    if ckpt_path is None:
        newest = f"  # now {found[-1]}" if found else ""
        raise ConfigError(
            f"{command} needs a trained model, but no --ckpt_path was given (it would {command} untrained weights). "
            f"Pass the checkpoint of your last fit:\n  {PROG} {command} {configs} --ckpt_path last{newest}\n"
            "or --ckpt_path best (the best checkpoint of that fit), or --ckpt_path PATH/TO/FILE.ckpt."
        )
    if not found:
        raise ConfigError(
            f"--ckpt_path {ckpt_path}: this recipe has no checkpoint yet; train it first with `{PROG} fit {configs}`."
        )
    config.ckpt_path = str(found[-1] if ckpt_path == "last" else _best_of(found[-1]))


def _best_of(checkpoint: Path) -> Path:
    """The best checkpoint that ``checkpoint``'s ModelCheckpoint state records (Lightning itself only knows the
    best checkpoint of a fit in the same process, hence its misleading "not configured" error)."""
    from lit_tricks.core.checkpoint import load_checkpoint

    state = load_checkpoint(checkpoint).get("callbacks", {})
    best = [v.get("best_model_path") for k, v in state.items() if k.startswith("ModelCheckpoint")]
    best = [Path(path) for path in best if path and Path(path).is_file()]
    if not best:
        raise ConfigError(
            f"--ckpt_path best: {checkpoint} records no best checkpoint that still exists (its ModelCheckpoint "
            "has no monitor?). Use --ckpt_path last or give the file."
        )
    return best[0]


def needs_fit_checkpoint(model: Any) -> bool:
    """Whether evaluating the configured model needs the checkpoint of a ``fit``. A module class may declare it
    (``needs_fit_checkpoint = False``); otherwise a module that loads its trained weights itself
    (``source_checkpoint``, e.g. the test-time adaptation methods) and has no training step needs none."""
    module, _, name = str(model.class_path).rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    declared = getattr(cls, "needs_fit_checkpoint", None)
    if declared is not None:
        return bool(declared)
    import lightning.pytorch as pl

    loads_weights = (model.get("init_args") or {}).get("source_checkpoint") is not None
    return not loads_weights or cls.training_step is not pl.LightningModule.training_step


def check_source_checkpoint(config: Any) -> None:
    """A missing ``source_checkpoint`` says how to train the source model."""
    path = (config.get("model.init_args") or {}).get("source_checkpoint")
    if path is not None and not Path(path).is_file():
        raise ConfigError(
            f"model.init_args.source_checkpoint: {path!r} does not exist. Train the source model first: "
            f"`{PROG} fit --config configs/tta/digits_c.yaml --config configs/tta/source.yaml` (writes "
            "checkpoints/tta/source.ckpt), or point source_checkpoint to your own trained checkpoint."
        )


def fit_summary(trainer: Any, files: Sequence[Any]) -> str:
    """The end-of-``fit`` summary: last and best validation metrics, run directory, checkpoints, TensorBoard."""
    from lightning.pytorch.loggers import TensorBoardLogger

    def short(path: str) -> str:  # relative to the working directory when inside it
        absolute = Path(path).resolve()
        return str(absolute.relative_to(Path.cwd())) if absolute.is_relative_to(Path.cwd()) else path

    val = {k: float(v) for k, v in sorted(trainer.callback_metrics.items()) if k.startswith("val/")}
    last = ", ".join(f"{k} {v:.4g}" for k, v in val.items()) or "none (no validation ran)"
    lines = [f"fit done after {trainer.current_epoch} epochs, {trainer.global_step} steps.", f"  last: {last}"]
    for callback in trainer.checkpoint_callbacks:
        if callback.monitor and callback.best_model_path:
            score = float(callback.best_model_score)
            lines.append(
                f"  best: {callback.monitor} {score:.4g} ({callback.mode}) in {short(callback.best_model_path)}"
            )
        elif callback.best_model_path:
            lines.append(f"  checkpoint: {short(callback.best_model_path)}")
        if callback.last_model_path:
            lines.append(f"  last checkpoint: {short(callback.last_model_path)}")
    if trainer.log_dir:
        lines.append(f"  run directory: {short(trainer.log_dir)}")
    boards = [logger for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]
    if boards:
        lines.append(f"  TensorBoard: tensorboard --logdir {short(boards[0].save_dir)}")
    if files and trainer.checkpoint_callbacks:
        configs = " ".join(f"--config {file}" for file in files)
        lines.append(f"  test it: {PROG} test {configs} --ckpt_path best  (or last)")
    return "\n".join(lines)
