"""EMA update and evaluation-swap cost: lit_tricks' EMATeacher vs Lightning's EMAWeightAveraging vs the bare
fused lerp, inside real fits, on an 8M-parameter MLP and a ResNet-50-layout CNN (hundreds of tensors, BN).

    python benchmarks/ema_speed.py --seeds 3
    python benchmarks/ema_speed.py --quick

EMATeacher runs twice: by default (an update with a NaN/inf weight is skipped, which costs a norm over the weights)
and with ``skip_nonfinite=False`` (the bare fused update).
The per-step cost of each callback is the time spent in its ``on_train_batch_end`` hook during a real
``Trainer.fit`` (median over steps, after a warm-up). The floor is one ``torch._foreach_lerp_`` over the
same tensors (parameters and float buffers, as both EMAs average by default) from a minimal callback in
the same kind of fit (and, for reference, timed alone in a hot loop, where the tensors stay in cache).
Swap cost is one swap-in plus swap-out of the evaluation weights, halved.
timm's ModelEmaV3 is not measured here: timm needs torchvision, which does not import beside this torch.
"""

from __future__ import annotations

import statistics
import time

import lightning.pytorch as pl
import torch
from common import machine_line, mean_std, parser, write_json
from lightning.pytorch.callbacks import EMAWeightAveraging
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lit_tricks import Classifier, EMATeacher
from lit_tricks.nets import MLP


class Bottleneck(nn.Module):
    def __init__(self, c_in: int, width: int, stride: int) -> None:
        super().__init__()
        c_out = 4 * width
        self.body = nn.Sequential(
            nn.Conv2d(c_in, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, c_out, 1, bias=False), nn.BatchNorm2d(c_out),
        )  # fmt: skip
        self.skip = (
            nn.Identity()
            if stride == 1 and c_in == c_out
            else nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
        )

    def forward(self, x):
        return torch.relu(self.body(x) + self.skip(x))


def resnet50_layout(width: int = 8, num_classes: int = 10) -> nn.Module:
    """ResNet-50's block layout (3, 4, 6, 3 bottlenecks): 161 parameter tensors and 159 buffers."""
    layers: list[nn.Module] = [nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
    c_in = width
    for stage, blocks in enumerate((3, 4, 6, 3)):
        w = width * 2**stage
        for b in range(blocks):
            layers.append(Bottleneck(c_in, w, 2 if b == 0 and stage > 0 else 1))
            c_in = 4 * w
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes)]
    return nn.Sequential(*layers)


MODELS = {
    "MLP 8.4M params": (lambda: MLP(1024, 10, hidden=(2048, 2048, 1024)), (1024,)),
    "ResNet-50 layout": (resnet50_layout, (3, 32, 32)),
}


