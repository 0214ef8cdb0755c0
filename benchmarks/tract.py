"""TrAct (first layer trained on its pre-activations) against plain training, at a short and a long budget.

    python benchmarks/tract.py --seeds 3     # the table in BENCHMARKS.md (several minutes on 2 CPU cores)
    python benchmarks/tract.py --quick       # a few steps, to check the script runs

The paper's claim is faster training of the first layer: equal accuracy in fewer epochs. Each set-up is fitted
for short to long budgets, plain and with ``ApplyTrAct(lam=0.1)`` (the paper's default) on its first conv:
digits / CNN2D (Adam, lr 1e-3, batch 64, 3 and 30 epochs) and MNIST-1D / CNN1D (Adam, lr 1e-2, batch 100, 5,
10, 20 and 50 epochs); constant learning rate, so a short run is the start of a longer one. Plain and TrAct runs
alternate (same seed, same budget), so their fit-time ratio shares the machine's load. Prints test accuracy and
ECE (mean ± std over seeds), fit time and TrAct's time relative to plain, and writes benchmarks/results/tract.json.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from common import fit_and_test, machine_line, mean_std, parser, write_json

from lit_tricks import Classifier
from lit_tricks.callbacks.tract import ApplyTrAct
from lit_tricks.data import DigitsDataModule, MNIST1DDataModule
from lit_tricks.nets import CNN1D, CNN2D

LAM = 0.1
# name -> (data module factory(seed), net factory, Adam lr, epoch budgets from short to long)
SETUPS = {
    "digits / CNN2D": (
        lambda seed: DigitsDataModule(batch_size=64, val_fraction=0.0, as_image=True, seed=seed),
        CNN2D,
        1e-3,
        (3, 30),
    ),
    "MNIST-1D / CNN1D": (
        lambda seed: MNIST1DDataModule(batch_size=100, val_fraction=0.0, seed=seed),
        CNN1D,
        1e-2,
        (5, 10, 20, 50),
    ),
}
METHODS = ("plain", "TrAct")


def budgets(setup: str, quick: bool) -> tuple[int, ...]:
    """The set-up's epoch budgets; quick mode: the shortest only."""
    return SETUPS[setup][3][:1] if quick else SETUPS[setup][3]


def run(setup: str, method: str, epochs: int, seed: int, quick: bool) -> dict:
    make_data, make_net, lr, _ = SETUPS[setup]
    pl.seed_everything(seed, verbose=False)
    data = make_data(seed)
    if quick and isinstance(data, MNIST1DDataModule):
        data.num_samples = 500
    model = Classifier(make_net(10), num_classes=10, optimizer=lambda params: torch.optim.Adam(params, lr=lr))
    callbacks = [ApplyTrAct(lam=LAM)] if method == "TrAct" else []
    budget = {"max_steps": 2} if quick else {"max_epochs": epochs}
    test, seconds, trainer = fit_and_test(model, data, callbacks=callbacks, **budget)
    return {
        "setup": setup,
        "method": method,
        "epochs": epochs,
        "seed": seed,
        "acc": test["test/acc"],
        "ece": test["test/ece"],
        "steps": trainer.global_step,
        "fit_seconds": seconds,
    }


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    seeds = range(1 if args.quick else args.seeds)
    runs = [
        run(setup, method, epochs, seed, args.quick)
        for setup in SETUPS
        for epochs in budgets(setup, args.quick)
        for seed in seeds
        for method in METHODS  # alternate plain and TrAct
    ]
    print(machine_line())
    print(f"Seeds: {len(seeds)}{' (quick mode: not a measurement)' if args.quick else ''}, lam {LAM}\n")
    print("| set-up | epochs | method | steps | test acc (%) | ECE (%) | fit time (s) | time vs plain |")
    print("|---|---|---|---|---|---|---|---|")
    for setup in SETUPS:
        for epochs in budgets(setup, args.quick):
            plain = [
                r["fit_seconds"] for r in runs if (r["setup"], r["epochs"], r["method"]) == (setup, epochs, "plain")
            ]
            for method in METHODS:
                rows = [r for r in runs if (r["setup"], r["epochs"], r["method"]) == (setup, epochs, method)]
                seconds = [r["fit_seconds"] for r in rows]
                print(
                    f"| {setup} | {epochs} | {method} | {rows[0]['steps']} | {mean_std([r['acc'] for r in rows], 100)} "
                    f"| {mean_std([r['ece'] for r in rows], 100)} | {mean_std(seconds)} "
                    f"| {sum(seconds) / sum(plain):.2f}x |"
                )
    path = write_json(args.out, "tract" + ("_quick" if args.quick else ""), {"lam": LAM, "runs": runs})
    print(f"\nRaw numbers: {path}")


if __name__ == "__main__":
    main()
