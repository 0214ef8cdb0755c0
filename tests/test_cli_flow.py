"""A new user's first hour through the CLI: fit (named run, summary), then test from that fit's checkpoint."""

import pytest
from conftest import ROOT

from lit_tricks.cli import LitTricksCLI, main

CONFIGS = ["--config", str(ROOT / "configs/quickstart.yaml"), "--config", str(ROOT / "configs/tricks/mixup.yaml")]
SHORT = [
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=3",
    "--trainer.limit_val_batches=1",
    "--trainer.enable_progress_bar=false",
]
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.limit_test_batches=2"]


def test_fit_names_the_run_and_sums_up_then_test_needs_its_checkpoint(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):  # nothing trained yet
        main(["test", *CONFIGS, "--ckpt_path", "last"])
    assert "no checkpoint yet; train it first with `python -m lit_tricks fit --config" in capsys.readouterr().err

    LitTricksCLI(args=["fit", *CONFIGS, *SHORT, "--trainer.enable_model_summary=false"])
    run = tmp_path / "lightning_logs/quickstart+mixup/version_0"
    best = next((run / "checkpoints").glob("epoch=*.ckpt"))
    summary = capsys.readouterr().out.split("fit done after")[1]
    for line in (
        "1 epochs, 3 steps.",
        "  last: val/acc ",
        "  best: val/acc ",
        f" (max) in lightning_logs/quickstart+mixup/version_0/checkpoints/{best.name}",
        "  last checkpoint: lightning_logs/quickstart+mixup/version_0/checkpoints/last.ckpt",
        "  run directory: lightning_logs/quickstart+mixup/version_0",
        "  TensorBoard: tensorboard --logdir lightning_logs",
        "--ckpt_path best",
    ):
        assert line in summary, (line, summary)

    with pytest.raises(SystemExit) as exit_:
        main(["test", *CONFIGS])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "test needs a trained model, but no --ckpt_path was given" in err
    assert "--ckpt_path last  # now lightning_logs/quickstart+mixup/version_0/checkpoints/last.ckpt" in err

    for choice, expected in (("last", run / "checkpoints/last.ckpt"), ("best", best)):
        cli = LitTricksCLI(args=["test", *CONFIGS, *QUIET, "--ckpt_path", choice])
        assert cli.config.test.ckpt_path == str(expected.relative_to(tmp_path))
        assert "test/acc" in cli.trainer.callback_metrics


def test_a_named_logger_keeps_its_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    name = ["--trainer.logger.init_args.name=mine"]
    cli = LitTricksCLI(args=[*CONFIGS, *name], run=False)
    assert cli.trainer.logger.name == "mine" and cli.trainer.logger.save_dir == "."
    cli = LitTricksCLI(args=CONFIGS, run=False)
    assert cli.trainer.logger.name == "quickstart+mixup" and cli.trainer.logger.save_dir == "lightning_logs"