def timed_hook(callback, name: str, times: list[float]) -> None:
    original = getattr(callback, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        original(*args, **kwargs)
        times.append(time.perf_counter() - start)

    setattr(callback, name, wrapper)


def fit_and_time(make_net, shape, callback, steps: int) -> list[float]:
    times: list[float] = []
    timed_hook(callback, "on_train_batch_end", times)
    data = TensorDataset(torch.randn(16 * steps, *shape), torch.randint(0, 10, (16 * steps,)))
    trainer = pl.Trainer(
        max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[callback], limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(Classifier(make_net(), 10), DataLoader(data, batch_size=16))
    return times[3:]  # drop warm-up steps


def tracked(module: nn.Module) -> list[torch.Tensor]:
    """What EMATeacher's default averages: the parameters and the floating-point buffers."""
    return [*module.parameters(), *(b for b in module.buffers() if b.is_floating_point())]


class BareLerp(pl.Callback):
    """The floor inside a fit: one fused lerp over lists cached at the start, nothing else."""

    def on_fit_start(self, trainer, pl_module):
        self.live = tracked(pl_module)
        self.ema = [p.detach().clone() for p in self.live]

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, *args):
        torch._foreach_lerp_(self.ema, self.live, 0.001)


def bare_lerp(make_net, repeats: int) -> list[float]:
    live = [t.detach() for t in tracked(make_net())]
    ema = [p.clone() for p in live]
    times = []
    for _ in range(repeats + 3):
        start = time.perf_counter()
        torch._foreach_lerp_(ema, live, 0.001)
        times.append(time.perf_counter() - start)
    return times[3:]


def swap_time(make_net, repeats: int) -> tuple[float, float]:
    model = Classifier(make_net(), 10)
    ours = EMATeacher()
    ours._module = model
    ours._ensure_allocated()
    theirs = EMAWeightAveraging()
    theirs._average_model = torch.optim.swa_utils.AveragedModel(model)
    results = []
    for swap_in, swap_out in [
        (ours._swap_in, ours._swap_out),
        (lambda: theirs._swap_models(model), lambda: theirs._swap_models(model)),
    ]:
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            swap_in()
            swap_out()
            samples.append((time.perf_counter() - start) / 2)
        results.append(statistics.median(samples))
    return results[0], results[1]


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    seeds, steps = (1, 6) if args.quick else (args.seeds, 40)
    rows = []
    for name, (make_net, shape) in MODELS.items():
        for seed in range(seeds):
            pl.seed_everything(seed, verbose=False)
            bare = statistics.median(bare_lerp(make_net, steps))
            bare_fit = statistics.median(fit_and_time(make_net, shape, BareLerp(), steps))
            ours = statistics.median(fit_and_time(make_net, shape, EMATeacher(decay=0.999), steps))
            unguarded = EMATeacher(decay=0.999, skip_nonfinite=False)
            ours_unguarded = statistics.median(fit_and_time(make_net, shape, unguarded, steps))
            lightning = statistics.median(fit_and_time(make_net, shape, EMAWeightAveraging(decay=0.999), steps))
            swap_ours, swap_lightning = swap_time(make_net, 5 if args.quick else 20)
            rows.append(
                {
                    "model": name,
                    "seed": seed,
                    "bare_lerp_ms": bare * 1e3,
                    "bare_lerp_in_fit_ms": bare_fit * 1e3,
                    "ema_teacher_ms": ours * 1e3,
                    "ema_teacher_unguarded_ms": ours_unguarded * 1e3,
                    "lightning_ema_ms": lightning * 1e3,
                    "swap_ours_ms": swap_ours * 1e3,
                    "swap_lightning_ms": swap_lightning * 1e3,
                }
            )
    print(machine_line())
    print(
        f"Seeds: {seeds}, {steps} steps per fit, batch 16{' (quick mode: not a measurement)' if args.quick else ''}\n"
    )
    print(
        "| model | bare lerp alone (ms) | bare lerp in fit (ms) | EMATeacher (ms) | EMATeacher / bare in fit "
        "| EMATeacher skip_nonfinite=False / bare in fit "
        "| Lightning EMAWeightAveraging (ms) | Lightning / EMATeacher | swap ours (ms) | swap Lightning (ms) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in MODELS:
        r = [row for row in rows if row["model"] == name]
        col = {key: [row[key] for row in r] for key in r[0] if key.endswith("_ms")}.__getitem__

        ratio_bare = [row["ema_teacher_ms"] / row["bare_lerp_in_fit_ms"] for row in r]
        ratio_unguarded = [row["ema_teacher_unguarded_ms"] / row["bare_lerp_in_fit_ms"] for row in r]
        ratio_lightning = [row["lightning_ema_ms"] / row["ema_teacher_ms"] for row in r]
        print(
            f"| {name} | {mean_std(col('bare_lerp_ms'), digits=2)} | {mean_std(col('bare_lerp_in_fit_ms'), digits=2)} "
            f"| {mean_std(col('ema_teacher_ms'), digits=2)} "
            f"| {mean_std(ratio_bare, digits=2)}x | {mean_std(ratio_unguarded, digits=2)}x "
            f"| {mean_std(col('lightning_ema_ms'), digits=2)} "
            f"| {mean_std(ratio_lightning, digits=1)}x | {mean_std(col('swap_ours_ms'), digits=3)} "
            f"| {mean_std(col('swap_lightning_ms'), digits=2)} |"
        )
    path = write_json(args.out, "ema_speed" + ("_quick" if args.quick else ""), {"runs": rows})
    print(f"\nRaw numbers: {path}")


if __name__ == "__main__":
    main()
