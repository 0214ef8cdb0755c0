"""Self-supervised pre-training: Barlow Twins vs MixBT and MoCo-v2 vs MoCHi, linear-probe accuracy at equal steps.

    python benchmarks/self_supervised.py --seeds 3
    python benchmarks/self_supervised.py --quick

Each method pre-trains the same encoder without labels for the same epochs, batch and optimiser (Adam 1e-3, weight
decay 1e-6), with the same views (``default_augment``); the settings are the recipes' (``configs/ssl/*.yaml``:
Barlow Twins projector 64-64, lambda 0.0051, MixBT w 4; MoCo dim 128, K 1024, m 0.99, T 0.2; MoCHi N 64, s1 64,
s2 16 from step 0). A row for the untrained encoder (random initialisation, same seed) gives the floor that
pre-training must beat. The linear probe is then fitted offline on the frozen representations of the clean training
split (scikit-learn's logistic regression on standardised features) and scored on the test split. Two set-ups:
8x8 digits with an MLP (64 -> 64 -> 32) and MNIST-1D with CNN1D (a 32-d representation). Fit time is relative to
Barlow Twins on the same set-up and seed.
"""

from __future__ import annotations

import statistics
import time

import lightning.pytorch as pl
import torch
from common import machine_line, mean_std, parser, write_json
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from lit_tricks.data import DigitsDataModule, MNIST1DDataModule
from lit_tricks.modules.barlow_twins import BarlowTwins
from lit_tricks.modules.moco import MoCo
from lit_tricks.nets import CNN1D, MLP

FEATURES = 32
SETUPS = {  # data module, backbone (output: the representation), batch, epochs
    "digits / MLP": (DigitsDataModule, lambda: MLP(64, FEATURES, hidden=(64,)), 64, 30),
    "MNIST-1D / CNN1D": (MNIST1DDataModule, lambda: CNN1D(FEATURES), 100, 30),
}
METHODS = {
    "Barlow Twins": lambda net, seed: BarlowTwins(net, FEATURES, projector_dims=(64, 64), seed=seed),
    "MixBT": lambda net, seed: BarlowTwins(net, FEATURES, projector_dims=(64, 64), mixbt=4.0, seed=seed),
    "MoCo-v2": lambda net, seed: MoCo(net, FEATURES, queue_size=1024, momentum=0.99, seed=seed),
    "MoCHi": lambda net, seed: MoCo(
        net, FEATURES, queue_size=1024, momentum=0.99, mochi=64, mochi_s1=64, mochi_s2=16, seed=seed
    ),
}
UNTRAINED = "untrained encoder"


@torch.no_grad()
def linear_probe(model: pl.LightningModule, datamodule: pl.LightningDataModule) -> float:
    """Test accuracy of a logistic regression on the frozen representations of the clean training split."""
    model.eval()
    train, test = datamodule.train_set, datamodule.test_set
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    probe.fit(model(train.inputs).numpy(), train.targets.numpy())
    return float(probe.score(model(test.inputs).numpy(), test.targets.numpy()))


def run(setup: str, method: str, seed: int, quick: bool) -> dict:
    data_cls, backbone, batch_size, epochs = SETUPS[setup]
    pl.seed_everything(seed, verbose=False)
    datamodule = data_cls(batch_size=batch_size, val_fraction=0.0, seed=seed)
    if quick and isinstance(datamodule, MNIST1DDataModule):
        datamodule.num_samples = 500
    datamodule.setup()
    model = METHODS["Barlow Twins" if method == UNTRAINED else method](backbone(), seed)
    epochs = 0 if method == UNTRAINED else 1 if quick else epochs
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(model, datamodule)
    seconds = time.perf_counter() - start
    accuracy = linear_probe(model, datamodule)
    return {"setup": setup, "method": method, "seed": seed, "steps": trainer.global_step, "fit_seconds": seconds,
            "probe_accuracy": accuracy}  # fmt: skip


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--setups", nargs="+", choices=list(SETUPS), default=list(SETUPS), help="data / net set-ups")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS), help="the methods")
    args = p.parse_args()
    if "Barlow Twins" not in args.methods:
        p.error("--methods must include 'Barlow Twins', the baseline of the fit-time ratios.")
    torch.set_num_threads(1)
    seeds = range(1 if args.quick else args.seeds)
    methods = [UNTRAINED, *args.methods]
    runs = [run(setup, method, seed, args.quick) for setup in args.setups for seed in seeds for method in methods]
    print(machine_line())
    print(f"Seeds: {len(seeds)}{' (quick mode: not a measurement)' if args.quick else ''}\n")
    print("| data / net | method | steps | linear probe acc (%) | fit time vs Barlow Twins |")
    print("|---|---|---|---|---|")
    for setup in args.setups:
        baseline = {r["seed"]: r["fit_seconds"] for r in runs if (r["setup"], r["method"]) == (setup, "Barlow Twins")}
        for method in methods:
            rows = [r for r in runs if (r["setup"], r["method"]) == (setup, method)]
            ratio = statistics.fmean(r["fit_seconds"] / baseline[r["seed"]] for r in rows)
            accuracy = mean_std([r["probe_accuracy"] for r in rows], scale=100)
            time_cell = "-" if method == UNTRAINED else f"{ratio:.2f}x"
            print(f"| {setup} | {method} | {rows[0]['steps']} | {accuracy} | {time_cell} |")
    name = "self_supervised_quick" if args.quick else "self_supervised"
    print("\n" + str(write_json(args.out, name, {"runs": runs})))


if __name__ == "__main__":
    main()
