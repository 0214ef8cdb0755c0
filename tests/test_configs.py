"""Harness (a): every recipe in configs/ runs a few steps offline; snippets in configs/tricks/ stack, and each
optimizer snippet in configs/optim/ trains the quickstart."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

from lit_tricks.cli import LitTricksCLI, catalogue

RECIPES = sorted(
    p
    for p in (ROOT / "configs").rglob("*.yaml")
    if not {"tricks", "tta", "optim", "tune", "distill", "options"} & set(p.relative_to(ROOT).parts)
)
OPTIMIZERS = sorted((ROOT / "configs" / "optim").glob("*.yaml"))  # snippets that replace a recipe's optimizer
TTA = ROOT / "configs" / "tta"
SNIPPETS = sorted((ROOT / "configs" / "tricks").glob("*.yaml"))
SHORT_RUN = [
    "--trainer.max_steps=3",
    "--trainer.limit_val_batches=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


def _configs(*paths):
    return [arg for path in paths for arg in ("--config", str(path))]


def _appended_classes(snippet):
    entries = yaml.safe_load(snippet.read_text())["trainer"]["callbacks+"]
    return {entry["class_path"].rsplit(".", 1)[-1] for entry in entries}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_recipe_runs_a_few_steps(recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = LitTricksCLI(args=["fit", *_configs(recipe), *SHORT_RUN])
    assert cli.trainer.global_step == 3
    assert (tmp_path / "lightning_logs").exists(), "recipes log to TensorBoard under lightning_logs/"


@pytest.mark.parametrize("snippet", OPTIMIZERS, ids=lambda p: p.name)
def test_optimizer_snippets_train_the_quickstart(snippet, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = LitTricksCLI(args=["fit", *_configs(ROOT / "configs/quickstart.yaml", snippet), *SHORT_RUN])
    expected = yaml.safe_load(snippet.read_text())["model"]["init_args"]["optimizer"]["class_path"]
    assert cli.trainer.global_step == 3 and type(cli.trainer.optimizers[0]).__name__ == expected.rsplit(".")[-1]


def test_snippets_append_rather_than_replace(tmp_path):
    snippet = tmp_path / "lr_monitor.yaml"
    snippet.write_text("trainer:\n  callbacks+:\n    - class_path: lightning.pytorch.callbacks.LearningRateMonitor\n")
    cli = LitTricksCLI(args=_configs(ROOT / "configs/quickstart.yaml", snippet), run=False)
    names = {type(cb).__name__ for cb in cli.trainer.callbacks}
    assert {"LearningRateMonitor", "ModelCheckpoint"} <= names


@pytest.mark.parametrize("snippet", SNIPPETS, ids=lambda p: p.name)
def test_every_snippet_appends_with_callbacks_plus(snippet):
    assert _appended_classes(snippet), f"{snippet.name} must append with `trainer: callbacks+:`"


@pytest.mark.skipif(not SNIPPETS, reason="no trick snippets in configs/tricks yet")
def test_all_snippets_stack_on_the_quickstart(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _train_the_distillation_teacher()  # configs/tricks/distill.yaml distils from its checkpoint
    cli = LitTricksCLI(args=["fit", *_configs(ROOT / "configs/quickstart.yaml", *SNIPPETS), *SHORT_RUN])
    names = {type(cb).__name__ for cb in cli.trainer.callbacks}
    expected = set().union(*map(_appended_classes, SNIPPETS))
    assert expected <= names and "ModelCheckpoint" in names
    assert cli.trainer.global_step == 3


def _train_the_distillation_teacher():
    LitTricksCLI(args=["fit", *_configs(ROOT / "configs/distill/digits_teacher.yaml"), *SHORT_RUN])
    assert Path("lightning_logs/distill/digits_teacher/checkpoints/last.ckpt").exists()


def test_distill_recipe_trains_a_teacher_then_a_student(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _train_the_distillation_teacher()
    recipes = ROOT / "configs" / "distill"
    for configs in (
        [recipes / "digits_student.yaml"],
        [ROOT / "configs/quickstart.yaml", ROOT / "configs/tricks/distill.yaml"],
    ):
        cli = LitTricksCLI(args=["fit", *_configs(*configs), *SHORT_RUN])
        assert cli.trainer.global_step == 3 and "Distill" in {type(cb).__name__ for cb in cli.trainer.callbacks}


def test_unknown_config_key_is_rejected(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  init_args:\n    num_clases: 10\n")
    with pytest.raises(SystemExit):
        LitTricksCLI(args=_configs(ROOT / "configs/quickstart.yaml", bad), run=False)
    assert "num_clases" in capsys.readouterr().err


def test_bad_hyperparameter_from_yaml_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  init_args:\n    label_noise: 2.0\n")
    with pytest.raises(ValueError, match="label_noise must be in"):
        LitTricksCLI(args=_configs(ROOT / "configs/quickstart.yaml", bad), run=False)


def test_help_lists_the_parts():
    text = catalogue()
    for name in ("lit_tricks.Classifier", "lit_tricks.data.DigitsDataModule", "lit_tricks.nets.CNN1D"):
        assert name in text
    out = subprocess.run([sys.executable, "-m", "lit_tricks", "--help"], capture_output=True, text=True, check=True)
    assert "lit_tricks parts" in out.stdout and "lit_tricks.data.MNIST1DDataModule" in out.stdout


def test_tta_recipes_train_a_source_then_adapt_on_the_stream(tmp_path, monkeypatch):
    """configs/tta/: fit the source model, then each method file stacked on the stream file runs `test` from its
    checkpoint and logs the online accuracy and the per-domain errors; EcoTTA warms up with `fit` first."""
    monkeypatch.chdir(tmp_path)
    short_test = ["--trainer.limit_test_batches=12", "--trainer.enable_progress_bar=false"]
    LitTricksCLI(args=["fit", *_configs(TTA / "digits_c.yaml", TTA / "source.yaml"), *SHORT_RUN])
    assert (tmp_path / "checkpoints/tta/source.ckpt").exists()
    for method in ("bn_adapt", "tent", "rmt", "source_only"):
        cli = LitTricksCLI(args=["test", *_configs(TTA / "digits_c.yaml", TTA / f"{method}.yaml"), *short_test])
        metrics = cli.trainer.callback_metrics
        assert 0 <= metrics["test/acc"] <= 1 and "test/error/gaussian_noise_5" in metrics, method
    LitTricksCLI(args=["fit", *_configs(TTA / "digits_c.yaml", TTA / "ecotta.yaml"), *SHORT_RUN])
    ckpt = ["--ckpt_path", "checkpoints/tta/ecotta.ckpt"]
    cli = LitTricksCLI(args=["test", *_configs(TTA / "digits_c.yaml", TTA / "ecotta.yaml"), *short_test, *ckpt])
    assert bool(cli.model.warmed_up) and "test/acc" in cli.trainer.callback_metrics
    bad = tmp_path / "other.yaml"
    bad.write_text("model:\n  init_args:\n    model:\n      init_args:\n        width: 8\n")
    with pytest.raises(ValueError, match="does not hold this model's weights"):
        LitTricksCLI(args=_configs(TTA / "digits_c.yaml", TTA / "tent.yaml", bad), run=False)


@pytest.mark.parametrize("option", sorted((ROOT / "configs/long_tail/options").glob("*.yaml")), ids=lambda p: p.stem)
def test_long_tail_options_stack_on_the_long_tail_recipe(option, tmp_path, monkeypatch):
    """configs/long_tail/options/: data or model options (not callbacks) that stack on a long-tail recipe."""
    monkeypatch.chdir(tmp_path)
    recipe = ROOT / "configs/long_tail/mnist1d_rho100_noise20.yaml"
    cli = LitTricksCLI(args=["fit", *_configs(recipe, option), *SHORT_RUN])
    assert cli.trainer.global_step == 3
    assert cli.datamodule.smote is not None or cli.model.hparams.prior_correction
