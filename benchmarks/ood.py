"""OOD detection with auxiliary outliers: no OE vs Outlier Exposure vs MixOE (mixup and cutmix), AUROC and FPR@95TPR.

    python benchmarks/ood.py --seeds 3
    python benchmarks/ood.py --quick

Digits 0-5 in distribution (OpenSetDigitsDataModule, 8x8 images, CNN2D width 16, Adam 1e-3, batches of 64,
30 epochs); near-OOD: the test images of digits 6-9; far-OOD: Gaussian and uniform noise. Training outliers: the
data module's outlier_set (the ID training images with their pixels shuffled), disjoint from both OOD test sets.
Score: the maximum softmax probability. OE: beta 0.5, twice the batch of outliers (the authors' code); MixOE: the
authors' car-script values, mixup alpha 1.0 and cutmix alpha 2.0, beta 5.0.
"""

from __future__ import annotations

import time

import lightning.pytorch as pl
import torch
from common import machine_line, mean_std, parser, write_json

from lit_tricks import Classifier
from lit_tricks.callbacks.mixoe import MixOE
from lit_tricks.callbacks.ood_evaluation import ood_scores_of
from lit_tricks.callbacks.outlier_exposure import OutlierExposure
from lit_tricks.data.open_set import NoiseDataset, OpenSetDigitsDataModule
from lit_tricks.metrics.ood import fpr_at_tpr, ood_auroc
from lit_tricks.nets import CNN2D

METHODS = {
    "no OE": lambda outliers: [],
    "OE": lambda outliers: [OutlierExposure(outliers, beta=0.5)],
    "MixOE (mixup)": lambda outliers: [MixOE(outliers, op="mixup", alpha=1.0, beta=5.0)],
    "MixOE (cutmix)": lambda outliers: [MixOE(outliers, op="cutmix", alpha=2.0, beta=5.0)],
}
EPOCHS = 30


def run(method: str, seed: int, quick: bool) -> dict:
    pl.seed_everything(seed, verbose=False)
    dm = OpenSetDigitsDataModule(known_classes=6, as_image=True, batch_size=64, val_fraction=0.0, seed=seed)
    dm.setup()
    model = Classifier(CNN2D(num_classes=6, width=16), num_classes=6, optimizer=lambda p: torch.optim.Adam(p, lr=1e-3))
    trainer = pl.Trainer(
        max_epochs=EPOCHS, max_steps=3 if quick else -1, accelerator="cpu", devices=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=METHODS[method](dm.outlier_set),
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(model, dm)
    seconds = time.perf_counter() - start
    acc = trainer.test(model, dm, verbose=False)[0]["test/acc"]
    ids = ood_scores_of(model, dm.test_set)
    ood_sets = {
        "near (digits 6-9)": dm.near_ood_set,
        "far (Gaussian noise)": dm.far_ood_set,
        "far (uniform noise)": NoiseDataset(len(dm.test_set), [1, 8, 8], "uniform", seed=seed + 3),
    }
    result = {"method": method, "seed": seed, "acc": acc, "fit_seconds": seconds}
    for name, dataset in ood_sets.items():
        oods = ood_scores_of(model, dataset)
        result[name] = {"auroc": ood_auroc(ids, oods).item(), "fpr95": fpr_at_tpr(ids, oods).item()}
    return result


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    seeds = range(1 if args.quick else args.seeds)
    run("no OE", 0, quick=True)  # untimed warm-up
    runs = [run(method, seed, args.quick) for method in METHODS for seed in seeds]
    sets = [key for key in runs[0] if key.startswith(("near", "far"))]
    print(machine_line())
    print(f"Seeds: {len(seeds)}{' (quick mode: not a measurement)' if args.quick else ''}\n")
    header = " | ".join(f"{name} AUROC / FPR95 (%)" for name in sets)
    print(f"| method | ID test acc (%) | {header} | fit time vs no OE |")
    print("|---|---|" + "---|" * len(sets) + "---|")
    base = sum(r["fit_seconds"] for r in runs if r["method"] == "no OE")
    for method in METHODS:
        rows = [r for r in runs if r["method"] == method]
        cells = " | ".join(
            f"{mean_std([r[s]['auroc'] for r in rows], 100)} / {mean_std([r[s]['fpr95'] for r in rows], 100)}"
            for s in sets
        )
        ratio = sum(r["fit_seconds"] for r in rows) / base
        print(f"| {method} | {mean_std([r['acc'] for r in rows], 100)} | {cells} | {ratio:.2f}x |")
    path = write_json(args.out, "ood" + ("_quick" if args.quick else ""), {"runs": runs})
    print(f"\nRaw numbers: {path}")


if __name__ == "__main__":
    main()
