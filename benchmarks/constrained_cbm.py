"""Constrained CBMs (Furby et al. 2024): where a joint CBM looks when two concepts co-occur in training, with
and without the decorrelating sampler, on two-shape scenes.

    python benchmarks/constrained_cbm.py --seeds 3
    python benchmarks/constrained_cbm.py --quick

Data: ShapeScenesDataModule, 1,600 16x16 training images with two shapes each (test: 400, no co-occurrence);
a lone circle or square gets its partner with probability ``cooccurrence`` in training. Model: joint CBM,
probability bottleneck, lambda = 1, encoder conv(3-16)-conv(16-32)-global max pool-linear(32-6), linear head,
Adam 1e-2, batch 64, 20 epochs, one torch thread. "constrained": the same data drawn by
ConceptDecorrelationSampler. Saliency of the circle logit on the test images that have a circle: vanilla
gradients and integrated gradients (baseline 0, 32 midpoint steps); "on circle": the share of the saliency on
the shapes' pixels that lies on the circle's (1 would be all on the circle; the square beside it and any
triangle take the rest); "in region": the share of the whole image's saliency on the circle; "pointing":
the most salient pixel lies on the circle. Concept accuracy of circle and square on the test split.
"""

from __future__ import annotations

import sys

import lightning.pytorch as pl
import torch
from common import machine_line, mean_std, parser, write_json
from torch import nn

from lit_tricks import ConceptBottleneckModel
from lit_tricks.data.constrained_cbm import ShapeScenesDataModule
from lit_tricks.functional.constrained_cbm import concept_saliency, pointing_game, saliency_in_region

CIRCLE, SQUARE = 1, 0


def encoder() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(32, 6),
    )  # fmt: skip


def run(cooccurrence: float, decorrelate: bool, seed: int, n: int, epochs: int) -> dict:
    pl.seed_everything(seed, verbose=False)
    data = ShapeScenesDataModule(num_samples=n, cooccurrence=cooccurrence, decorrelate=decorrelate, batch_size=64,
                                 val_fraction=0.0, seed=seed, generator_seed=42 + 10 * seed)  # fmt: skip
    model = ConceptBottleneckModel(encoder(), nn.Linear(6, 8), n_concepts=6)
    pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False).fit(model, data)  # fmt: skip
    x, c = data.test_set.inputs, data.test_set.extras["concepts"]
    model.eval()
    with torch.no_grad():
        acc = ((model.concept_logits(x)[0] > 0) == c.bool()).float().mean(dim=0)
    rows = c[:, CIRCLE].bool()
    masks = data.test_masks[rows]
    region, shapes = masks[:, CIRCLE], masks[:, :3].any(dim=1)
    out = {"circle acc": acc[CIRCLE].item(), "square acc": acc[SQUARE].item()}
    for method in ("gradient", "integrated_gradients"):
        s = concept_saliency(lambda z: model.concept_logits(z)[0], x[rows], CIRCLE, method)
        out[f"{method} on circle"] = saliency_in_region(s, region, within=shapes).nanmean().item()
        out[f"{method} in region"] = saliency_in_region(s, region).nanmean().item()
        out[f"{method} pointing"] = pointing_game(s, region).float().mean().item()
    return out


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    torch.set_num_threads(1)
    seeds = range(1 if args.quick else args.seeds)
    n, epochs = (300, 1) if args.quick else (1600, 20)
    levels = (0.95,) if args.quick else (0.8, 0.95)
    cells = [(0.0, False)] + [(level, dec) for level in levels for dec in (False, True)]
    results = {}
    for level, dec in cells:
        name = f"cooccurrence {level}, {'constrained' if dec else 'unconstrained'}"
        results[name] = [run(level, dec, seed, n, epochs) for seed in seeds]
        print(f"{name} done", file=sys.stderr)
    print(machine_line())
    print(f"Seeds: {len(seeds)}{' (quick mode: not a measurement)' if args.quick else ''}\n")
    keys = list(next(iter(results.values()))[0])
    print("Circle concept, test images with a circle (%, mean ± std over seeds):\n")
    print("| training data | " + " | ".join(k.replace("integrated_gradients", "IG") for k in keys) + " |")
    print("|---|" + "---|" * len(keys))
    for name, rows in results.items():
        print(f"| {name} | " + " | ".join(mean_std([r[k] for r in rows], 100) for k in keys) + " |")
    path = write_json(args.out, "constrained_cbm" + ("_quick" if args.quick else ""), {"results": results})
    print(f"\nRaw numbers: {path}")


if __name__ == "__main__":
    main()
