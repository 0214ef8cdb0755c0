"""Concept global importance, existence and location (Aysel et al. 2025) of CBM, CEM, ECBM and PCBM on rendered shapes.

    python benchmarks/concept_metrics.py --seeds 3
    python benchmarks/concept_metrics.py --quick

Shapes: 2,000 16x16 images (1,800 train after the split, 500 test), 12 concepts in 4 groups, 9 classes. CBM: joint,
probability bottleneck, linear head; CEM: m = 16, RandInt 0.25, linear head; both on a small CNN encoder, Adam 1e-2,
batch 128, 30 epochs, lambda = 1. PCBM: a frozen, randomly initialised CNN (two 3x3 convolutions, 32 channels, 8x8
maps) whose global-average-pooled features are the embeddings; a CAV bank (linear-kernel SVC, C = 0.1) from the
training concepts; sparse head lam = 2e-4, l1_ratio 0.99, SGD 0.1, 40 epochs. Metrics on the test split
(ConceptMetrics): CGIM1/2/3 (mean over concepts of the cosine with the class-concept matrix), existence and
location of the top-1 and top-3 concepts, location region alpha = 1 (1/12 of the image; a random map scores about
0.08 on top-1). Maps: input-gradient saliency of the concept logits (CBM, CEM), CoAM on the 8x8 maps (PCBM).
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
import torch
from common import machine_line, mean_std, parser, write_json
from torch import nn

from lit_tricks import ConceptBottleneckModel, ConceptEmbeddingModel, PostHocCBM
from lit_tricks.callbacks.concept_metrics import ConceptMetrics
from lit_tricks.data import ArrayDataModule, ShapesDataModule
from lit_tricks.modules.concept_bottleneck.ecbm import ECBM

HIDDEN = 64
METRICS = ["cgim_weights", "cgim_mean_prediction", "cgim_weighted", "existence", "location"]


def encoder(d_out: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(128, HIDDEN), nn.LeakyReLU(), nn.Linear(HIDDEN, d_out),
    )  # fmt: skip


def trainer(epochs: int = 1, callbacks: list | None = None) -> pl.Trainer:
    return pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                      callbacks=callbacks or [])  # fmt: skip


def measure(model: pl.LightningModule, data: pl.LightningDataModule, gradients: bool = True) -> dict:
    """Test accuracy and the concept metrics for the top-1 and top-3 concepts (without ``gradients``, as for ECBM
    whose concepts come from an energy minimisation: no head derivative and no saliency maps, so only
    ``cgim_mean_prediction`` and existence; the other cells are NaN)."""
    out = {}
    for top_l in (1, 3):
        run = trainer(callbacks=[ConceptMetrics(top_l=top_l, use_head=gradients, location=gradients)])
        run.test(model, data, verbose=False)
        values = {k.rsplit("/", 1)[-1]: float(v) for k, v in run.callback_metrics.items()}
        out["acc"] = values["acc"]
        out.update({f"{name}@{top_l}": values.get(name, math.nan) for name in ("existence", "location")})
        out.update({name: values.get(name, math.nan) for name in METRICS[:3]})
    return out


def concept_model(kind: str, seed: int, n: int, epochs: int) -> dict:
    pl.seed_everything(seed, verbose=False)
    data = ShapesDataModule(num_samples=n, batch_size=128, with_masks=True, val_fraction=0.1, seed=seed)
    groups = ShapesDataModule.concept_groups
    if kind == "CBM":
        model = ConceptBottleneckModel(encoder(12), nn.Linear(12, 9), 12, concept_groups=groups)
    elif kind == "CEM":
        model = ConceptEmbeddingModel(encoder(HIDDEN), 12, 9, latent_dim=HIDDEN, emb_size=16, concept_groups=groups)
    else:  # ECBM, as in benchmarks/concept_bottleneck.py
        features = nn.Sequential(encoder(HIDDEN), nn.LeakyReLU())
        model = ECBM(features, 12, 9, feature_dim=HIDDEN, hidden_dim=HIDDEN, concept_groups=groups)
    trainer(epochs).fit(model, data)
    return measure(model, data, gradients=kind != "ECBM")


class _Embeddings(ArrayDataModule):
    """Frozen-backbone embeddings with the shapes' concepts, masks and pre-pooling feature maps as batch keys."""

    num_classes = 9

    def __init__(self, arrays: dict[str, tuple[torch.Tensor, torch.Tensor]], **kwargs) -> None:
        super().__init__(**kwargs)
        self.arrays = arrays

    def load_arrays(self):
        (e, e_test), (y, y_test) = self.arrays["inputs"], self.arrays["targets"]
        return e, y, e_test, y_test

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        super().setup(stage)
        order = torch.randperm(len(self.arrays["inputs"][0]), generator=torch.Generator().manual_seed(self.seed))
        for name in ("concepts", "masks", "feature_maps"):  # the training split is shuffled (no validation split)
            train, test = self.arrays[name]
            self.train_set.extras[name], self.test_set.extras[name] = train[order], test


