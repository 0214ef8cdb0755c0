"""Population Based Training (Jaderberg et al. 2017) of any recipe's hyperparameters, on Ray Tune.

PBT trains a population of runs side by side. Every ``perturbation_interval`` validation rounds, a run in the
bottom quantile of ``metric`` *exploits* one in the top quantile (copies its whole checkpoint: weights,
optimizer, and every callback's state, e.g. the EMA average, the ELR/PS-KD tables, Mixup's generator) and
*explores* (perturbs the donor's hyperparameters by x0.8/x1.2 or resamples them). The result is a
hyperparameter *schedule*, not one value. Ray Tune's ``PopulationBasedTraining`` does the scheduling; a run
is a Lightning fit of the same ``--config`` files that ``python -m lit_tricks fit`` takes, reporting through
Ray's Lightning integration (``TuneReportCheckpointCallback``); :class:`Hyperparameters` applies a run's
values to the live objects after its checkpoint is restored and keeps the schedule in the checkpoint, so
an exploited run inherits its donor's history.

Search-space keys name what changes mid-run: ``<Callback class>.<attribute>`` for an attribute the class lists
in its ``tunable`` tuple (``Mixup.alpha``, ``ELR.lam``, ``EMATeacher.decay``), or ``optimizer.<key>`` /
``model.optimizer.<key>`` for a key of the optimizer's parameter groups (``lr``, ``weight_decay``, ...; with
a learning-rate scheduler, ``lr`` sets its base learning rate). Anything else (data, network shapes, table
sizes) cannot change in a running fit and is refused with the list of what can.

Example (Ray is the optional extra ``pip install -e ".[tune]"``)::

    python -m lit_tricks tune --config configs/noisy_labels.yaml --config configs/tricks/mixup.yaml \\
        --tune configs/tune/pbt_mixup.yaml

or from Python: ``pbt(["configs/quickstart.yaml", "configs/tricks/mixup.yaml"], {"Mixup.alpha":
{"loguniform": [0.1, 2.0]}}, population=4)``. A Ray cluster: ``address="ray://head:10001"`` (``--address``).
"""

from __future__ import annotations

import csv
import json
import os
import random
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

INSTALL = 'PBT needs Ray Tune: pip install -e ".[tune]"  (or: pip install "ray[tune]")'
DISTRIBUTIONS = ("loguniform", "uniform", "choice")
_OPTIMIZER_PREFIXES = ("optimizer.", "model.optimizer.")
_CHECKPOINT = "checkpoint.ckpt"


# ---------------------------------------------------------------------------- the search space
@dataclass(frozen=True)
class Dimension:
    """One searched hyperparameter: ``key`` (``"Mixup.alpha"``, ``"optimizer.lr"``), its distribution and its
    arguments (``[low, high]`` for ``loguniform``/``uniform``, the values for ``choice``)."""

    key: str
    distribution: str
    values: tuple

    @property
    def target(self) -> tuple[str, str]:
        """``("optimizer", "lr")`` or ``("Mixup", "alpha")``: the object and the name the value goes to."""
        for prefix in _OPTIMIZER_PREFIXES:
            if self.key.startswith(prefix):
                return "optimizer", self.key[len(prefix) :]
        owner, _, name = self.key.rpartition(".")
        return owner, name

    def ray_domain(self) -> Any:
        from ray import tune

        if self.distribution == "choice":
            return tune.choice(list(self.values))
        return getattr(tune, self.distribution)(*self.values)


def parse_space(space: Mapping[str, Any]) -> list[Dimension]:
    """Read ``{key: {distribution: args}}`` (e.g. ``{"Mixup.alpha": {"loguniform": [0.1, 2.0]}}``); a malformed
    entry raises ``ValueError`` naming the key and the accepted form."""
    if not isinstance(space, Mapping) or not space:
        raise ValueError(f"space must be a non-empty mapping of key -> {{distribution: args}}, got {space!r}.")
    dims = []
    for key, spec in space.items():
        form = f"write it as {key}: {{loguniform: [low, high]}}, {{uniform: [low, high]}} or {{choice: [a, b, ...]}}"
        owner, _, name = str(key).rpartition(".")
        if not owner or not name:
            raise ValueError(f"space key {key!r} must be '<Callback>.<attribute>' or 'optimizer.<key>'; {form}.")
        if not isinstance(spec, Mapping) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
            raise ValueError(f"space[{key!r}] = {spec!r}: one distribution of {', '.join(DISTRIBUTIONS)}; {form}.")
        ((distribution, values),) = spec.items()
        values = tuple(values) if isinstance(values, (list, tuple)) else (values,)
        if distribution == "choice":
            if not values:
                raise ValueError(f"space[{key!r}]: choice needs at least one value; {form}.")
        else:
            numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
            if len(values) != 2 or not numbers or not values[0] < values[1]:
                raise ValueError(f"space[{key!r}]: {distribution} needs [low, high] numbers with low < high.")
            if distribution == "loguniform" and values[0] <= 0:
                raise ValueError(f"space[{key!r}]: loguniform needs low > 0 (got {values[0]}); use uniform.")
            values = tuple(float(v) for v in values)
        dims.append(Dimension(str(key), distribution, values))
    return dims


