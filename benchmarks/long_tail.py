"""Long-tailed (and noisy) training sets: ERM vs rebalancing samplers vs robust losses, on balanced test sets.

    python benchmarks/long_tail.py --seeds 3
    python benchmarks/long_tail.py --quick

The networks, optimisers and step budgets of benchmarks/label_noise.py (digits / MLP, MNIST-1D / CNN1D, Adam), with
the training split cut to an exponential long tail of imbalance ratio rho (n_max / n_min) and, in some cells, 20%
symmetric label noise applied after the cut (test labels clean, test split balanced). Every method trains for the
same number of optimizer steps: ERM's epochs over the long-tailed split, so a sampler that draws a longer or shorter
epoch does not change the budget. Metrics on the test split: balanced accuracy (mean per-class recall), few-shot
accuracy (classes with <= 20 training samples), accuracy, ECE. Methods: class-balanced over- and under-sampling
(`balance=`, Buda et al.), LDR-KL (lambda 1, margin 0.1), the Bias loss (alpha = beta = 0.3), ELR (beta 0.7,
lambda 3), AdaWAC (eta 1, lambda_AC 1, two default_augment views) and SBCL (beside the cross-entropy, weight 1; tau 0.1,
tau_b 0.07, gamma 0.25, subclasses of >= 10, re-clustered every 10 epochs after 10 of SupCon), each with its authors'
defaults, none tuned;
SMOTE (imbalanced-learn, k = 2 neighbours; not on digits at rho 100, whose tail class has one sample); ERM and
over-sampling also tested with the prior correction (thresholding) of Buda et al. (`Classifier(prior_correction=True)`),
the same fit tested twice. Fit time: the fit's wall time over
ERM's in the same cell (the prior-corrected rows are the same fits).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from common import SETUPS, fit_and_test, machine_line, mean_std, parser, prepare, write_json

from lit_tricks import ELR, RCAL, SBCL, AdaWAC, BiasLoss, HardBatches, LDRLoss

# method -> (data-module options, the tricks)
METHODS: dict[str, tuple[dict, Callable[[], list]]] = {
    "ERM": ({}, lambda: []),
    "over-sampling": ({"balance": "over"}, lambda: []),
    "under-sampling": ({"balance": "under"}, lambda: []),
    "SMOTE": ({"smote": {"k_neighbors": 2}}, lambda: []),  # k 2: MNIST-1D's rho-100 tail holds 3 samples
    "LDR-KL": ({}, lambda: [LDRLoss(lam=1.0)]),
    "Bias loss": ({}, lambda: [BiasLoss()]),
    "ELR": ({}, lambda: [ELR(beta=0.7, lam=3.0)]),
    "AdaWAC": ({}, lambda: [AdaWAC(step_size=1.0, consistency_weight=1.0)]),
    "SBCL": ({}, lambda: [SBCL()]),
    "RCAL": ({}, lambda: [RCAL(warmup_epochs=5, every_n_epochs=5, reg_weight=0.0)]),  # no SSL encoder: no regulariser
    "hard batches": ({"hard_batches": 0.5}, lambda: [HardBatches()]),  # Sahayam et al.: the harder half each round
}
CELLS = [(100.0, 0.0), (100.0, 0.2), (10.0, 0.0), (10.0, 0.2)]  # (rho, label noise)
# tested a second time with Classifier(prior_correction=True)'s thresholding: one fit, two rows
CORRECTED = ("ERM", "over-sampling")
SKIP = {("digits / MLP", 100.0, "SMOTE")}  # a tail class of one sample: SMOTE has no neighbour to interpolate


def rows_of(data: str, rho: float) -> list[str]:
    """The table's rows for a set-up and rho: the methods, then the prior-corrected ones."""
    methods = [m for m in METHODS if (data, rho, m) not in SKIP]
    return methods + [f"{m} + prior correction" for m in CORRECTED]


def _row(test: dict, **keys) -> dict:
    return {**keys, "acc": test["test/acc"], "balanced_acc": test["test/balanced_acc"],
            "few_acc": test["test/few_acc"], "ece": test["test/ece"]}  # fmt: skip


def run(data: str, rho: float, noise: float, method: str, seed: int, quick: bool) -> list[dict]:
    """One fit: its row, and the prior-corrected row of the same model for the methods in CORRECTED."""
    options, tricks = METHODS[method]
    corrected = method in CORRECTED
    model, datamodule, epochs, _ = prepare(
        data, noise, seed, quick, model_options={"prior_correction": corrected}, imbalance_ratio=rho, **options
    )
    # the budget: ERM's epochs over the real long-tailed samples, whatever the sampler draws or SMOTE adds
    steps = epochs * -(-int(datamodule.train_class_counts.sum()) // datamodule.batch_size)
    test, seconds, trainer = fit_and_test(model, datamodule, max_steps=steps, max_epochs=-1, callbacks=tricks())
    keys = {"data": data, "rho": rho, "noise": noise, "seed": seed, "steps": steps, "fit_seconds": seconds}
    if not corrected:
        return [_row(test, method=method, **keys)]
    model.hparams.prior_correction = False  # the same weights, tested without the thresholding
    plain = trainer.test(model, datamodule, verbose=False)[0]
    return [_row(plain, method=method, **keys), _row(test, method=f"{method} + prior correction", **keys)]


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", choices=list(METHODS), help="run these (ERM always runs: the time ratio)")
    p.add_argument("--setups", nargs="+", choices=list(SETUPS), default=list(SETUPS), help="data / net set-ups")
    args = p.parse_args()
    methods = [m for m in METHODS if args.methods is None or m == "ERM" or m in args.methods]
    seeds = range(1 if args.quick else args.seeds)
    cells = [(10.0, 0.0)] if args.quick else CELLS  # quick: MNIST-1D has 500 signals, too few for rho 100
    run("digits / MLP", 10.0, 0.0, "ERM", 0, quick=True)  # untimed warm-up
    runs = [
        row
        for data in args.setups
        for rho, noise in cells
        for method in methods
        if (data, rho, method) not in SKIP
        for seed in seeds
        for row in run(data, rho, noise, method, seed, args.quick)
    ]
    print(machine_line())
    print(f"Seeds: {len(seeds)}{' (quick mode: not a measurement)' if args.quick else ''}\n")
    print("| data / net | rho | label noise | method | balanced acc (%) | few-shot acc (%) | acc (%) | ECE (%) "
          "| fit time vs ERM |\n|---|---|---|---|---|---|---|---|---|")  # fmt: skip
    for data in args.setups:
        for rho, noise in cells:
            cell = [r for r in runs if r["data"] == data and r["rho"] == rho and r["noise"] == noise]
            erm_seconds = sum(r["fit_seconds"] for r in cell if r["method"] == "ERM")
            for method in rows_of(data, rho):
                rows = [r for r in cell if r["method"] == method]
                if not rows:
                    continue  # not run (--methods)
                ratio = sum(r["fit_seconds"] for r in rows) / erm_seconds
                few = [r["few_acc"] for r in rows if not math.isnan(r["few_acc"])]
                print(
                    f"| {data} | {rho:g} | {noise:.0%} | {method} | {mean_std([r['balanced_acc'] for r in rows], 100)} "
                    f"| {mean_std(few, 100) if few else '-'} | {mean_std([r['acc'] for r in rows], 100)} "
                    f"| {mean_std([r['ece'] for r in rows], 100)} | {ratio:.2f}x |"
                )
    path = write_json(args.out, "long_tail" + ("_quick" if args.quick else ""), {"runs": runs})
    print(f"\nRaw numbers: {path}")


if __name__ == "__main__":
    main()
