"""PBT on Ray Tune (lit_tricks.tune): the search space, what may be tuned, the exploit/explore state transfer
(without Ray: it is a fit resumed from the donor's checkpoint), the CLI, and one small end-to-end run on Ray."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from lightning.pytorch.callbacks import Callback

from harness import assert_same
from lit_tricks import EMATeacher, Mixup
from lit_tricks.cli import main
from lit_tricks.core.checkpoint import load_checkpoint
from lit_tricks.tune import Hyperparameters, _check_run, build_run, parse_space, read_tune_file

QUICKSTART = ROOT / "configs" / "quickstart.yaml"
MIXUP = ROOT / "configs" / "tricks" / "mixup.yaml"
EMA = ROOT / "configs" / "tricks" / "ema_teacher.yaml"
SHORT = ["--trainer.limit_train_batches=4", "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false"]
SPACE = {"Mixup.alpha": {"loguniform": [0.05, 2.0]}, "model.optimizer.lr": {"uniform": [1e-3, 1e-2]}}


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({"Mixup.alpha": {"gaussian": [0, 1]}}, "one distribution of loguniform, uniform, choice"),
        ({"Mixup.alpha": {"uniform": [2.0, 1.0]}}, "low < high"),
        ({"Mixup.alpha": {"loguniform": [0.0, 1.0]}}, "loguniform needs low > 0"),
        ({"alpha": {"uniform": [0.0, 1.0]}}, "must be '<Callback>.<attribute>'"),
        ({"Mixup.alpha": {"choice": []}}, "choice needs at least one value"),
        ({}, "non-empty mapping"),
    ],
)
def test_malformed_space_is_refused_naming_the_key(space, message):
    with pytest.raises(ValueError, match=message):
        parse_space(space)


def test_space_parses_targets():
    dims = parse_space({**SPACE, "ELR.lam": {"choice": [1, 3]}, "optimizer.weight_decay": {"uniform": [0, 0.1]}})
    targets = [("Mixup", "alpha"), ("optimizer", "lr"), ("ELR", "lam"), ("optimizer", "weight_decay")]
    assert [d.target for d in dims] == targets
    assert dims[0].values == (0.05, 2.0) and dims[2].values == (1, 3)


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({"ELR.lam": {"uniform": [1, 3]}}, "the run has no ELR callback"),
        ({"Mixup.num_classes": {"choice": [10]}}, "cannot change in a running fit.*tunable hyperparameters: alpha"),
        ({"optimizer.momentum": {"uniform": [0.5, 0.9]}}, "have no 'momentum'; they have .*'lr'"),
    ],
)
def test_what_cannot_change_mid_run_is_refused_before_ray_starts(space, message):
    with pytest.raises(ValueError, match=message):
        _check_run([QUICKSTART, MIXUP], parse_space(space), SHORT)


class Probe(Callback):
    """Records the restored state at the start of training and the hyperparameters the first step sees."""

    def on_train_start(self, trainer, pl_module):
        self.weights = {k: v.clone() for k, v in pl_module.state_dict().items()}
        tricks = [cb for cb in trainer.callbacks if isinstance(cb, (EMATeacher, Mixup))]
        self.callbacks = {type(cb).__name__: cb.state_dict() for cb in tricks}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if not hasattr(self, "alpha"):
            self.alpha = next(cb for cb in trainer.callbacks if isinstance(cb, Mixup)).alpha
            self.lr = trainer.optimizers[0].param_groups[0]["lr"]


def _run(values, max_epochs, tmp_path, ckpt_path=None):
    run = [f"--trainer.max_epochs={max_epochs}", f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false"]
    cli = build_run([QUICKSTART, MIXUP, EMA], [*SHORT, *run])
    hyper, probe = Hyperparameters(SPACE, values), Probe()
    cli.trainer.callbacks.extend([hyper, probe])
    cli.trainer.fit(cli.model, cli.datamodule, ckpt_path=ckpt_path)
    return cli.trainer, hyper, probe


def test_exploit_copies_the_donors_whole_state_then_the_new_values_take_effect(tmp_path):
    donor_values = {"Mixup.alpha": 0.3, "model.optimizer.lr": 0.004}
    donor, donor_hp, _ = _run(donor_values, 2, tmp_path)
    ckpt = tmp_path / "donor.ckpt"
    donor.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=False)

    explored = {"Mixup.alpha": 1.5, "model.optimizer.lr": 0.002}
    member, member_hp, probe = _run(explored, 3, tmp_path, ckpt_path=ckpt)
    # after the restore: the donor's weights and every trick's state, bit for bit
    for key, value in saved["state_dict"].items():
        assert torch.equal(probe.weights[key], value), key
    donor_states = {k.split("{")[0]: v for k, v in saved["callbacks"].items()}
    assert donor_states["EMATeacher"]["num_updates"] == donor.global_step > 0
    assert_same(probe.callbacks["EMATeacher"], donor_states["EMATeacher"])  # the average, its counters
    assert_same(probe.callbacks["Mixup"], donor_states["Mixup"])  # the generator continues where the donor's stood
    # on the next step: the explored values
    # (the recipe's cosine schedule keeps its progress: the explored lr is its new base learning rate)
    donor_lr = saved["optimizer_states"][0]["param_groups"][0]["lr"]
    assert probe.alpha == 1.5 and probe.lr == pytest.approx(donor_lr * 0.002 / 0.004) and donor_lr < 0.004
    assert member.lr_scheduler_configs[0].scheduler.base_lrs == [0.002]
    # the schedule: the donor's history, then the explored values from the exploit's step on
    assert member_hp.schedule == [(0, donor_values), (donor.global_step, explored)]
    assert donor_hp.schedule == [(0, donor_values)]


def test_tune_file_unknown_key_and_missing_ray_are_clear(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("populaton: 4\nspace: {Mixup.alpha: {uniform: [0.1, 1.0]}}\n")
    with pytest.raises(ValueError, match="unknown key 'populaton' \\(did you mean population\\?\\)"):
        read_tune_file(bad)
    assert read_tune_file(ROOT / "configs" / "tune" / "pbt_mixup.yaml")["population"] == 4
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else object())
    with pytest.raises(SystemExit):
        main(["tune", "--config", str(QUICKSTART), "--tune", str(bad)])
    assert 'pip install -e ".[tune]"' in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason='needs Ray Tune: pip install -e ".[tune]"')
def test_pbt_end_to_end_on_ray(tmp_path):
    from lit_tricks.tune import tune

    result = tune(
        [QUICKSTART, MIXUP],
        SPACE,
        population=2,
        perturbation_interval=1,
        max_epochs=3,
        run_dir=tmp_path,
        name="pbt",
        overrides=SHORT[:2],
    )
    out = tmp_path / "pbt"
    assert (out / "results.csv").is_file() and (out / "schedule.png").is_file()
    rows = json.loads((out / "results.json").read_text())
    assert len(rows) == 2
    for row in rows:  # each member ends on the values Ray's PBT gave it (after any exploit): they were applied
        state = load_checkpoint(Path(row["checkpoint"]) / "checkpoint.ckpt")["callbacks"]
        schedule = next(v["schedule"] for k, v in state.items() if k.startswith("Hyperparameters"))
        assert schedule[-1][1] == {key: row[f"final {key}"] for key in SPACE}
    assert result.best_checkpoint.is_file() and result.schedule[0][0] == 0
    assert result.schedule[-1][1] == result.best_config  # the best member ended on the values it reports
    assert list((tmp_path / "pbt").glob("*/tensorboard/**/events.out.tfevents.*")), "members' TensorBoard logs"
