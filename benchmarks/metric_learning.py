"""Deep metric learning on unseen classes: plain pair losses vs Metrix (It Takes Two to Tango, ICLR 2022).

    python benchmarks/metric_learning.py --seeds 3
    python benchmarks/metric_learning.py --quick

Train on classes 0-4 and measure Recall@K on the unseen classes 5-9 (test split of UnseenClassesDataModule), as the
paper trains on the first half of CUB's / Cars' classes and retrieves on the other half. Two set-ups: 8x8 digits
with an MLP (64 -> 128 -> 64) and MNIST-1D with CNN1D (its last layer giving the 64-d embedding). Each loss
(contrastive, multi-similarity) is trained plain and with Metrix at the embeddings, the features (the backbone's
``forward_features``) and the inputs (``metrix_top_k=1``, as the authors' code), at the module's defaults (w 0.4,
Beta(2, 2)). Same epochs, batch, optimiser (Adam 1e-3) and seed for every row; wall time is relative to the plain
loss of the same set-up and seed.
"""

from __future__ import annotations

import statistics
import time

import lightning.pytorch as pl
import torch
from common import machine_line, mean_std, parser, write_json

from lit_tricks.data import DigitsDataModule, MNIST1DDataModule, UnseenClassesDataModule
from lit_tricks.modules.metric_learning import MetricLearner
from lit_tricks.nets import CNN1D, MLP

SETUPS = {
    "digits / MLP": (DigitsDataModule, lambda: MLP(64, 64, hidden=(128,)), 20),
    "MNIST-1D / CNN1D": (MNIST1DDataModule, lambda: CNN1D(64), 20),
}
METRIX = (None, "embedding", "feature", "input")
KS = (1, 2, 4, 8)


def run(setup: str, loss: str, metrix: str | None, seed: int, quick: bool) -> dict:
    source_cls, backbone, epochs = SETUPS[setup]
    pl.seed_everything(seed, verbose=False)
    source = source_cls()
    if quick and isinstance(source, MNIST1DDataModule):
        source.num_samples = 500
    datamodule = UnseenClassesDataModule(source, train_classes=5, batch_size=64, seed=seed)
    model = MetricLearner(
        backbone(), embedding_dim=64, loss=loss, metrix=metrix, metrix_top_k=1 if metrix == "input" else None,
        optimizer=lambda params: torch.optim.Adam(params, lr=1e-3), seed=seed, recall_ks=KS,
    )  # fmt: skip
    trainer = pl.Trainer(
        max_epochs=1 if quick else epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(model, datamodule)
    seconds = time.perf_counter() - start
    test = trainer.test(model, datamodule, verbose=False)[0]
    row = {"setup": setup, "loss": loss, "metrix": metrix, "seed": seed, "fit_seconds": seconds}
    row.update({f"recall@{k}": test[f"test/recall@{k}"] for k in KS})
    return row


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--setups", nargs="+", choices=list(SETUPS), default=list(SETUPS), help="data / net set-ups")
    losses = ("contrastive", "multi_similarity")
    p.add_argument("--losses", nargs="+", choices=losses, default=losses, help="the pair losses")
    args = p.parse_args()
    torch.set_num_threads(1)
    seeds = range(1 if args.quick else args.seeds)
    runs = [
        run(setup, loss, metrix, seed, args.quick)
        for setup in args.setups for seed in seeds for loss in args.losses for metrix in METRIX
    ]  # fmt: skip
    print(machine_line())
    print(f"Seeds: {len(seeds)}{' (quick mode: not a measurement)' if args.quick else ''}\n")
    print("| data / net | loss | Metrix | " + " | ".join(f"R@{k} (%)" for k in KS) + " | fit time vs plain |")
    print("|---|---|---|" + "---|" * len(KS) + "---|")
    for setup in args.setups:
        for loss in args.losses:
            cell = {m: [r for r in runs if (r["setup"], r["loss"], r["metrix"]) == (setup, loss, m)] for m in METRIX}
            plain = {r["seed"]: r["fit_seconds"] for r in cell[None]}
            for metrix, rows in cell.items():
                cells = " | ".join(mean_std([r[f"recall@{k}"] for r in rows], scale=100) for k in KS)
                ratio = statistics.fmean(r["fit_seconds"] / plain[r["seed"]] for r in rows)
                print(f"| {setup} | {loss} | {metrix or '-'} | {cells} | {ratio:.2f}x |")
    if not args.quick:
        print("\n" + str(write_json(args.out, "metric_learning", {"runs": runs})))


if __name__ == "__main__":
    main()
