"""Time to accuracy with less data per step: RS2 and selective backprop vs full-data training on MNIST-1D.

    python benchmarks/data_selection.py --seeds 3
    python benchmarks/data_selection.py --quick
    python benchmarks/data_selection.py --seeds 3 --part one_epoch   # only the second table
    python benchmarks/data_selection.py --seeds 3 --part hard_batches   # only the third table

MNIST-1D with 70,000 signals (56,000 training, 14,000 test), the CNN1D, Adam (lr 1e-2) with a cosine schedule
over each run's own optimizer steps, batch 128, 10 epochs (RS2: 10 rounds of a fraction r of the data, the
paper's reduced budget). Every ~1/8 of a full-data epoch (and at the end) the model is evaluated on 5,000 test
signals; the clock stops during evaluation. The target is the full-data run's final accuracy minus one point
(per seed); "time to target" is the training time until an evaluation first reaches it.

Second table, "One Epoch Is All You Need" (Komatsuzaki, 2019) at equal compute: the same CNN1D, Adam (lr 1e-2,
cosine over the run), batch 64 and 800 optimizer steps (51,200 samples seen) on one pass over 51,200 fresh
MNIST-1D signals vs many epochs over a fixed set of 5,000 or 15,000 of them (a different random subset per seed).
The signals are generated once (64,000 with the package's generator, seed 7: 51,200 training, 12,800 test); as
every signal is an independent draw, one pass over the pool is the same as generating a fresh batch every step.
Final accuracy on the 12,800 test signals.

Third table, hard mini-batches (Sahayam et al., arXiv 2304.03486) at the paper's equal budget: the first table's
net and optimizer on 20,000 MNIST-1D signals (16,000 training, 4,000 test), batch 128, E = 10 epochs of b = 125
batches = 1,250 optimizer steps in every row (cosine over them).
Plain shuffled training; the paper's baseline (fixed batches in a fixed order, delta = 1); and hard batches (fixed
batches, a full first epoch, then rounds of the int(delta * b) batches of highest last loss). Accuracy on the 4,000
test signals every b steps (one epoch's worth); the target is the shuffled run's final accuracy minus one point
(per seed), reached after how many epochs' worth of steps (the paper's "faster generalisation").
"""

from __future__ import annotations

import time

import lightning.pytorch as pl
import torch
from common import machine_line, mean_std, parser, write_json
from lightning.pytorch.callbacks import Callback

from lit_tricks import Classifier, SelectiveBackprop
from lit_tricks.callbacks.hard_batches import HardBatches
from lit_tricks.core.eval_mode import eval_mode
from lit_tricks.data import MNIST1DDataModule
from lit_tricks.data.indexed import ArrayDataset
from lit_tricks.data.mnist1d import generate_mnist1d
from lit_tricks.nets import CNN1D

EPOCHS, BATCH, EVAL_SAMPLES, EVALS_PER_EPOCH = 10, 128, 5000, 8
ONE_EPOCH_BATCH, ONE_EPOCH_STEPS, FIXED_SETS = 64, 800, (5_000, 15_000)  # one pass: 800 x 64 = 51,200 samples
HARD_BATCH_SAMPLES = 20_000
METHODS = {
    "full data": ({}, []),
    "RS2 r=0.5": ({"rs2_fraction": 0.5}, []),
    "RS2 r=0.25": ({"rs2_fraction": 0.25}, []),
    "RS2 r=0.1": ({"rs2_fraction": 0.1}, []),
    "SelectiveBackprop (Composer defaults)": ({}, [lambda: SelectiveBackprop(keep=0.5, start=0.5, end=0.9)]),
    "SelectiveBackprop keep=0.3, whole run": ({}, [lambda: SelectiveBackprop(0.3, start=0.0, end=1.0, interrupt=0)]),
}
HARD_BATCHES = {"shuffled batches": None, "fixed batches (delta = 1)": 1.0, "hard batches delta = 0.5": 0.5,
                "hard batches delta = 0.2": 0.2}  # fmt: skip


