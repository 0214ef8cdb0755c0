"""Layer transforms: Ghost BatchNorm at a large batch, and multi-sample dropout, against their baselines.

    python benchmarks/layers.py --seeds 3     # the table in BENCHMARKS.md (a few minutes on 2 CPU cores)
    python benchmarks/layers.py --quick       # a few steps, to check the script runs

Ghost BN (the paper's setting, scaled down), the same number of epochs with a large batch (plain BatchNorm),
the large batch with small ghost batches, and the small batch (many more updates): digits / CNN2D with
512 / 32 (Adam, lr 1e-3, 40 epochs) and MNIST-1D / CNN1D with 1000 / 50 (Adam, lr 1e-2, 30 epochs).
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
from lit_tricks.nets import CNN1D, CNN2D, MLP

MSD_STEPS = 1500
# name -> (data module factory(batch size, seed), net factory, Adam lr, epochs, batch size, virtual batch size)
_DIGITS = (lambda batch, seed: DigitsDataModule(batch_size=batch, val_fraction=0.0, as_image=True, seed=seed), CNN2D)
_MNIST1D = (lambda batch, seed: MNIST1DDataModule(batch_size=batch, val_fraction=0.0, seed=seed), CNN1D)
GHOST = {
    "plain BN 512": (*_DIGITS, 1e-3, 40, 512, None),
    "Ghost BN 512/32": (*_DIGITS, 1e-3, 40, 512, 32),
    "plain BN 32": (*_DIGITS, 1e-3, 40, 32, None),
    "plain BN 1000": (*_MNIST1D, 1e-2, 30, 1000, None),
    "Ghost BN 1000/50": (*_MNIST1D, 1e-2, 30, 1000, 50),
    "plain BN 50": (*_MNIST1D, 1e-2, 30, 50, None),
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
    make_data, make_net, lr, epochs, batch_size, virtual = GHOST[name]
    pl.seed_everything(seed, verbose=False)
    data = make_data(batch_size, seed)
    if quick and isinstance(data, MNIST1DDataModule):
        data.num_samples = 500
    model = Classifier(make_net(10), num_classes=10, optimizer=_adam(lr))
    callbacks = [ApplyGhostBatchNorm(virtual_batch_size=virtual)] if virtual else []
    budget = {"max_steps": 2} if quick else {"max_epochs": epochs}
    test, seconds, trainer = fit_and_test(model, data, callbacks=callbacks, **budget)
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
    blocks = [list(GHOST)[:3], list(GHOST)[3:], list(MSD)]
    for names in blocks:
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
