"""Consistency model (iCT) vs an EDM diffusion baseline: sample quality and sampling cost; iCT vs latent-CT options.

    python benchmarks/consistency.py --seeds 3
    python benchmarks/consistency.py --quick

Same network and step budget for both models on each set: 2-D moons and 8 Gaussians (TimeMLP 256 x 3,
3,000 steps, batch 256) and 8x8 digits in [-1, 1] (TimeCNN width 64, 2,000 steps, batch 128); Adam 1e-3
(digits 5e-4); evaluation EMA 0.999. Consistency model: iCT with s1 = 160 (the reference notes: better than
1280 for short runs), sampled with 1 and 2 steps (sigma_mid 0.821). EDM: Heun sampler with 1, 2, 10, 50 steps
(1, 3, 19, 99 network evaluations). Quality on 2,000 generated vs 2,000 held-out real samples (digits: 359
test images): energy distance, MMD (RBF mixture) and, on digits, the Frechet distance on a small digits
classifier's features; the floor is real vs real (2-D: a second fresh set; digits: 359 training images).
Sampling time per 10,000 samples (digits: measured on 1,000). The ablation trains the latent-CT options
on moons, one at a time and all.
"""

from __future__ import annotations

import sys
import time

import lightning.pytorch as pl
import torch
from common import machine_line, mean_std, parser, write_json

from lit_tricks import ConsistencyModel
from lit_tricks.data import DigitsDataModule, Toy2DDataModule
from lit_tricks.metrics import EnergyDistance, FrechetDistance, MaximumMeanDiscrepancy, digits_features
from lit_tricks.modules import EDMDiffusion
from lit_tricks.nets import TimeCNN, TimeMLP

SETS = {
    "moons": dict(
        data=lambda: Toy2DDataModule("moons", num_samples=20_000, batch_size=256),
        shape=[2], lr=1e-3, steps=3000, timed=10_000,
    ),
    "8 Gaussians": dict(
        data=lambda: Toy2DDataModule("8gaussians", num_samples=20_000, batch_size=256),
        shape=[2], lr=1e-3, steps=3000, timed=10_000,
    ),
    "digits": dict(
        data=lambda: DigitsDataModule(as_image=True, symmetric=True, batch_size=128, val_fraction=0.0),
        shape=[1, 8, 8], lr=5e-4, steps=2000, timed=1000,
    ),
}  # fmt: skip
CM_STEPS, EDM_STEPS = (1, 2), (1, 2, 10, 50)
QUICK_STEPS, QUICK_SAMPLES = 10, 100  # --quick: training steps; evaluated and timed samples
ABLATION = {
    "iCT (s1=160)": {},
    "+ Cauchy loss, adaptive c": dict(loss="cauchy", adaptive_c=True),
    "+ diffusion loss (w=5)": dict(diffusion_loss_weight=5.0),
    "+ minibatch OT": dict(ot_coupling=True),
    "all latent-CT options": dict(loss="cauchy", adaptive_c=True, diffusion_loss_weight=5.0, ot_coupling=True),
}


def net_for(shape):
    return TimeMLP(dim=2, hidden=256, depth=3) if shape == [2] else TimeCNN(channels=1, width=64)


