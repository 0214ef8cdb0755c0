"""PGD adversarial training on long-tailed digits: clean and PGD accuracy, with and without class reweighting.

    python benchmarks/adversarial_training.py --seeds 1
    python benchmarks/adversarial_training.py --quick

digits / MLP with benchmarks/long_tail.py's network, Adam and epochs, the training split cut to an exponential long
tail (rho = 10) or left balanced; test split balanced. Methods: ERM; PGD adversarial training (L-inf eps 0.1 on
pixels in [0, 1], PGD-10 with step eps/4 and a random start); the same with class-balanced weights (beta 0.9999)
from the start ("RW") or deferred to the last 20% of the epochs ("DRW"). Metrics on the test split: accuracy on
clean inputs and under PGD-20 (same eps, step eps/4, random start, eval mode), over all classes, and over the five
head (0-4) and tail (5-9, the fewest training samples under the long tail) classes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from common import fit_and_test, machine_line, mean_std, parser, prepare, write_json

from lit_tricks.callbacks.adversarial_training import AdversarialTraining
from lit_tricks.functional.pgd import pgd_attack

EPS = 0.1
ATTACK = {"eps": EPS, "step_size": EPS / 4, "clamp_min": 0.0, "clamp_max": 1.0}


def _at(**options) -> Callable[[int], list]:
    return lambda epochs: [AdversarialTraining(steps=10, **ATTACK, **options)]


# method -> (epochs -> the tricks)
METHODS: dict[str, Callable[[int], list]] = {
    "ERM": lambda epochs: [],
    "PGD-AT": _at(),
    "PGD-AT + RW": _at(reweight_beta=0.9999),
    "PGD-AT + DRW": lambda epochs: _at(reweight_beta=0.9999, reweight_from_epoch=int(0.8 * epochs))(epochs),
}
RHOS = [10.0, None]  # None: the balanced split (ERM and PGD-AT only: its class weights would all be 1)


def methods(rho: float | None) -> list[str]:
    return list(METHODS) if rho else ["ERM", "PGD-AT"]


def robust_accuracy(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, seed: int) -> dict:
    """Clean and PGD-20 accuracy on all classes, and on the head (0-4) and tail (5-9) classes."""
    model.eval()
    x_adv = pgd_attack(model, inputs, targets, steps=20, generator=torch.Generator().manual_seed(seed), **ATTACK)
    with torch.no_grad():
        clean, adv = model(inputs).argmax(-1) == targets, model(x_adv).argmax(-1) == targets
    tail = targets >= 5
    accuracy = {"clean_acc": clean, "pgd_acc": adv, "clean_tail_acc": clean[tail], "pgd_head_acc": adv[~tail]}
    accuracy["pgd_tail_acc"] = adv[tail]
    return {key: right.float().mean().item() for key, right in accuracy.items()}


def run(rho: float | None, method: str, seed: int, quick: bool) -> dict:
    model, datamodule, epochs, steps = prepare("digits / MLP", 0.0, seed, quick, imbalance_ratio=rho)
    _, seconds, _ = fit_and_test(model, datamodule, max_epochs=epochs, callbacks=METHODS[method](epochs))
    scores = robust_accuracy(model, datamodule.test_set.inputs, datamodule.test_set.targets, seed)
    return {"rho": rho, "method": method, "seed": seed, "epochs": epochs, **scores, "fit_seconds": seconds}


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    seeds = range(1 if args.quick else args.seeds)
    runs = [run(rho, method, seed, args.quick) for rho in RHOS for method in methods(rho) for seed in seeds]
    print(machine_line())
    print(f"Seeds: {len(seeds)}{' (quick mode: not a measurement)' if args.quick else ''}; PGD eps {EPS}\n")
    print("| training split | method | clean acc (%) | PGD-20 acc (%) | clean tail acc (%) | PGD-20 head acc (%) "
          "| PGD-20 tail acc (%) | fit time vs ERM |\n|---|---|---|---|---|---|---|---|")  # fmt: skip
    for rho in RHOS:
        cell = [r for r in runs if r["rho"] == rho]
        erm_seconds = sum(r["fit_seconds"] for r in cell if r["method"] == "ERM")
        for method in methods(rho):
            rows = [r for r in cell if r["method"] == method]
            keys = ("clean_acc", "pgd_acc", "clean_tail_acc", "pgd_head_acc", "pgd_tail_acc")
            columns = [mean_std([r[key] for r in rows], 100) for key in keys]
            ratio = sum(r["fit_seconds"] for r in rows) / erm_seconds
            split = f"long tail rho={rho:g}" if rho else "balanced"
            print(f"| {split} | {method} | {' | '.join(columns)} | {ratio:.1f}x |")
    path = write_json(args.out, "adversarial_training" + ("_quick" if args.quick else ""), {"runs": runs})
    print(f"\nRaw numbers: {path}")


if __name__ == "__main__":
    main()
