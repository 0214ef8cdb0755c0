"""Per-step overhead of the training loop: a raw PyTorch loop, a plain LightningModule, ``Classifier`` and
``Classifier`` with a stack of tricks, side by side in one run, on a small and a large MLP; beside them the same
four tricks written by hand into a plain LightningModule (their bare work: no checks, no per-trick logs).

    python benchmarks/overhead.py --repeats 5
    python benchmarks/overhead.py --quick

Every loop trains the same network (``MLP(64, 10, hidden)``) with Adam on the same random data (4,096 samples,
64 features, 10 classes, batch 64) from the same ``DataLoader`` of dict batches, on one torch thread. The time
of a step is the time between the starts of two consecutive batches (data loading, forward, loss, backward,
optimizer step, every hook and log); a fit's time is the median over its steps, the table gives the median
over ``--repeats`` fits run interleaved (loop A, B, C, ..., B, C, ..., A, ...: each loop leads in turn) and each
ratio is the median over the repeats of the ratio within a repeat, so a slow moment of the machine touches
every loop alike. Each trick's own cost is the time spent in its per-step hooks (``before_forward``,
``after_loss``, ``on_train_batch_start``/``end``, ...) inside the stacked fit (median over the fits).

The script runs itself with glibc's ``malloc`` told to keep freed memory (``MALLOC_MMAP_THRESHOLD_``,
``MALLOC_TRIM_THRESHOLD_``): by default each fit of the large model lands in one of two states, ~72 or ~92 ms
per step for every loop alike, by whether the allocator hands the gradients' memory back to the system.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from itertools import pairwise

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from common import machine_line, parser, write_json
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader

from lit_tricks import ELR, Classifier, EMATeacher, Mixup, SelfDistill, Trick
from lit_tricks.data import ArrayDataset
from lit_tricks.nets import MLP

# name -> (hidden widths, epochs of 4,096 samples)
MODELS = {"MLP 64-256-256-10": ((256, 256), 3), "MLP 64-2048-2048-2048-10 (8.5M params)": ((2048, 2048, 2048), 1)}
TRICKS: dict[str, Callable[[], pl.Callback]] = {
    "EMATeacher": lambda: EMATeacher(decay=0.999),  # first: one loop swaps it for one without its NaN guard
    "Mixup": lambda: Mixup(alpha=0.2, num_classes=10),
    "SelfDistill (PS-KD)": lambda: SelfDistill("past_predictions", total_epochs=3),
    "ELR": lambda: ELR(),
}
STACK = "Classifier + EMATeacher + Mixup + PS-KD + ELR"
PER_STEP_HOOKS = (
    "before_forward",
    "after_loss",
    "on_train_batch_start",
    "on_train_batch_end",
    "on_before_backward",
    "on_after_backward",
    "on_before_optimizer_step",
    "on_before_zero_grad",
)


def loader(num_samples: int) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    data = ArrayDataset(torch.randn(num_samples, 64, generator=generator), torch.randint(0, 10, (num_samples,)))
    return DataLoader(data, batch_size=64, shuffle=True, generator=generator)


class PlainModule(pl.LightningModule):
    """What a user writes without lit_tricks: forward, cross-entropy, one ``self.log``."""

    def __init__(self, hidden: tuple[int, ...]) -> None:
        super().__init__()
        self.net = MLP(64, 10, hidden)

    def training_step(self, batch, batch_idx):
        loss = F.cross_entropy(self.net(batch["inputs"]), batch["targets"])
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class HandWrittenTricks(PlainModule):
    """The four tricks of the stack, with their settings, written straight into ``training_step``: PS-KD targets
    from a table of last softmaxes, Mixup (one lambda per batch), ELR's running targets and penalty, an EMA of the
    weights after each optimizer step. No checks (ranges, NaN guards), no per-trick logs, no DDP gathering: the
    tricks' bare work, for comparison with the stack's cost."""

    def __init__(self, hidden: tuple[int, ...], num_samples: int, epochs: int) -> None:
        super().__init__(hidden)
        self.epochs, self.rng = epochs, np.random.default_rng(0)
        self.register_buffer("past", torch.zeros(num_samples, 10))  # PS-KD
        self.register_buffer("elr", torch.zeros(num_samples, 10))  # ELR
        self.ema = [p.detach().clone() for p in self.net.parameters()]

    def training_step(self, batch, batch_idx):
        x, y, index = batch["inputs"], batch["targets"], batch["index"]
        targets = F.one_hot(y, 10).float()
        if self.current_epoch > 0:
            alpha = 0.8 * (self.current_epoch + 1) / self.epochs
            targets = torch.lerp(targets, self.past.index_select(0, index), alpha)
        perm, lam = torch.as_tensor(self.rng.permutation(len(x))), float(self.rng.beta(0.2, 0.2))
        x = torch.lerp(x.index_select(0, perm), x, lam)
        targets = torch.lerp(targets.index_select(0, perm), targets, lam)
        logits = self.net(x)
        loss = -(targets * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean()
        probs = logits.softmax(dim=-1)
        self.past.index_copy_(0, index, probs.detach())
        p = probs.clamp(1e-4, 1 - 1e-4)
        running = torch.lerp(p.detach() / p.detach().sum(dim=-1, keepdim=True), self.elr.index_select(0, index), 0.7)
        self.elr.index_copy_(0, index, running)
        loss = loss + 3.0 * torch.log(1 - (running * p).sum(dim=-1)).mean()
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        torch._foreach_lerp_(self.ema, [p.detach() for p in self.net.parameters()], 1 - 0.999)


class StepClock(pl.Callback):
    """Records the start time of every training batch."""

    def __init__(self) -> None:
        self.starts: list[list[float]] = []

    def on_train_epoch_start(self, trainer, pl_module):
        self.starts.append([])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.starts[-1].append(time.perf_counter())

    def step_times(self) -> list[float]:
        return [b - a for epoch in self.starts for a, b in pairwise(epoch)]


def paired_ratio(times: list[float], baseline: list[float]) -> float:
    """The median over the repeats of the ratio of two loops' times within a repeat."""
    return statistics.median(a / b for a, b in zip(times, baseline, strict=True))


