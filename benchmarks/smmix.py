"""ViT on digits with and without SMMix, against plain Mixup and CutMix: test accuracy and fit time vs the ViT.

    python benchmarks/smmix.py --seeds 3
    python benchmarks/smmix.py --quick

The network is lit_tricks.nets.vit.ViT (8x8 digits, 2x2 patches, width 64, 4 blocks, 4 heads), AdamW (lr 1e-3,
weight decay 0.05) with a cosine schedule over 30 epochs, batches of 32, no validation split; the test split is the
data module's 20%. SMMix runs with the authors' defaults (ChenMnZ/SMMix main.py) and a ViT with a token head
(``token_head=True``), Mixup with the same alpha 0.8 and smoothing 0.1 as SMMix's Mixup half, CutMix with alpha 1.
"""

from __future__ import annotations

import statistics

import lightning.pytorch as pl
import torch
from common import fit_and_test, machine_line, mean_std, parser, write_json

from lit_tricks import Classifier, CutMix, Mixup
from lit_tricks.callbacks.smmix import SMMix
from lit_tricks.data import DigitsDataModule
from lit_tricks.nets.vit import ViT

EPOCHS = 30
ARMS = {
    "ViT": lambda seed: [],
    "Mixup (0.8, smoothing 0.1)": lambda seed: [Mixup(alpha=0.8, label_smoothing=0.1, seed=seed)],
    "CutMix (1.0)": lambda seed: [CutMix(alpha=1.0, seed=seed)],
    "SMMix": lambda seed: [SMMix(seed=seed)],
}


def run(arm: str, seed: int, quick: bool) -> dict:
    epochs = 1 if quick else EPOCHS
    pl.seed_everything(seed, verbose=False)
    vit = ViT(image_size=8, patch_size=2, dim=64, depth=4, heads=4, token_head=arm == "SMMix")
    model = Classifier(
        vit,
        num_classes=10,
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs),
    )
    data = DigitsDataModule(batch_size=32, val_fraction=0.0, as_image=True, seed=seed)
    metrics, seconds, _ = fit_and_test(
        model, data, max_epochs=epochs, callbacks=ARMS[arm](seed), limit_val_batches=0, num_sanity_val_steps=0
    )
    return {"arm": arm, "seed": seed, "test_acc": metrics["test/acc"], "fit_seconds": seconds}


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    torch.set_num_threads(1)
    seeds = range(1 if args.quick else args.seeds)
    runs = [run(arm, seed, args.quick) for seed in seeds for arm in ARMS]
    print(machine_line())
    print(f"Seeds: {len(seeds)}{' (quick mode: not a measurement)' if args.quick else ''}\n")
    print("| digits / ViT | test acc (%) | fit time vs ViT |")
    print("|---|---|---|")
    plain = {r["seed"]: r["fit_seconds"] for r in runs if r["arm"] == "ViT"}
    for arm in ARMS:
        rows = [r for r in runs if r["arm"] == arm]
        ratio = statistics.fmean(r["fit_seconds"] / plain[r["seed"]] for r in rows)
        print(f"| {arm} | {mean_std([r['test_acc'] for r in rows], scale=100)} | {ratio:.2f}x |")
    name = "smmix_quick" if args.quick else "smmix"
    print("\n" + str(write_json(args.out, name, {"epochs": 1 if args.quick else EPOCHS, "runs": runs})))


if __name__ == "__main__":
    main()
