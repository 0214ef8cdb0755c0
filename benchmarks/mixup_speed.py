"""Per-batch cost of Mixup / CutMix against a bare in-place mix of the same tensors.

    python benchmarks/mixup_speed.py --seeds 3
    python benchmarks/mixup_speed.py --quick

The bare baseline mixes the inputs in place with a permutation and weights drawn beforehand (Mixup:
``x.lerp_(x[perm], 1 - lam)``, the fused form lit_tricks uses too; CutMix: one ``torch.where`` paste with a
precomputed box), i.e. the least any implementation must do. lit_tricks' cost is the whole per-batch work of the trick:
drawing the permutation, lambda (and box), mixing the inputs, building and mixing the probability targets.
Median over repeats. timm's Mixup is not measured: timm needs torchvision, which does not import here.
"""

from __future__ import annotations

import statistics
import time
from types import SimpleNamespace

import torch
from common import machine_line, mean_std, parser, write_json

from lit_tricks import CutMix, Mixup
from lit_tricks.functional import cutmix_, mixup_

# name -> (batch shape, number of classes): ImageNet-like and CIFAR-100-like batches
BATCHES = {"64x3x224x224, 1000 classes": ((64, 3, 224, 224), 1000), "256x3x32x32, 100 classes": ((256, 3, 32, 32), 100)}
# a stand-in trainer on a step Lightning does not write logs (see lit_tricks.core.trick.logging_due)
NO_LOGGING = SimpleNamespace(  # a trainer outside the training stage, whose loggers write nothing
    fast_dev_run=False, _logger_connector=SimpleNamespace(should_update_logs=False), state=SimpleNamespace(stage=None)
)


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e3


def measure(shape: tuple[int, ...], classes: int, kind: str, repeats: int) -> tuple[float, float]:
    x, y = torch.randn(shape), torch.randint(0, classes, (shape[0],))
    perm, lam = torch.randperm(shape[0]), torch.tensor([0.7])
    if kind == "Mixup":
        trick = Mixup(alpha=0.2, num_classes=classes)

        def bare():
            mixup_(x, perm, lam)
    else:
        trick = CutMix(alpha=1.0, num_classes=classes)
        h, w = shape[2:]
        mask = torch.zeros(1, h, w, dtype=torch.bool)
        mask[:, h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = True  # a box of a quarter of the area

        def bare():
            cutmix_(x, perm, mask)

    ours = median_ms(lambda: trick._apply(NO_LOGGING, None, x, y), repeats)
    return ours, median_ms(bare, repeats)


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    seeds, repeats = (1, 3) if args.quick else (args.seeds, 30)
    rows = []
    for seed in range(seeds):
        torch.manual_seed(seed)
        for name, (shape, classes) in BATCHES.items():
            for kind in ("Mixup", "CutMix"):
                ours, bare = measure(shape if not args.quick else (8, *shape[1:]), classes, kind, repeats)
                rows.append({"batch": name, "trick": kind, "seed": seed, "ours_ms": ours, "bare_ms": bare})
    print(machine_line())
    print(f"Seeds: {seeds}, median of {repeats} calls{' (quick mode: not a measurement)' if args.quick else ''}\n")
    print("| batch | trick | bare in-place mix (ms) | lit_tricks per batch (ms) | lit_tricks / bare |")
    print("|---|---|---|---|---|")
    for name in BATCHES:
        for kind in ("Mixup", "CutMix"):
            r = [row for row in rows if row["batch"] == name and row["trick"] == kind]
            ratio = [row["ours_ms"] / row["bare_ms"] for row in r]
            print(
                f"| {name} | {kind} | {mean_std([row['bare_ms'] for row in r], digits=2)} "
                f"| {mean_std([row['ours_ms'] for row in r], digits=2)} | {mean_std(ratio, digits=2)}x |"
            )
    path = write_json(args.out, "mixup_speed" + ("_quick" if args.quick else ""), {"runs": rows})
    print(f"\nRaw numbers: {path}")


if __name__ == "__main__":
    main()
