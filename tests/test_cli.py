"""The CLI's quick side: lazy imports, --help, the catalogue, and errors that name their cause."""

import importlib
import inspect
import subprocess
import sys

import lightning.pytorch as pl
import pytest
import torch
from conftest import ROOT
from jsonargparse import Namespace
from lightning.pytorch.callbacks import Callback
from torch import nn

import lit_tricks
from lit_tricks import cli
from lit_tricks.cli import (
    CATALOGUE,
    ConfigError,
    LitTricksCLI,
    _joined_name,
    condense_error,
    init_arguments,
    main,
    needs_fit_checkpoint,
    source_arguments,
)

QUICKSTART = str(ROOT / "configs/quickstart.yaml")


BASES = {lit_tricks.Trick, lit_tricks.TrickModule, lit_tricks.modules.GenerativeModule, lit_tricks.modules.TTAModule}


def _kind(obj):
    if obj in BASES:
        return "bases"
    if issubclass(obj, lit_tricks.Trick):
        return "tricks"
    if issubclass(obj, Callback):
        return "callbacks"
    if issubclass(obj, pl.LightningModule):
        return "modules"
    if issubclass(obj, pl.LightningDataModule):
        return "data"
    if issubclass(obj, torch.optim.Optimizer):
        return "optimizers"
    return "nets" if issubclass(obj, nn.Module) else None


def test_catalogue_lists_every_public_part_once_under_its_kind():
    expected: dict[str, set[str]] = {kind: set() for kind in CATALOGUE}
    seen = set()
    for package in (lit_tricks, lit_tricks.modules, lit_tricks.data, lit_tricks.nets, lit_tricks.optim):
        for name in package.__all__:
            obj = getattr(package, name)
            if inspect.isclass(obj) and _kind(obj) and obj not in seen:
                seen.add(obj)
                expected[_kind(obj)].add(f"{package.__name__}.{name}")
    assert {kind: set(paths) for kind, paths in CATALOGUE.items()} == expected
    assert {"lit_tricks.modules.EDMDiffusion", "lit_tricks.modules.SparseCBM"} <= set(CATALOGUE["modules"])
    assert "lit_tricks.AdaNPC (Python only)" in cli.catalogue()


@pytest.mark.parametrize(
    "package", ["lit_tricks", "lit_tricks.data", "lit_tricks.modules", "lit_tricks.nets", "lit_tricks.optim"]
)
def test_lazy_packages_export_every_name(package):
    module = importlib.import_module(package)
    assert all(getattr(module, name) is not None for name in module.__all__)
    assert set(module.__all__) <= set(dir(module))
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        module.Nope  # noqa: B018


def test_help_answers_without_importing_torch():
    code = "import sys; from lit_tricks.cli import main; main(['--help']); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("usage: python -m lit_tricks ") and out.rstrip().endswith("False")
    assert "lit_tricks.modules.EDMDiffusion" in out and "--trainer.callbacks.help" in out


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["fitt", "--config", QUICKSTART], "unknown command 'fitt' (did you mean fit?)"),
        (["fit", "--config", QUICKSTART.replace("quickstart", "quickstrat")], "no such file (did you mean"),
    ],
)
def test_command_line_mistakes_fail_fast(argv, expected, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and expected in capsys.readouterr().err


@pytest.mark.parametrize(
    ("class_path", "expected"),
    [
        ("lit_tricks.Mixupp", "'lit_tricks.Mixupp' is not a lit_tricks part (did you mean lit_tricks.Mixup?)"),
        ("lit_tricks.EDMDiffusion", "(did you mean lit_tricks.modules.EDMDiffusion?)"),
        ("lit_tricks.AdaNPC", "cannot be built from a config file"),
    ],
)
def test_unknown_class_in_a_config_file_fails_before_lightning(class_path, expected, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"trainer:\n  callbacks+:\n    - class_path: {class_path}\n")
    with pytest.raises(SystemExit):
        main(["fit", "--config", QUICKSTART, "--config", str(bad)])
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad}: trainer.callbacks+[0].class_path: ") and expected in err