class AccuracyClock(Callback):
    """Evaluates every ``every`` optimizer steps (and at the end) on fixed tensors; records
    ``(training seconds, accuracy)`` with the clock paused during evaluation."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor, every: int) -> None:
        self.inputs, self.targets, self.every = inputs, targets, every
        self.curve: list[tuple[float, float]] = []

    def on_train_start(self, trainer, pl_module):
        self.seconds, self.started = 0.0, time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step % self.every == 0:
            self._evaluate(pl_module)

    def on_train_end(self, trainer, pl_module):
        if not self.curve or trainer.global_step % self.every:
            self._evaluate(pl_module)

    def _evaluate(self, module):
        self.seconds += time.perf_counter() - self.started
        with torch.no_grad(), eval_mode(module):
            acc = (module(self.inputs).argmax(dim=-1) == self.targets).float().mean().item()
        self.curve.append((self.seconds, acc))
        self.started = time.perf_counter()


def run(base: MNIST1DDataModule, method: str, seed: int, epochs: int) -> dict:
    data_kwargs, tricks = METHODS[method]
    pl.seed_everything(seed, verbose=False)
    datamodule = MNIST1DDataModule(batch_size=BATCH, val_fraction=0.0, seed=seed, **data_kwargs)
    datamodule.train_set, datamodule.test_set = base.train_set, base.test_set  # generated once
    fraction = data_kwargs.get("rs2_fraction", 1.0)
    steps = epochs * -(-round(fraction * len(base.train_set)) // BATCH)
    model = Classifier(
        CNN1D(10),
        num_classes=10,
        optimizer=lambda params: torch.optim.Adam(params, lr=1e-2),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps),
        scheduler_interval="step",
    )
    every = max(1, len(base.train_set) // BATCH // EVALS_PER_EPOCH)
    clock = AccuracyClock(base.test_set.inputs[:EVAL_SAMPLES], base.test_set.targets[:EVAL_SAMPLES], every)
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[*(make() for make in tricks), clock],
    )  # fmt: skip
    trainer.fit(model, datamodule)
    return {"method": method, "seed": seed, "steps": trainer.global_step, "curve": clock.curve,
            "final_acc": clock.curve[-1][1], "train_seconds": clock.curve[-1][0]}  # fmt: skip


def time_to(curve: list[tuple[float, float]], target: float) -> float | None:
    return next((seconds for seconds, acc in curve if acc >= target), None)


def one_epoch_run(pool: ArrayDataset, test: ArrayDataset, size: int | None, seed: int, steps: int) -> dict:
    """``steps`` optimizer steps on ``size`` signals of the pool (a random subset per seed) for as many epochs
    as that takes, or (``size=None``) on one pass over ``steps * ONE_EPOCH_BATCH`` of them."""
    pl.seed_everything(seed, verbose=False)
    seen = steps * ONE_EPOCH_BATCH
    rows = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[: size or seen]
    datamodule = MNIST1DDataModule(batch_size=ONE_EPOCH_BATCH, val_fraction=0.0, seed=seed)
    datamodule.train_set, datamodule.test_set = pool.subset(rows), test
    model = Classifier(
        CNN1D(10),
        num_classes=10,
        optimizer=lambda params: torch.optim.Adam(params, lr=1e-2),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps),
        scheduler_interval="step",
    )
    trainer = pl.Trainer(
        max_steps=steps, max_epochs=-1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(model, datamodule)
    seconds = time.perf_counter() - start
    with torch.no_grad(), eval_mode(model):
        acc = (model(test.inputs).argmax(dim=-1) == test.targets).float().mean().item()
    return {"data": "fresh (one pass)" if size is None else f"fixed {size:,}", "distinct": len(rows),
            "epochs": seen / len(rows), "seed": seed, "steps": trainer.global_step, "test_acc": acc,
            "train_seconds": seconds}  # fmt: skip


def one_epoch(args) -> None:
    """The second table: one pass over fresh signals vs many epochs on a fixed set, at equal compute."""
    seeds = range(1 if args.quick else args.seeds)
    steps = 20 if args.quick else ONE_EPOCH_STEPS
    fixed = (320,) if args.quick else FIXED_SETS
    data = generate_mnist1d(round(steps * ONE_EPOCH_BATCH / 0.8), seed=7)
    pool = ArrayDataset(torch.as_tensor(data["x"], dtype=torch.float32), torch.as_tensor(data["y"]))
    test = ArrayDataset(torch.as_tensor(data["x_test"], dtype=torch.float32), torch.as_tensor(data["y_test"]))
    runs = [one_epoch_run(pool, test, size, seed, steps) for seed in seeds for size in (*fixed, None)]

    print(machine_line())
    print(f"Seeds: {len(seeds)}{' (quick mode: not a measurement)' if args.quick else ''}\n")
    print(f"| training data ({steps} steps of {ONE_EPOCH_BATCH}) | distinct signals | epochs | test acc (%) "
          "| training time (s) |")  # fmt: skip
    print("|---|---|---|---|---|")
    for name in dict.fromkeys(r["data"] for r in runs):
        rows = [r for r in runs if r["data"] == name]
        print(
            f"| {name} | {rows[0]['distinct']:,} | {rows[0]['epochs']:.1f} | "
            f"{mean_std([r['test_acc'] for r in rows], 100)} | {mean_std([r['train_seconds'] for r in rows])} |"
        )
    path = write_json(args.out, "data_selection_one_epoch" + ("_quick" if args.quick else ""), {"runs": runs})
    print(f"\nRaw numbers: {path}")


def selection(args) -> None:
    """The first table: RS2 and selective backprop vs full data."""
    seeds = range(1 if args.quick else args.seeds)
    epochs = 1 if args.quick else EPOCHS
    base = MNIST1DDataModule(num_samples=2000 if args.quick else 70_000, val_fraction=0.0)
    base.setup()
    run(base, "full data", 0, 1)  # untimed warm-up
    runs = [run(base, method, seed, epochs) for seed in seeds for method in METHODS]
    for r in runs:
        baseline = next(b for b in runs if b["seed"] == r["seed"] and b["method"] == "full data")
        r["target"] = baseline["final_acc"] - 0.01
        r["time_to_target"] = time_to(r["curve"], r["target"])
        baseline_time = time_to(baseline["curve"], r["target"])
        r["ratio"] = None if r["time_to_target"] is None else r["time_to_target"] / baseline_time

    print(machine_line())
    print(f"Seeds: {len(seeds)}{' (quick mode: not a measurement)' if args.quick else ''}\n")
    print("| method | optimizer steps | final acc (%) | training time (s) | reached target | time to target (s) "
          "| time to target vs full data |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for method in METHODS:
        rows = [r for r in runs if r["method"] == method]
        reached = [r for r in rows if r["ratio"] is not None]
        to_target = mean_std([r["time_to_target"] for r in reached]) if reached else "-"
        ratio = mean_std([r["ratio"] for r in reached], digits=2) + "x" if reached else "-"
        print(
            f"| {method} | {rows[0]['steps']} | {mean_std([r['final_acc'] for r in rows], 100)} "
            f"| {mean_std([r['train_seconds'] for r in rows])} | {len(reached)}/{len(rows)} | {to_target} | {ratio} |"
        )
    path = write_json(args.out, "data_selection" + ("_quick" if args.quick else ""), {"runs": runs})
    print(f"\nRaw numbers: {path}")


def hard_batch_run(base: MNIST1DDataModule, method: str, seed: int, epochs: int) -> dict:
    """``epochs * b`` optimizer steps, shuffled or on hard batches; the test accuracy every ``b`` steps."""
    delta = HARD_BATCHES[method]
    pl.seed_everything(seed, verbose=False)
    datamodule = MNIST1DDataModule(batch_size=BATCH, val_fraction=0.0, seed=seed, hard_batches=delta)
    datamodule.train_set, datamodule.test_set = base.train_set, base.test_set
    b = len(base.train_set) // BATCH
    model = Classifier(
        CNN1D(10),
        num_classes=10,
        optimizer=lambda params: torch.optim.Adam(params, lr=1e-2),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * b),
        scheduler_interval="step",
    )
    clock = AccuracyClock(base.test_set.inputs[:EVAL_SAMPLES], base.test_set.targets[:EVAL_SAMPLES], b)
    trainer = pl.Trainer(
        max_steps=epochs * b, max_epochs=-1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
        callbacks=[*([] if delta is None else [HardBatches()]), clock],
    )  # fmt: skip
    trainer.fit(model, datamodule)
    return {"method": method, "seed": seed, "steps": trainer.global_step, "curve": clock.curve,
            "final_acc": clock.curve[-1][1], "best_acc": max(acc for _, acc in clock.curve)}  # fmt: skip


def hard_batches(args) -> None:
    """The third table: hard mini-batches vs shuffled and fixed-order training at equal steps."""
    seeds = range(1 if args.quick else args.seeds)
    epochs = 2 if args.quick else EPOCHS
    base = MNIST1DDataModule(num_samples=2000 if args.quick else HARD_BATCH_SAMPLES, val_fraction=0.0)
    base.setup()
    runs = [hard_batch_run(base, method, seed, epochs) for seed in seeds for method in HARD_BATCHES]
    for r in runs:
        baseline = next(b for b in runs if b["seed"] == r["seed"] and b["method"] == "shuffled batches")
        r["target"] = baseline["final_acc"] - 0.01
        r["epochs_to_target"] = next((i + 1 for i, (_, acc) in enumerate(r["curve"]) if acc >= r["target"]), None)

    print(machine_line())
    print(f"Seeds: {len(seeds)}{' (quick mode: not a measurement)' if args.quick else ''}\n")
    print("| method | optimizer steps | final acc (%) | best acc (%) | reached target | epochs (x b steps) to target |")
    print("|---|---|---|---|---|---|")
    for method in HARD_BATCHES:
        rows = [r for r in runs if r["method"] == method]
        reached = [r["epochs_to_target"] for r in rows if r["epochs_to_target"] is not None]
        print(
            f"| {method} | {rows[0]['steps']} | {mean_std([r['final_acc'] for r in rows], 100)} "
            f"| {mean_std([r['best_acc'] for r in rows], 100)} | {len(reached)}/{len(rows)} "
            f"| {mean_std(reached) if reached else '-'} |"
        )
    path = write_json(args.out, "data_selection_hard_batches" + ("_quick" if args.quick else ""), {"runs": runs})
    print(f"\nRaw numbers: {path}")


def main() -> None:
    cli = parser(__doc__.splitlines()[0])
    parts = ("all", "selection", "one_epoch", "hard_batches")
    cli.add_argument("--part", choices=parts, default="all", help="which table(s)")
    args = cli.parse_args()
    tables = {"selection": selection, "one_epoch": one_epoch, "hard_batches": hard_batches}
    for i, name in enumerate(name for name in tables if args.part in ("all", name)):
        if i:
            print()
        tables[name](args)


if __name__ == "__main__":
    main()