def time_hooks(trick: pl.Callback, total: list[float]) -> None:
    """Wrap the trick's per-step hooks so that their time adds up in ``total[0]``."""
    for name in PER_STEP_HOOKS:
        own = getattr(type(trick), name, None)
        if own is None or own is getattr(pl.Callback, name, None) or own is getattr(Trick, name):
            continue  # absent, or the base class's no-op
        original = getattr(trick, name)

        def timed(*args, _original=original, **kwargs):
            start = time.perf_counter()
            result = _original(*args, **kwargs)
            total[0] += time.perf_counter() - start
            return result

        setattr(trick, name, timed)


def raw_loop(hidden: tuple[int, ...], epochs: int, num_samples: int) -> list[float]:
    net = MLP(64, 10, hidden)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    times = []
    for _ in range(epochs):
        last = None
        for batch in loader(num_samples):
            now = time.perf_counter()
            if last is not None:
                times.append(now - last)
            last = now
            loss = F.cross_entropy(net(batch["inputs"]), batch["targets"])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return times


def lightning_fit(
    module: pl.LightningModule, tricks: list[pl.Callback], epochs: int, num_samples: int
) -> tuple[list[float], dict[str, float]]:
    clock = StepClock()
    hook_totals = {type(trick).__name__: [0.0] for trick in tricks}
    for trick in tricks:
        time_hooks(trick, hook_totals[type(trick).__name__])
    with tempfile.TemporaryDirectory() as logdir:
        trainer = pl.Trainer(
            max_epochs=epochs,
            accelerator="cpu",
            devices=1,
            logger=TensorBoardLogger(logdir, name="overhead"),
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            callbacks=[*tricks, clock],
        )
        trainer.fit(module, loader(num_samples))
    steps = trainer.global_step
    return clock.step_times(), {name: total[0] / steps for name, total in hook_totals.items()}