def test_wrong_argument_name_names_the_class_and_the_accepted_ones(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  callbacks+:\n    - class_path: lit_tricks.Mixup\n      init_args:\n        alphaa: 1\n")
    with pytest.raises(SystemExit):
        LitTricksCLI(args=["--config", QUICKSTART, "--config", str(bad)], run=False)
    err = capsys.readouterr().err
    assert err.startswith("error: trainer.callbacks: lit_tricks.Mixup has no argument 'alphaa' (did you mean alpha?)")
    assert "it accepts: alpha, cutmix_alpha," in err and len(err.splitlines()) == 2


def test_wrong_argument_name_of_a_lit_tricks_part_fails_before_lightning(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  class_path: lit_tricks.Classifier\n  init_args:\n    num_clases: 10\n")
    with pytest.raises(SystemExit):
        main(["fit", "--config", QUICKSTART, "--config", str(bad)])
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad}: model: lit_tricks.Classifier has no argument 'num_clases' (did you mean")


@pytest.mark.parametrize("class_path", [path for paths in CATALOGUE.values() for path in paths])
def test_arguments_read_from_the_source_are_the_constructors(class_path):
    read = source_arguments(class_path)
    assert read is None or read == init_arguments(class_path)


def test_no_recipe_says_to_give_one(capsys):
    with pytest.raises(SystemExit):
        LitTricksCLI(args=["fit"])
    assert "required: fit.data, fit.model; a recipe gives them, e.g. --config" in capsys.readouterr().err


def test_condense_error_keeps_the_innermost_problem():
    message = """Parser key "model":
  Does not validate against any of the Union subtypes
  Errors:
    - Problem with given class_path 'lit_tricks.Classifier':
        Parser key "backbone":
          Problem with given class_path 'lit_tricks.nets.MLP':
            Option 'hiden' is not accepted
    - Expected a <class 'NoneType'>"""
    assert condense_error(message).startswith("model.backbone: lit_tricks.nets.MLP has no argument 'hiden' (did")
    assert condense_error("Unrecognized arguments: --x") == "Unrecognized arguments: --x"


def test_constructor_error_is_reported_with_its_class(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  callbacks+:\n    - class_path: lit_tricks.Mixup\n      init_args:\n        alpha: -1\n")
    with pytest.raises(ConfigError, match=r"^Mixup refused its arguments: ValueError: .*alpha.*-1"):
        LitTricksCLI(args=["--config", QUICKSTART, "--config", str(bad)], run=False)


def test_missing_source_checkpoint_says_how_to_train_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tta = ROOT / "configs/tta"
    with pytest.raises(ConfigError, match="does not exist. Train the source model first: .*configs/tta/source.yaml"):
        LitTricksCLI(args=["test", "--config", str(tta / "digits_c.yaml"), "--config", str(tta / "tent.yaml")])


class EvaluatesUntrained(pl.LightningModule):
    needs_fit_checkpoint = False


@pytest.mark.parametrize(
    ("class_path", "source_checkpoint", "needs"),
    [
        ("lit_tricks.Classifier", None, True),
        ("lit_tricks.Tent", "source.ckpt", False),  # loads its trained weights itself
        ("lit_tricks.Tent", None, True),
        ("lit_tricks.EcoTTA", "source.ckpt", True),  # its meta networks train in `fit`
        (f"{__name__}.EvaluatesUntrained", None, False),  # declared
    ],
)
def test_which_modules_need_the_checkpoint_of_a_fit(class_path, source_checkpoint, needs):
    model = Namespace(class_path=class_path, init_args=Namespace(source_checkpoint=source_checkpoint))
    assert needs_fit_checkpoint(model) is needs


def test_misspelled_option_gets_a_suggestion(capsys):
    with pytest.raises(SystemExit):
        LitTricksCLI(args=["fit", "--config", QUICKSTART, "--trainer.max_stepz=3"])
    err = capsys.readouterr().err
    assert err.startswith("error: unrecognized arguments: --trainer.max_stepz=3 (did you mean --trainer.max_steps?)")


@pytest.mark.parametrize("config", sorted((ROOT / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_preflight_passes_every_shipped_config(config):
    assert cli.preflight(["fit", "--config", QUICKSTART, "--config", str(config)]) is None


def test_run_name_of_a_long_stack_fits_a_file_name():
    assert _joined_name(["quickstart", "mixup"]) == "quickstart+mixup"
    stems = ["quickstart"] + [f"snippet_number_{i}" for i in range(20)]
    name = _joined_name(stems)
    assert len(name) <= 120 and name.startswith("quickstart+20_more-")
    assert name != _joined_name(stems[:-1] + ["another"])  # distinct stacks, distinct directories