# ---------------------------------------------------------------------------- applying values to a live fit
def _callbacks_named(trainer: pl.Trainer, name: str) -> list[Callback]:
    return [cb for cb in trainer.callbacks if type(cb).__name__ == name]


def check_tunable(dims: Sequence[Dimension], trainer: pl.Trainer, optimizers: Sequence[torch.optim.Optimizer]) -> None:
    """Every key names a tunable attribute of a callback in the run, or a key of every optimizer group;
    otherwise ``ValueError`` with what can be tuned."""
    for dim in dims:
        owner, name = dim.target
        if owner == "optimizer":
            keys = sorted({k for opt in optimizers for group in opt.param_groups for k in group if k != "params"})
            if not optimizers or any(name not in group for opt in optimizers for group in opt.param_groups):
                raise ValueError(
                    f"space key {dim.key!r}: the optimizer's parameter groups have no {name!r}; they have {keys}."
                )
            continue
        present = _callbacks_named(trainer, owner)
        if not present:
            names = sorted({type(cb).__name__ for cb in trainer.callbacks if getattr(cb, "tunable", ())})
            raise ValueError(
                f"space key {dim.key!r}: the run has no {owner} callback (add its --config snippet); callbacks "
                f"with tunable hyperparameters in this run: {names or 'none'}."
            )
        tunable = getattr(present[0], "tunable", ())
        if name not in tunable:
            raise ValueError(
                f"space key {dim.key!r}: {owner}.{name} cannot change in a running fit (state shaped by it, or "
                f"read once at setup), so PBT cannot tune it; {owner}'s tunable hyperparameters: "
                f"{', '.join(tunable) or 'none'}."
            )


def apply_values(values: Mapping[str, Any], dims: Sequence[Dimension], trainer: pl.Trainer) -> None:
    """Set each value on the live callback attributes / optimizer groups (and schedulers' base learning rates)."""
    for dim in dims:
        owner, name = dim.target
        value = values[dim.key]
        if owner != "optimizer":
            for callback in _callbacks_named(trainer, owner):
                setattr(callback, name, value)
            continue
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                if name == "lr" and "initial_lr" in group:  # a scheduler drives lr: rescale, keep its progress
                    group["lr"] *= value / group["initial_lr"]
                    group["initial_lr"] = value
                else:
                    group[name] = value
        if name == "lr":
            for config in trainer.lr_scheduler_configs:
                if hasattr(config.scheduler, "base_lrs"):
                    config.scheduler.base_lrs = [value] * len(config.scheduler.base_lrs)


