"""Label-noise robustness and calibration: ERM vs Mixup vs ELR vs loss-based reweighting vs AdaWAC.

    python benchmarks/label_noise.py --seeds 3
    python benchmarks/label_noise.py --quick

Same networks, data and budgets as benchmarks/baseline.py (digits / MLP 65 epochs, MNIST-1D / CNN1D 150
epochs). 40% symmetric noise on the training labels (test labels clean) for every method; ERM and Mixup
also on clean labels, for calibration. Mixup alpha 1.0; ELR beta 0.7, lambda 3 (the paper's CIFAR-10
values); EnsLoss Box-Cox lambda 0 (the authors' value); LDR-KL / ALDR-KL lambda 1, margin 0.1 (ALDR-KL alpha 2);
Bias loss alpha 0.3, beta 0.3 (the paper's); SampleReweighting r 1.0, delta 1, uniform for the first
10% of steps; AdaWAC eta 1, lambda_AC 1 (the authors' code defaults), two default_augment views.
"""

from __future__ import annotations

from common import SETUPS, fit_and_test, machine_line, mean_std, parser, prepare, write_json

from lit_tricks import ELR, AdaWAC, BiasLoss, EnsLoss, LDRLoss, Mixup, SampleReweighting

METHODS = {
    "ERM": lambda steps: [],
    "Mixup": lambda steps: [Mixup(alpha=1.0)],
    "ELR": lambda steps: [ELR(beta=0.7, lam=3.0)],
    "EnsLoss": lambda steps: [EnsLoss()],
    "LDR-KL": lambda steps: [LDRLoss(lam=1.0)],
    "ALDR-KL": lambda steps: [LDRLoss(lam=1.0, adaptive=True)],
    "Bias loss": lambda steps: [BiasLoss()],
    "AdaWAC": lambda steps: [AdaWAC(step_size=1.0, consistency_weight=1.0)],
    "reweight linupper": lambda steps: [SampleReweighting("linupper", warmup_steps=steps // 10)],
    "reweight quadratic": lambda steps: [SampleReweighting("quadratic", warmup_steps=steps // 10)],
    "reweight extremes": lambda steps: [SampleReweighting("extremes", warmup_steps=steps // 10)],
}
CELLS = [(0.4, method) for method in METHODS] + [(0.0, "ERM"), (0.0, "Mixup")]


def run(data: str, noise: float, method: str, seed: int, quick: bool) -> dict:
    model, datamodule, epochs, steps = prepare(data, noise, seed, quick)
    test, seconds, _ = fit_and_test(model, datamodule, max_epochs=epochs, callbacks=METHODS[method](steps))
    return {"data": data, "noise": noise, "method": method, "seed": seed, "acc": test["test/acc"],
            "ece": test["test/ece"], "nll": test["test/nll"], "fit_seconds": seconds}  # fmt: skip


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    seeds = range(1 if args.quick else args.seeds)
    run("digits / MLP", 0.0, "ERM", 0, quick=True)  # untimed warm-up
    runs = [run(data, noise, method, seed, args.quick) for data in SETUPS for noise, method in CELLS for seed in seeds]
    print(machine_line())
    print(f"Seeds: {len(seeds)}{' (quick mode: not a measurement)' if args.quick else ''}\n")
    print("| data / net | label noise | method | clean test acc (%) | ECE (%) | NLL | fit time vs ERM |")
    print("|---|---|---|---|---|---|---|")
    for data in SETUPS:
        for noise, method in CELLS:
            rows = [r for r in runs if r["data"] == data and r["noise"] == noise and r["method"] == method]
            erm = [r for r in runs if r["data"] == data and r["noise"] == noise and r["method"] == "ERM"]
            ratio = sum(r["fit_seconds"] for r in rows) / sum(r["fit_seconds"] for r in erm)
            print(
                f"| {data} | {noise:.0%} | {method} | {mean_std([r['acc'] for r in rows], 100)} "
                f"| {mean_std([r['ece'] for r in rows], 100)} | {mean_std([r['nll'] for r in rows], digits=3)} "
                f"| {ratio:.2f}x |"
            )
    path = write_json(args.out, "label_noise" + ("_quick" if args.quick else ""), {"runs": runs})
    print(f"\nRaw numbers: {path}")


if __name__ == "__main__":
    main()
