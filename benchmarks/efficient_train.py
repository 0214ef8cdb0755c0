"""Time to accuracy with the EfficientTrain curriculum vs the plain run: MNIST-1D / CNN1D and digits / CNN2D.

    python benchmarks/efficient_train.py --seeds 3
    python benchmarks/efficient_train.py --quick

MNIST-1D: 10,000 signals of length 40 (8,000 training, 2,000 test), CNN1D, Adam lr 1e-2, batch 128, 8 epochs.
Digits: scikit-learn's 8x8 digits upsampled (bilinear) to 16x16, since the authors' crops (160/224 of the side)
of an 8x8 image would be 6x6 (at 16x16: 11x11, then 14x14, then 16x16); CNN2D width 8, Adam lr 3e-3, batch 64,
15 epochs. Both with a cosine schedule over the run's optimizer steps.
Methods: the plain run; EfficientTrain's crops alone (no augmentation); the augmentation at EfficientTrain's
final magnitude (9) all along (the paper's baseline keeps RandAugment at its final strength); EfficientTrain
(crops and the growing augmentation). Every method runs the same steps;
the methods of one seed run back to back, so wall-time ratios compare runs under the same machine load. The
model is evaluated at full size on the test split (every ~1/4 epoch; the clock stops meanwhile); the target is
the plain run's final accuracy minus one point (per seed); "to target" is the first evaluation reaching it.
A second table times one training step (crop + forward + backward + Adam) at each of the schedule's sizes,
the sizes interleaved round-robin (median of 40 rounds after 5 warm-up rounds), which a loaded machine
distorts far less than whole runs.
"""

from __future__ import annotations

import statistics
import time

import lightning.pytorch as pl
import torch
from common import machine_line, mean_std, parser, write_json
from data_selection import AccuracyClock, time_to

from lit_tricks import Classifier
from lit_tricks.callbacks.efficient_train import EfficientTrain
from lit_tricks.data import DigitsDataModule, MNIST1DDataModule
from lit_tricks.functional.fourier_crop import fourier_crop
from lit_tricks.nets import CNN1D, CNN2D


class Digits16(DigitsDataModule):
    """The 8x8 digits as ``[1, 16, 16]`` images (bilinear upsampling)."""

    input_shape = (1, 16, 16)

    def __init__(self, **kwargs) -> None:
        super().__init__(as_image=True, **kwargs)

    def load_arrays(self):
        x, y, x_test, y_test = super().load_arrays()
        up = lambda images: torch.nn.functional.interpolate(images, size=16, mode="bilinear")  # noqa: E731
        return up(x), y, up(x_test), y_test


# name -> (data module factory(quick), network factory, Adam lr, batch, epochs, evaluations per epoch)
SETUPS = {
    "MNIST-1D / CNN1D": (
        lambda quick: MNIST1DDataModule(num_samples=500 if quick else 10_000, val_fraction=0.0),
        lambda: CNN1D(10),
        1e-2,
        128,
        8,
        4,
    ),
    "digits 16x16 / CNN2D": (lambda quick: Digits16(val_fraction=0.0), lambda: CNN2D(10, width=8), 3e-3, 64, 15, 4),
}
METHODS = {
    "plain": lambda: [],
    "EfficientTrain crops only": lambda: [EfficientTrain(max_shift=0.0, noise_std=0.0)],
    "augmentation m=9 all along": lambda: [EfficientTrain(schedule=[[0.0, 1.0, 9.0]])],
    "EfficientTrain": lambda: [EfficientTrain()],
}


class StepClock(AccuracyClock):
    """:class:`AccuracyClock` that also records the optimizer step of each evaluation."""

    def on_train_start(self, trainer, pl_module):
        self.steps: list[int] = []
        super().on_train_start(trainer, pl_module)

    def _evaluate(self, module):
        super()._evaluate(module)
        self.steps.append(module.global_step)


def run(setup: str, base: pl.LightningDataModule, method: str, seed: int, epochs: int) -> dict:
    make_data, make_net, lr, batch, _, evals_per_epoch = SETUPS[setup]
    pl.seed_everything(seed, verbose=False)
    datamodule = make_data(False)
    datamodule.batch_size, datamodule.seed = batch, seed
    datamodule.train_set, datamodule.test_set = base.train_set, base.test_set  # made once per set-up
    steps = epochs * -(-len(base.train_set) // batch)
    model = Classifier(
        make_net(),
        num_classes=10,
        optimizer=lambda params: torch.optim.Adam(params, lr=lr),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps),
        scheduler_interval="step",
    )
    every = max(1, len(base.train_set) // batch // evals_per_epoch)
    clock = StepClock(base.test_set.inputs, base.test_set.targets, every)
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[*METHODS[method](), clock],
    )  # fmt: skip
    trainer.fit(model, datamodule)
    return {"setup": setup, "method": method, "seed": seed, "steps": trainer.global_step, "curve": clock.curve,
            "eval_steps": clock.steps, "final_acc": clock.curve[-1][1],
            "train_seconds": clock.curve[-1][0]}  # fmt: skip