class Hyperparameters(Callback):
    """Apply one PBT member's hyperparameters to the live run and record its schedule.

    Values are applied at ``on_train_start``, after Lightning has restored any checkpoint (so they override
    the donor's after an exploit); the schedule ``[(global_step, {key: value}), ...]`` is part of this
    callback's checkpoint state, so a member that copies a donor inherits the donor's history and the best
    member's final checkpoint holds its whole schedule. Logs ``hp/<key>`` at each validation round.

    Args:
        space: the search space (:func:`parse_space` form or parsed dimensions).
        values: this member's value for every key of ``space``.
    """

    def __init__(self, space: Mapping[str, Any] | Sequence[Dimension], values: Mapping[str, Any]) -> None:
        self.dims = list(space) if not isinstance(space, Mapping) else parse_space(space)
        missing = [dim.key for dim in self.dims if dim.key not in values]
        if missing:
            raise ValueError(f"values has no entry for {missing}; give one value per key of space.")
        self.values = {dim.key: values[dim.key] for dim in self.dims}
        self.schedule: list[tuple[int, dict[str, Any]]] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            check_tunable([d for d in self.dims if d.target[0] != "optimizer"], trainer, [])

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        check_tunable(self.dims, trainer, trainer.optimizers)
        apply_values(self.values, self.dims, trainer)
        if not self.schedule or self.schedule[-1][1] != self.values:
            self.schedule.append((trainer.global_step, dict(self.values)))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        for logger in trainer.loggers:
            numbers = {f"hp/{k}": float(v) for k, v in self.values.items() if isinstance(v, (int, float))}
            logger.log_metrics(numbers, step=trainer.global_step)

    def state_dict(self) -> dict[str, Any]:
        return {"schedule": [(step, dict(values)) for step, values in self.schedule]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.schedule = [(int(step), dict(values)) for step, values in state_dict["schedule"]]


# ---------------------------------------------------------------------------- one member's fit
def build_run(config_files: Sequence[str | Path], overrides: Sequence[str] = ()) -> Any:
    """The instantiated ``LitTricksCLI`` (trainer, model, datamodule) of ``config_files``, not run."""
    from lit_tricks.lightning_cli import LitTricksCLI

    args = [arg for file in config_files for arg in ("--config", str(Path(file).resolve()))]
    with mock.patch.object(sys, "argv", sys.argv[:1]):  # the arguments are these, not the caller's command line
        return LitTricksCLI(args=[*args, *overrides], run=False)


def _configures_logger(files: Sequence[str]) -> bool:
    import yaml

    trees = [yaml.safe_load(Path(file).read_text()) or {} for file in files]
    return any(isinstance((tree.get("trainer") or {}).get("logger"), dict) for tree in trees)


def _trial(config: dict[str, Any], *, files: list[str], dims: list[Dimension], metric: str, overrides: list[str],
           threads: int) -> None:  # fmt: skip
    """Ray Tune's trainable: one member's fit, resumed from the checkpoint Ray hands over (its own after a pause,
    the donor's after an exploit)."""
    import ray.tune
    from ray.tune.integration.pytorch_lightning import TuneReportCheckpointCallback

    torch.set_num_threads(threads)
    trial_dir = Path(ray.tune.get_context().get_trial_dir())
    own = [f"--trainer.default_root_dir={trial_dir}"]  # every member logs under its trial directory, one root
    if _configures_logger(files):
        own.append(f"--trainer.logger.init_args.save_dir={trial_dir / 'tensorboard'}")
    cli = build_run(files, [*overrides, *own])
    trainer = cli.trainer
    report = TuneReportCheckpointCallback(filename=_CHECKPOINT, on="validation_end")
    trainer.callbacks.extend([Hyperparameters(dims, config), report])
    checkpoint = ray.tune.get_checkpoint()
    ckpt_path = None
    if checkpoint is not None:
        ckpt_path = str(Path(checkpoint.to_directory()) / _CHECKPOINT)
    trainer.fit(cli.model, cli.datamodule, ckpt_path=ckpt_path)
    if ckpt_path is None and metric not in trainer.callback_metrics:  # (a restored finished run logs nothing)
        raise ValueError(f"metric {metric!r} was never logged; logged: {sorted(trainer.callback_metrics)}.")


# ---------------------------------------------------------------------------- the driver
@dataclass
class TuneResult:
    """What a tuning run found: the best member's last ``metric``, values, checkpoint and schedule."""

    metric: str
    best_score: float
    best_config: dict[str, Any]
    best_checkpoint: Path
    schedule: list[tuple[int, dict[str, Any]]]
    table: list[dict[str, Any]] = field(default_factory=list)
    run_dir: Path = Path(".")

    def report(self) -> str:
        """The results as text: every member's last metric and values, the best one's schedule, the files."""
        lines = [f"tuning done: best {self.metric} {self.best_score:.4g} with {self.best_config}"]
        lines += [f"  {row['trial'][:40]}: {self.metric} {row[self.metric]}" for row in self.table]
        lines += ["  schedule of the best member (from global step: values):"]
        lines += [f"    {step}: {values}" for step, values in self.schedule]
        lines += [f"  best checkpoint: {self.best_checkpoint}", f"  results: {self.run_dir}/results.csv, .json"]
        lines += [f"  TensorBoard: tensorboard --logdir {self.run_dir}"]
        return "\n".join(lines)


TUNE_FILE_KEYS = (
    "scheduler", "population", "perturbation_interval", "metric", "mode", "max_epochs", "cpus_per_trial",
    "name", "seed", "space",
)  # fmt: skip


def read_tune_file(path: str | Path) -> dict[str, Any]:
    """The settings of a tuning file (``configs/tune/*.yaml``): the keyword arguments of :func:`tune` other
    than the config files, the cluster address and the run directory; unknown keys are an error."""
    import yaml

    from lit_tricks.cli import suggest

    file = Path(path)
    if not file.is_file():
        raise ValueError(f"--tune {path}: no such file; see configs/tune/ for examples.")
    settings = yaml.safe_load(file.read_text()) or {}
    if not isinstance(settings, dict) or "space" not in settings:
        raise ValueError(f"--tune {path}: needs a mapping with a 'space' entry (see configs/tune/pbt_mixup.yaml).")
    for key in settings:
        if key not in TUNE_FILE_KEYS:
            accepted = ", ".join(TUNE_FILE_KEYS)
            raise ValueError(f"--tune {path}: unknown key {key!r}{suggest(key, TUNE_FILE_KEYS)}; accepted: {accepted}.")
    return settings


def _optimizers_of(module: pl.LightningModule) -> list[torch.optim.Optimizer]:
    found = module.configure_optimizers()
    items = found if isinstance(found, (list, tuple)) else [found]
    optimizers = []
    for item in items:
        item = item.get("optimizer") if isinstance(item, dict) else item
        optimizers += [item] if isinstance(item, torch.optim.Optimizer) else []
    return optimizers


def _check_run(config_files: Sequence[str | Path], dims: Sequence[Dimension], overrides: Sequence[str]) -> None:
    """Fail before Ray starts if a key names nothing tunable in this run."""
    cli = build_run(config_files, overrides)
    cli.trainer.strategy.connect(cli.model)
    check_tunable(dims, cli.trainer, _optimizers_of(cli.model))


def tune(
    config_files: Sequence[str | Path],
    space: Mapping[str, Any],
    *,
    scheduler: str = "pbt",
    population: int = 4,
    perturbation_interval: int = 2,
    metric: str = "val/acc",
    mode: str = "max",
    max_epochs: int | None = None,
    cpus_per_trial: float = 1.0,
    address: str | None = None,
    run_dir: str | Path = "tune_runs",
    name: str | None = None,
    seed: int = 0,
    overrides: Sequence[str] = (),
) -> TuneResult:
    """Tune ``space`` over the fit that ``config_files`` describe, with PBT (``scheduler="pbt"``) or random
    search over the same number of members and steps (``"random"``). Writes ``results.csv``/``.json``, the
    best member's schedule (``schedule.json``, ``schedule.png``, TensorBoard ``schedule/``) and every member's
    TensorBoard logs under ``run_dir/name``.

    Args:
        config_files: the ``--config`` files of ``python -m lit_tricks fit``, in order.
        space: ``{key: {distribution: args}}``, see :func:`parse_space`.
        scheduler: ``"pbt"`` or ``"random"``.
        population: members (trials).
        perturbation_interval: validation rounds between PBT's exploit/explore steps.
        metric, mode: what PBT ranks members by (a logged metric, ``"max"`` or ``"min"``).
        max_epochs: overrides the recipe's ``trainer.max_epochs``.
        cpus_per_trial: Ray resources per member (torch threads too).
        address: an existing Ray cluster (``"ray://host:10001"`` or ``"auto"``); None starts Ray locally.
        run_dir, name: where the results go (``name`` defaults to the config files' stems and the scheduler).
        seed: seeds the members' initial values and PBT's choices (each fit keeps its recipe's seed).
        overrides: more command-line arguments for every member's fit, e.g. ``["--trainer.limit_train_batches=10"]``.
    """
    try:
        import ray
        from ray import tune as ray_tune
        from ray.tune.schedulers import PopulationBasedTraining
    except ImportError as error:
        raise ImportError(INSTALL) from error
    from lit_tricks.core.checks import check_number

    dims = parse_space(space)
    if scheduler not in ("pbt", "random"):
        raise ValueError(f"scheduler must be 'pbt' or 'random', got {scheduler!r}.")
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', got {mode!r}.")
    check_number("population", population, at_least=2 if scheduler == "pbt" else 1, integer=True)
    check_number("perturbation_interval", perturbation_interval, at_least=1, integer=True)
    check_number("cpus_per_trial", cpus_per_trial, above=0)
    missing = [str(f) for f in config_files if not Path(f).is_file()]
    if not config_files or missing:
        raise ValueError(f"config_files: no such file {missing}" if missing else "config_files: give at least one.")
    files = [str(Path(f).resolve()) for f in config_files]
    overrides = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", *overrides]
    overrides += [f"--trainer.max_epochs={max_epochs}"] if max_epochs is not None else []
    _check_run(files, dims, overrides)

    name = name or "+".join(Path(f).stem for f in files) + f"-{scheduler}"
    root = Path(run_dir).resolve()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    random.seed(seed)  # Ray's PBT draws its exploit/explore choices from `random`
    trainable = ray_tune.with_parameters(
        _trial, files=files, dims=dims, metric=metric, overrides=overrides, threads=max(1, int(cpus_per_trial))
    )
    domains = {dim.key: dim.ray_domain() for dim in dims}
    pbt = None
    if scheduler == "pbt":
        # PBT's explore: a list is perturbed to a neighbouring value, a domain multiplied by 0.8 or 1.2
        mutations = {dim.key: list(dim.values) if dim.distribution == "choice" else domains[dim.key] for dim in dims}
        pbt = PopulationBasedTraining(perturbation_interval=perturbation_interval, hyperparam_mutations=mutations)
    tuner = ray_tune.Tuner(
        ray_tune.with_resources(trainable, {"cpu": cpus_per_trial}),
        param_space=domains,
        tune_config=ray_tune.TuneConfig(
            metric=metric,
            mode=mode,
            scheduler=pbt,
            num_samples=population,
            search_alg=BasicVariantGenerator(random_state=seed),
        ),
        run_config=ray_tune.RunConfig(
            name=name,
            storage_path=str(root),
            checkpoint_config=ray_tune.CheckpointConfig(num_to_keep=None),  # an exploit may copy any report
            verbose=1,
        ),
    )
    grid = tuner.fit()
    return _summarise(grid, dims, metric, mode, root / name)


def _summarise(grid: Any, dims: Sequence[Dimension], metric: str, mode: str, out: Path) -> TuneResult:
    errors = [result.error for result in grid if result.error is not None]
    if errors:
        raise RuntimeError(f"{len(errors)} tuning member(s) failed; the first: {errors[0]}")
    table = []
    for result in grid:
        row = {"trial": Path(result.path).name, metric: result.metrics.get(metric)}
        row.update({f"final {dim.key}": result.config[dim.key] for dim in dims})
        row["validation rounds"] = result.metrics.get("training_iteration")
        row["checkpoint"] = result.checkpoint.path if result.checkpoint else None
        table.append(row)
    best = grid.get_best_result(metric=metric, mode=mode, scope="last")
    ckpt = Path(best.checkpoint.path) / _CHECKPOINT
    from lit_tricks.core.checkpoint import load_checkpoint

    state = load_checkpoint(ckpt).get("callbacks", {})
    schedule = next((v["schedule"] for k, v in state.items() if k.startswith("Hyperparameters")), [])
    out.mkdir(parents=True, exist_ok=True)
    with (out / "results.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    (out / "results.json").write_text(json.dumps(table, indent=2, default=str))
    (out / "schedule.json").write_text(json.dumps(schedule, indent=2))
    plot_schedule(schedule, out)
    return TuneResult(metric, float(best.metrics[metric]), dict(best.config), ckpt, schedule, table, out)


def plot_schedule(schedule: Sequence[tuple[int, Mapping[str, Any]]], out: Path) -> None:
    """The schedule as step functions: ``schedule.png`` (matplotlib, if installed) and TensorBoard scalars
    ``schedule/<key>`` under ``out/schedule``."""
    from torch.utils.tensorboard import SummaryWriter

    numeric = sorted({k for _, values in schedule for k, v in values.items() if isinstance(v, (int, float))})
    with SummaryWriter(str(out / "schedule")) as writer:
        for step, values in schedule:
            for key in numeric:
                writer.add_scalar(f"schedule/{key}", float(values[key]), step)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(len(numeric), 1, figsize=(6, 2.2 * max(1, len(numeric))), squeeze=False)
    for ax, key in zip(axes[:, 0], numeric, strict=False):
        steps = [step for step, _ in schedule]
        ax.step(steps, [values[key] for _, values in schedule], where="post")
        ax.set_ylabel(key)
    axes[-1, 0].set_xlabel("global step")
    fig.tight_layout()
    fig.savefig(out / "schedule.png", dpi=100)
    plt.close(fig)