# glibc reads these at start-up only: keep freed memory instead of returning it to the system each step
ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": "2147483647", "MALLOC_TRIM_THRESHOLD_": "2147483647"}


def main() -> None:
    if any(os.environ.get(name) != value for name, value in ALLOCATOR.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **ALLOCATOR})
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5, help="interleaved repeats of every loop")
    args = p.parse_args()
    torch.set_num_threads(1)
    repeats, num_samples = (1, 512) if args.quick else (args.repeats, 4096)
    loops = {
        "raw PyTorch loop": lambda h, e: (raw_loop(h, e, num_samples), {}),
        "plain LightningModule (CE, one self.log)": lambda h, e: lightning_fit(PlainModule(h), [], e, num_samples),
        "Classifier, no tricks": lambda h, e: lightning_fit(Classifier(MLP(64, 10, h), 10), [], e, num_samples),
        STACK: lambda h, e: lightning_fit(
            Classifier(MLP(64, 10, h), 10), [make() for make in TRICKS.values()], e, num_samples
        ),
        "the same, EMATeacher(skip_nonfinite=False)": lambda h, e: lightning_fit(
            Classifier(MLP(64, 10, h), 10),
            [EMATeacher(decay=0.999, skip_nonfinite=False), *(make() for make in list(TRICKS.values())[1:])],
            e,
            num_samples,
        ),
        "plain LightningModule + the four tricks by hand": lambda h, e: lightning_fit(
            HandWrittenTricks(h, num_samples, e), [], e, num_samples
        ),
    }
    rows = []
    print(machine_line())
    print(
        f"{repeats} interleaved repeats, {num_samples} samples per epoch, batch 64, median ms per step"
        f"{' (quick mode: not a measurement)' if args.quick else ''}"
    )
    for model, (hidden, epochs) in MODELS.items():
        epochs = 1 if args.quick else epochs
        step_ms: dict[str, list[float]] = {name: [] for name in loops}
        hook_ms: dict[str, list[float]] = {}
        names = list(loops)
        for repeat in range(repeats):
            for name in names[repeat % len(names) :] + names[: repeat % len(names)]:  # each loop leads in turn
                pl.seed_everything(repeat, verbose=False)
                times, hooks = loops[name](hidden, epochs)
                step_ms[name].append(statistics.median(times) * 1e3)
                for trick, seconds in hooks.items() if name == STACK else ():
                    hook_ms.setdefault(trick, []).append(seconds * 1e3)
        baselines = list(loops)[:3]  # raw loop, plain module, Classifier
        classifier = statistics.median(step_ms[baselines[2]])
        print(f"\n**{model}**, {epochs} epoch(s)\n")
        print("| loop | ms per step | vs raw loop | vs plain LightningModule | vs Classifier |")
        print("|---|---|---|---|---|")
        for name, values in step_ms.items():
            ratios = " | ".join(f"{paired_ratio(values, step_ms[baseline]):.2f}x" for baseline in baselines)
            print(f"| {name} | {statistics.median(values):.2f} | {ratios} |")
        print("\n| trick (in the stacked fit) | its per-step hooks, ms per step | share of Classifier's step |")
        print("|---|---|---|")
        for trick, values in hook_ms.items():
            ms = statistics.median(values)
            print(f"| {trick} | {ms:.3f} | {ms / classifier:.1%} |")
        rows.append({"model": model, "step_ms": step_ms, "hook_ms": hook_ms})
    path = write_json(args.out, "overhead" + ("_quick" if args.quick else ""), {"runs": rows})
    print(f"\nRaw numbers: {path}")


if __name__ == "__main__":
    main()