def train(model, data, steps: int) -> float:
    trainer = pl.Trainer(
        max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(model, data)
    return time.perf_counter() - start


def quality(real: torch.Tensor, fake: torch.Tensor, digits: bool) -> dict[str, float]:
    metrics = {"energy": EnergyDistance(), "mmd": MaximumMeanDiscrepancy()}
    if digits:
        metrics["fd"] = FrechetDistance(digits_features)
    result = {}
    for name, metric in metrics.items():
        metric.update(real, fake)
        result[name] = metric.compute().item()
    return result


def timed_samples(model, n: int, steps: int, seed: int) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    samples = model.sample(n, steps=steps, generator=torch.Generator().manual_seed(seed))
    return samples, time.perf_counter() - start


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    seeds = range(1 if args.quick else args.seeds)
    n_eval = QUICK_SAMPLES if args.quick else 2000
    runs, floors = [], {}
    for name, spec in SETS.items():
        data = spec["data"]()
        data.setup()
        real = data.test_set.inputs[:n_eval]
        digits = spec["shape"] != [2]
        steps, n_timed = (QUICK_STEPS, QUICK_SAMPLES) if args.quick else (spec["steps"], spec["timed"])
        other = data.train_set.inputs[: len(real)] if digits else data.val_set.inputs[:n_eval]
        floors[name] = quality(real, other, digits)
        for seed in seeds:
            for kind in ("consistency", "EDM"):
                pl.seed_everything(seed, verbose=False)
                optimizer = lambda params, lr=spec["lr"]: torch.optim.Adam(params, lr=lr)  # noqa: E731
                common = dict(data_shape=spec["shape"], optimizer=optimizer, clamp=[-1, 1] if digits else None)
                if kind == "consistency":
                    model = ConsistencyModel(net_for(spec["shape"]), s1=160, **common)
                else:
                    model = EDMDiffusion(net_for(spec["shape"]), **common)
                seconds = train(model, data, steps)
                for k in CM_STEPS if kind == "consistency" else EDM_STEPS:
                    fake, _ = timed_samples(model, len(real), k, seed)
                    _, sample_seconds = timed_samples(model, n_timed, k, seed)
                    per_10k = sample_seconds * 10_000 / n_timed
                    runs.append({"set": name, "model": kind, "steps": k, "seed": seed, "train_seconds": seconds,
                                 "sample_seconds": per_10k, **quality(real, fake, digits)})  # fmt: skip
                print(f"{name} {kind} seed {seed}: trained in {seconds:.0f} s", file=sys.stderr)
    ablation = []
    data = SETS["moons"]["data"]()
    data.setup()
    real = data.test_set.inputs[:n_eval]
    steps = QUICK_STEPS if args.quick else SETS["moons"]["steps"]
    for variant, options in ABLATION.items():
        for seed in seeds:
            pl.seed_everything(seed, verbose=False)
            model = ConsistencyModel(net_for([2]), data_shape=[2], s1=160, **options)
            seconds = train(model, data, steps)
            for k in CM_STEPS:
                fake, _ = timed_samples(model, len(real), k, seed)
                ablation.append({"variant": variant, "steps": k, "seed": seed, "train_seconds": seconds,
                                 **quality(real, fake, False)})  # fmt: skip
            print(f"ablation {variant} seed {seed}", file=sys.stderr)

    print(machine_line())
    print(f"Seeds: {len(seeds)}{' (quick mode: not a measurement)' if args.quick else ''}\n")
    print("| set | model | sampling steps (network evaluations) | energy distance | MMD | Frechet distance "
          "| sampling time per 10k (s) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for name in SETS:
        floor = floors[name]
        fd_floor = f"{floor['fd']:.2f}" if "fd" in floor else "-"
        print(f"| {name} | real vs real (floor) | - | {floor['energy']:.4f} | {floor['mmd']:.4f} | {fd_floor} | - |")
        for kind, all_steps in (("consistency", CM_STEPS), ("EDM", EDM_STEPS)):
            for k in all_steps:
                rows = [r for r in runs if r["set"] == name and r["model"] == kind and r["steps"] == k]
                evaluations = k if kind == "consistency" else 2 * k - 1
                fd = mean_std([r["fd"] for r in rows], digits=2) if "fd" in rows[0] else "-"
                print(f"| {name} | {kind} | {k} ({evaluations}) | {mean_std([r['energy'] for r in rows], digits=4)} "
                      f"| {mean_std([r['mmd'] for r in rows], digits=4)} | {fd} "
                      f"| {mean_std([r['sample_seconds'] for r in rows], digits=3)} |")  # fmt: skip
    print("\n| moons, consistency model | energy, 1 step | energy, 2 steps | MMD, 1 step | MMD, 2 steps |")
    print("|---|---|---|---|---|")
    for variant in ABLATION:
        cells = []
        for metric in ("energy", "mmd"):
            for k in CM_STEPS:
                values = [r[metric] for r in ablation if r["variant"] == variant and r["steps"] == k]
                cells.append(mean_std(values, digits=4))
        print(f"| {variant} | {' | '.join(cells)} |")
    path = write_json(args.out, "consistency" + ("_quick" if args.quick else ""),
                      {"runs": runs, "floors": floors, "ablation": ablation})  # fmt: skip
    print(f"\nRaw numbers: {path}")


if __name__ == "__main__":
    main()
