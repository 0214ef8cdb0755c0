"""Baselines every trick is measured against: a plain Classifier on digits and MNIST-1D, MLP and CNN.

    python benchmarks/baseline.py --seeds 3          # the table in BENCHMARKS.md
    python benchmarks/baseline.py --quick            # a few steps, to check the script runs

Prints a markdown table (test accuracy and ECE as mean ± std over seeds, training wall time, and the time
ratio against the MLP on the same data in the same run) and writes the raw numbers to
benchmarks/results/baseline.json. MNIST-1D uses the paper's set (5,000 signals, 4,000/1,000 split) and its
training budget (Adam, lr 1e-2, batch 100, 6,000 steps); the paper reports ~68% (MLP) and ~94% (CNN).
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from common import fit_and_test, machine_line, mean_std, parser, write_json

from lit_tricks import Classifier
from lit_tricks.data import DigitsDataModule, MNIST1DDataModule
from lit_tricks.nets import CNN1D, CNN2D, MLP

# name -> (data module factory, net factory, Adam lr, optimizer steps); the reference net of a data set first
SETUPS = {
    "digits / MLP": (lambda: DigitsDataModule(batch_size=64, val_fraction=0.0), lambda: MLP(64, 10), 1e-3, 1500),
    "digits / CNN2D": (
        lambda: DigitsDataModule(batch_size=64, val_fraction=0.0, as_image=True),
        lambda: CNN2D(10),
        1e-3,
        1500,
    ),
    "MNIST-1D / MLP": (
        lambda: MNIST1DDataModule(batch_size=100, val_fraction=0.0),
        lambda: MLP(40, 10, hidden=(100, 100)),
        1e-2,
        6000,
    ),
    "MNIST-1D / CNN1D": (lambda: MNIST1DDataModule(batch_size=100, val_fraction=0.0), lambda: CNN1D(10), 1e-2, 6000),
}
PAPER = {"MNIST-1D / MLP": "68", "MNIST-1D / CNN1D": "94"}


def run(name: str, seed: int, quick: bool) -> dict:
    make_data, make_net, lr, steps = SETUPS[name]
    pl.seed_everything(seed, verbose=False)
    datamodule = make_data()
    datamodule.seed = seed
    if quick and isinstance(datamodule, MNIST1DDataModule):
        datamodule.num_samples = 500
    model = Classifier(make_net(), num_classes=10, optimizer=lambda params: torch.optim.Adam(params, lr=lr))
    test, seconds, _ = fit_and_test(model, datamodule, max_steps=20 if quick else steps)
    return {"setup": name, "seed": seed, "acc": test["test/acc"], "ece": test["test/ece"], "fit_seconds": seconds}


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    seeds = range(1 if args.quick else args.seeds)
    runs = [run(name, seed, args.quick) for name in SETUPS for seed in seeds]
    print(machine_line())
    print(f"Seeds: {len(seeds)}{' (quick mode: not a measurement)' if args.quick else ''}\n")
    print("| data / net | test acc (%) | ECE (%) | paper acc (%) | fit time (s) | time vs MLP |")
    print("|---|---|---|---|---|---|")
    reference_time = {}
    for name in SETUPS:
        rows = [r for r in runs if r["setup"] == name]
        seconds = [r["fit_seconds"] for r in rows]
        data = name.split(" / ")[0]
        reference_time.setdefault(data, sum(seconds) / len(seconds))
        ratio = sum(seconds) / len(seconds) / reference_time[data]
        print(
            f"| {name} | {mean_std([r['acc'] for r in rows], 100)} | {mean_std([r['ece'] for r in rows], 100)} "
            f"| {PAPER.get(name, '-')} | {mean_std(seconds)} | {ratio:.2f}x |"
        )
    path = write_json(args.out, "baseline" + ("_quick" if args.quick else ""), {"runs": runs})
    print(f"\nRaw numbers: {path}")


if __name__ == "__main__":
    main()
