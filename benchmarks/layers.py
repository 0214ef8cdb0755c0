"""Layer transforms: Ghost BatchNorm at a large batch, and multi-sample dropout, against their baselines.

    python benchmarks/layers.py --seeds 3     # the table in BENCHMARKS.md (a few minutes on 2 CPU cores)
    python benchmarks/layers.py --quick       # a few steps, to check the script runs

Ghost BN (the paper's setting, scaled down): digits / CNN2D for the same number of epochs with batch 512
(plain BatchNorm), batch 512 with ghost batches of 32, and batch 32 (16x more updates); Adam, lr 1e-3.
Multi-sample dropout: MNIST-1D / MLP (100, 100), Adam lr 1e-2, batch 100, dropout 0.5 before the head with
K = 1 (plain dropout) and K = 8 samples, and no dropout. Prints test accuracy and ECE (mean ± std over seeds),
fit time and its ratio to the first row of each block, and writes
benchmarks/results/layers.json.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from common import fit_and_test, machine_line, mean_std, parser, write_json

from lit_tricks import Classifier
from lit_tricks.callbacks.ghost_batch_norm import ApplyGhostBatchNorm
from lit_tricks.callbacks.multi_sample_dropout import ApplyMultiSampleDropout
from lit_tricks.data import DigitsDataModule, MNIST1DDataModule
from lit_tricks.nets import CNN2D, MLP

GHOST_EPOCHS, MSD_STEPS = 40, 1500
# name -> (batch size, callbacks factory)
GHOST = {
    "plain BN 512": (512, list),
    "Ghost BN 512/32": (512, lambda: [ApplyGhostBatchNorm(virtual_batch_size=32)]),
    "plain BN 32": (32, list),
}
# name -> callbacks factory (None: no dropout at all)
MSD = {
    "MSD K=1": lambda: [ApplyMultiSampleDropout(p=0.5, samples=1)],
    "MSD K=8": lambda: [ApplyMultiSampleDropout(p=0.5, samples=8)],
    "no dropout": list,
}


def _adam(lr: float):
    return lambda params: torch.optim.Adam(params, lr=lr)


def run_ghost(name: str, seed: int, quick: bool) -> dict:
    batch_size, callbacks = GHOST[name]
    pl.seed_everything(seed, verbose=False)
    data = DigitsDataModule(batch_size=batch_size, val_fraction=0.0, as_image=True, seed=seed)
    model = Classifier(CNN2D(10), num_classes=10, optimizer=_adam(1e-3))
    budget = {"max_steps": 2} if quick else {"max_epochs": GHOST_EPOCHS}
    test, seconds, trainer = fit_and_test(model, data, callbacks=callbacks(), **budget)
    return _row("ghost", name, seed, test, seconds, trainer)


def run_msd(name: str, seed: int, quick: bool) -> dict:
    pl.seed_everything(seed, verbose=False)
    data = MNIST1DDataModule(num_samples=500 if quick else 5000, batch_size=100, val_fraction=0.0, seed=seed)
    model = Classifier(MLP(40, 10, hidden=(100, 100)), num_classes=10, optimizer=_adam(1e-2))
    test, seconds, trainer = fit_and_test(model, data, callbacks=MSD[name](), max_steps=5 if quick else MSD_STEPS)
    return _row("msd", name, seed, test, seconds, trainer)


def _row(block: str, name: str, seed: int, test: dict, seconds: float, trainer: pl.Trainer) -> dict:
    return {
        "block": block,
        "setup": name,
        "seed": seed,
        "acc": test["test/acc"],
        "ece": test["test/ece"],
        "steps": trainer.global_step,
        "fit_seconds": seconds,
    }


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    seeds = range(1 if args.quick else args.seeds)
    runs = [run_ghost(name, seed, args.quick) for name in GHOST for seed in seeds]
    runs += [run_msd(name, seed, args.quick) for name in MSD for seed in seeds]
    print(machine_line())
    print(f"Seeds: {len(seeds)}{' (quick mode: not a measurement)' if args.quick else ''}\n")
    print("| setup | steps | test acc (%) | ECE (%) | fit time (s) | time vs first row |")
    print("|---|---|---|---|---|---|")
    for names in (GHOST, MSD):
        reference = None
        for name in names:
            rows = [r for r in runs if r["setup"] == name]
            seconds = [r["fit_seconds"] for r in rows]
            reference = reference or sum(seconds) / len(seconds)
            print(
                f"| {name} | {rows[0]['steps']} | {mean_std([r['acc'] for r in rows], 100)} "
                f"| {mean_std([r['ece'] for r in rows], 100)} "
                f"| {mean_std(seconds)} | {sum(seconds) / len(seconds) / reference:.2f}x |"
            )
    path = write_json(args.out, "layers" + ("_quick" if args.quick else ""), {"runs": runs})
    print(f"\nRaw numbers: {path}")


if __name__ == "__main__":
    main()
