"""Neural collapse and temperature scaling, ERM vs Mixup on MNIST-1D (Pushing Boundaries; Limitations of TS).

    python benchmarks/neural_collapse.py --seeds 3
    python benchmarks/neural_collapse.py --seeds 3 --noise 0.4
    python benchmarks/neural_collapse.py --quick

The MNIST-1D / CNN1D set-up of benchmarks/common.py (5,000 signals, Adam lr 1e-2, batch 100, 150 epochs), with 10%
of the training split held out for validation. ERM and Mixup (alpha 1, one lambda per batch) are trained alike;
NeuralCollapse measures NC1-NC4 on the validation set after the last epoch, and TemperatureScaling fits T on the
same validation set: the test NLL and ECE are reported with and without T from the same fit. ``--noise`` flips that
fraction of the training labels (symmetric): the class overlap where Chidambaram & Ge show TS fails.
"""

from __future__ import annotations

import statistics
import time

import lightning.pytorch as pl
import torch
from common import machine_line, mean_std, parser, write_json

from lit_tricks import Classifier, Mixup
from lit_tricks.callbacks.neural_collapse import NeuralCollapse
from lit_tricks.callbacks.temperature_scaling import TemperatureScaling
from lit_tricks.data import MNIST1DDataModule
from lit_tricks.nets import CNN1D

NC = (
    ("nc1", "NC1"), ("nc2_equinorm_means", "NC2 equinorm"), ("nc2_equiangular_means", "NC2 equiangular"),
    ("nc3_self_duality", "NC3"), ("nc4_ncc_agreement", "NC4 agreement"),
)  # fmt: skip


def run(method: str, seed: int, noise: float, quick: bool) -> dict:
    pl.seed_everything(seed, verbose=False)
    datamodule = MNIST1DDataModule(batch_size=100, val_fraction=0.1, label_noise=noise, seed=seed)
    if quick:
        datamodule.num_samples = 500
    epochs = 2 if quick else 150
    model = Classifier(CNN1D(10), num_classes=10, optimizer=lambda params: torch.optim.Adam(params, lr=1e-2))
    collapse, scaling = NeuralCollapse(every_n_epochs=epochs, figure=False), TemperatureScaling()
    callbacks = [collapse, scaling] + ([Mixup(alpha=1.0, seed=seed)] if method == "Mixup" else [])
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, callbacks=callbacks,
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(model, datamodule)
    seconds = time.perf_counter() - start
    row = {"method": method, "seed": seed, "noise": noise, "fit_seconds": seconds, "temperature": scaling.temperature}
    row.update({key: trainer.callback_metrics[f"tricks/NeuralCollapse/{key}"].item() for key, _ in NC})
    scaled = trainer.test(model, datamodule, verbose=False)[0]
    temperature, scaling.temperature = scaling.temperature, None  # the same weights, uncalibrated
    raw = trainer.test(model, datamodule, verbose=False)[0]
    scaling.temperature = temperature
    row.update(acc=raw["test/acc"], nll=raw["test/nll"], ece=raw["test/ece"])
    row.update(nll_ts=scaled["test/nll"], ece_ts=scaled["test/ece"])
    return row


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--noise", type=float, default=0.0, help="symmetric label noise on the training labels")
    args = p.parse_args()
    seeds = range(1 if args.quick else args.seeds)
    runs = [run(method, seed, args.noise, args.quick) for seed in seeds for method in ("ERM", "Mixup")]
    print(machine_line())
    print(f"Seeds: {len(seeds)}{' (quick mode: not a measurement)' if args.quick else ''}\n")
    print("| data / net | label noise | method | " + " | ".join(name for _, name in NC) + " |")
    print("|---|---|---|" + "---|" * len(NC))
    for method in ("ERM", "Mixup"):
        rows = [r for r in runs if r["method"] == method]
        cells = " | ".join(mean_std([r[key] for r in rows], digits=3) for key, _ in NC)
        print(f"| MNIST-1D / CNN1D | {args.noise:.0%} | {method} | {cells} |")
    header = "| data / net | label noise | method | test acc (%) | NLL | NLL + TS | ECE (%) | ECE + TS (%) | T |"
    print(f"\n{header} fit time vs ERM |\n|---|---|---|---|---|---|---|---|---|---|")
    erm_seconds = statistics.fmean(r["fit_seconds"] for r in runs if r["method"] == "ERM")
    for method in ("ERM", "Mixup"):
        rows = [r for r in runs if r["method"] == method]

        def cell(key: str, scale: float = 1.0, digits: int = 1, rows: list = rows) -> str:
            return mean_std([r[key] for r in rows], scale, digits)

        ratio = statistics.fmean(r["fit_seconds"] for r in rows) / erm_seconds
        print(
            f"| MNIST-1D / CNN1D | {args.noise:.0%} | {method} | {cell('acc', 100)} | {cell('nll', digits=3)} "
            f"| {cell('nll_ts', digits=3)} | {cell('ece', 100)} | {cell('ece_ts', 100)} "
            f"| {cell('temperature', digits=2)} | {ratio:.2f}x |"
        )
    suffix = ("_quick" if args.quick else "") + (f"_noise{round(100 * args.noise)}" if args.noise else "")
    write_json(args.out, "neural_collapse" + suffix, {"runs": runs})


if __name__ == "__main__":
    main()