def step_costs(setup: str, base: pl.LightningDataModule, rounds: int) -> dict[float, float]:
    """Median milliseconds of one training step (crop included) at each size fraction of the default schedule."""
    _, make_net, lr, batch, *_ = SETUPS[setup]
    net = make_net()
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    x, y = base.train_set.inputs[:batch], base.train_set.targets[:batch]
    dims = 2 if x.ndim == 4 else 1
    fractions = sorted({size for _, size, _ in EfficientTrain().schedule})
    times: dict[float, list[float]] = {f: [] for f in fractions}
    for i in range(rounds + 5):
        for fraction in fractions:
            start = time.perf_counter()
            inputs = x if fraction == 1.0 else fourier_crop(x, EfficientTrain._sides(x, dims, fraction))
            loss = torch.nn.functional.cross_entropy(net(inputs), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if i >= 5:
                times[fraction].append(1000 * (time.perf_counter() - start))
    return {fraction: statistics.median(ms) for fraction, ms in times.items()}


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    seeds = range(1 if args.quick else args.seeds)
    runs, costs = [], {}
    for setup, (make_data, *_, epochs, _) in SETUPS.items():
        base = make_data(args.quick)
        base.setup()
        if args.quick:
            base.train_set = base.train_set.subset(torch.arange(256))
        epochs = 1 if args.quick else epochs
        run(setup, base, "plain", 0, 1)  # untimed warm-up
        runs += [run(setup, base, method, seed, epochs) for seed in seeds for method in METHODS]
        costs[setup] = step_costs(setup, base, 3 if args.quick else 40)
    for r in runs:
        plain = next(b for b in runs if (b["setup"], b["seed"], b["method"]) == (r["setup"], r["seed"], "plain"))
        r["target"] = plain["final_acc"] - 0.01
        r["time_to_target"] = time_to(r["curve"], r["target"])
        evals = zip(r["eval_steps"], r["curve"], strict=True)
        r["steps_to_target"] = next((step for step, (_, acc) in evals if acc >= r["target"]), None)
        plain_time = time_to(plain["curve"], r["target"])
        r["ratio"] = None if r["time_to_target"] is None else r["time_to_target"] / plain_time

    print(machine_line())
    print(f"Seeds: {len(seeds)}{' (quick mode: not a measurement)' if args.quick else ''}\n")
    print("| set-up | method | optimizer steps | final acc (%) | training time (s) | reached target "
          "| steps to target | time to target (s) | time to target vs plain |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for setup in SETUPS:
        for method in METHODS:
            rows = [r for r in runs if (r["setup"], r["method"]) == (setup, method)]
            reached = [r for r in rows if r["ratio"] is not None]
            steps = mean_std([r["steps_to_target"] for r in reached], digits=0) if reached else "-"
            seconds = mean_std([r["time_to_target"] for r in reached]) if reached else "-"
            ratio = mean_std([r["ratio"] for r in reached], digits=2) + "x" if reached else "-"
            print(
                f"| {setup} | {method} | {rows[0]['steps']} | {mean_std([r['final_acc'] for r in rows], 100)} "
                f"| {mean_std([r['train_seconds'] for r in rows])} | {len(reached)}/{len(rows)} | {steps} "
                f"| {seconds} | {ratio} |"
            )
    print("\n| set-up | side / full side | input | step (ms) | step vs full size |")
    print("|---|---|---|---|---|")
    for setup, by_fraction in costs.items():
        full = SETUPS[setup][0](True).input_shape
        for fraction, ms in by_fraction.items():
            sides = EfficientTrain._sides(torch.zeros(1, *full), 2 if len(full) == 3 else 1, fraction)
            print(
                f"| {setup} | {fraction:.3f} | {'x'.join(map(str, sides))} | {ms:.2f} | {ms / by_fraction[1.0]:.2f}x |"
            )
    payload = {"runs": runs, "step_ms": {setup: {str(f): ms for f, ms in c.items()} for setup, c in costs.items()}}
    path = write_json(args.out, "efficient_train" + ("_quick" if args.quick else ""), payload)
    print(f"\nRaw numbers: {path}")


if __name__ == "__main__":
    main()