def post_hoc(seed: int, n: int, epochs: int) -> dict:
    pl.seed_everything(seed, verbose=False)
    shapes = ShapesDataModule(num_samples=n, with_masks=True, val_fraction=0.0, seed=seed)
    shapes.setup()
    conv = (nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU())
    backbone = nn.Sequential(*conv).eval()  # random and frozen
    with torch.no_grad():
        maps = {split: backbone(getattr(shapes, f"{split}_set").inputs) for split in ("train", "test")}
    arrays = {"inputs": (maps["train"].mean(dim=(2, 3)), maps["test"].mean(dim=(2, 3))),
              "feature_maps": (maps["train"], maps["test"])}  # fmt: skip
    for name, key in (("targets", None), ("concepts", "concepts"), ("masks", "masks")):
        train, test = shapes.train_set, shapes.test_set
        arrays[name] = (train.targets, test.targets) if key is None else (train.extras[key], test.extras[key])
    c_train, e_train = arrays["concepts"][0], arrays["inputs"][0]
    positives = [e_train[c_train[:, j] == 1] for j in range(12)]
    negatives = [e_train[c_train[:, j] == 0] for j in range(12)]
    bank, intercepts = PostHocCBM.concept_bank_from_examples(positives, negatives)
    data = _Embeddings(arrays, batch_size=128, val_fraction=0.0, seed=seed)
    model = PostHocCBM(bank, 9, intercepts=intercepts, lam=2e-4, lr=0.1)
    trainer(epochs).fit(model, data)
    return measure(model, data)


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    seeds = range(1 if args.quick else args.seeds)
    n, epochs, pcbm_epochs = (300, 1, 2) if args.quick else (2000, 30, 40)
    runs: dict[str, list[dict]] = {"CBM": [], "CEM": [], "ECBM": [], "PCBM": []}
    for seed in seeds:
        for kind in ("CBM", "CEM", "ECBM"):
            runs[kind].append({"seed": seed, **concept_model(kind, seed, n, epochs)})
        runs["PCBM"].append({"seed": seed, **post_hoc(seed, n, pcbm_epochs)})
    columns = ["acc", *METRICS[:3], "existence@1", "existence@3", "location@1", "location@3"]
    print(machine_line())
    print(f"Seeds: {len(seeds)}{' (quick mode: not a measurement)' if args.quick else ''}\n")
    print("| model | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for kind, results in runs.items():
        cells = ["-" if math.isnan(results[0][c]) else
                 mean_std([r[c] for r in results], 100 if c in ("acc",) or "@" in c else 1, 1 if c == "acc" or "@" in c
                          else 3) for c in columns]  # fmt: skip
        print(f"| {kind} | " + " | ".join(cells) + " |")
    print("\nacc, existence, location in %; CGIM: cosine in [-1, 1]. Chance location@1 with alpha = 1: ~8%.")
    path = write_json(args.out, "concept_metrics" + ("_quick" if args.quick else ""), {"runs": runs})
    print(f"\nraw numbers: {path}")


if __name__ == "__main__":
    main()
