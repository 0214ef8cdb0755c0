"""Nested dropout vs Dropout vs ERM at 40% label noise (Compressing Features for Learning with Noisy Labels).

    python benchmarks/nested_dropout.py --seeds 3
    python benchmarks/nested_dropout.py --quick

The digits / MLP (256, 256) set-up of benchmarks/common.py (Adam lr 1e-3, batch 64, 65 epochs), except that 10% of
the training split is held out as clean validation data: the authors' recipe chooses there the number of units k
kept at test time. 40% symmetric noise on the training labels; validation and test labels clean. Dropout (p 0.3,
the authors' CIFAR-10 and Clothing1M rate) and nested dropout (std 10, the authors' value for 10 classes, one k
per batch) both act on the penultimate features, before the head. Nested dropout is tested twice from one fit:
with every unit, and truncated to the k best on the validation set.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from common import SETUPS, fit_and_test, machine_line, mean_std, parser, write_json
from torch import nn

from lit_tricks import Classifier
from lit_tricks.data import DigitsDataModule
from lit_tricks.layers.nested_dropout import nested_dropout, truncation_accuracy

NOISE, SETUP = 0.4, "digits / MLP"
METHODS = ("ERM", "Dropout 0.3", "Nested std 10, all units", "Nested std 10, k from clean val")


def best_units(model: Classifier, datamodule: DigitsDataModule) -> int:
    """The authors' choice of k: the prefix of the features with the best clean-validation accuracy."""
    model.eval()
    with torch.no_grad():
        batches = list(datamodule.val_dataloader())
        features = torch.cat([model.backbone.forward_features(b["inputs"]) for b in batches])
        targets = torch.cat([b["targets"] for b in batches])
        return int(truncation_accuracy(features, model.backbone.head[1], targets).argmax()) + 1


def run(fit: str, seed: int, quick: bool) -> list[dict]:
    _, make_net, lr, epochs = SETUPS[SETUP]
    pl.seed_everything(seed, verbose=False)
    datamodule = DigitsDataModule(batch_size=64, val_fraction=0.1, label_noise=NOISE, seed=seed)
    net = make_net()
    if fit == "Dropout 0.3":
        net.head = nn.Sequential(nn.Dropout(0.3), net.head)
    elif fit == "Nested":
        nested_dropout(net, std=10.0)
    model = Classifier(net, num_classes=10, optimizer=lambda params: torch.optim.Adam(params, lr=lr))
    test, seconds, trainer = fit_and_test(model, datamodule, max_epochs=1 if quick else epochs, num_sanity_val_steps=0)
    row = {"seed": seed, "fit_seconds": seconds}
    if fit != "Nested":
        return [{**row, "method": fit, "acc": test["test/acc"], "ece": test["test/ece"], "units": 256}]
    k = best_units(model, datamodule)
    model.backbone.head[0].eval_units = k
    truncated = trainer.test(model, datamodule, verbose=False)[0]
    return [
        {**row, "method": METHODS[2], "acc": test["test/acc"], "ece": test["test/ece"], "units": 256},
        {**row, "method": METHODS[3], "acc": truncated["test/acc"], "ece": truncated["test/ece"], "units": k},
    ]


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    seeds = range(1 if args.quick else args.seeds)
    runs = [r for seed in seeds for fit in ("ERM", "Dropout 0.3", "Nested") for r in run(fit, seed, args.quick)]
    print(machine_line())
    print(f"Seeds: {len(seeds)}{' (quick mode: not a measurement)' if args.quick else ''}\n")
    print("| data / net | label noise | method | units at test | clean test acc (%) | ECE (%) |")
    print("|---|---|---|---|---|---|")
    for method in METHODS:
        rows = [r for r in runs if r["method"] == method]
        units = mean_std([r["units"] for r in rows], digits=0) if method == METHODS[3] else "256"
        print(
            f"| {SETUP} | {NOISE:.0%} | {method} | {units} | {mean_std([r['acc'] for r in rows], 100)} "
            f"| {mean_std([r['ece'] for r in rows], 100)} |"
        )
    write_json(args.out, "nested_dropout" + ("_quick" if args.quick else ""), {"runs": runs})


if __name__ == "__main__":
    main()
