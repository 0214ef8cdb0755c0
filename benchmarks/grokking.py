"""Grokking on modular addition: steps until held-out accuracy first reaches 95%, per method.

    python benchmarks/grokking.py --seeds 3
    python benchmarks/grokking.py --quick

Set-up of Prieto et al. (2025, LucasPrietoAl/grokking-at-the-edge-of-numerical-stability @ 0cc9e8d): (a + b) mod
p, one-hot pairs, a seeded 40% of all pairs for training and the rest held out, an MLP 2p-200-200-p, full-batch
AdamW, lr 0.01, Adam epsilon 1e-25 without weight decay. Differences: p = 97 (theirs 113; 40% faster here), our
MLP has biases (theirs none), a budget of --max-steps steps (theirs up to 80,000). Plain torch loops over our parts
(ModularArithmeticDataModule, stablemax_cross_entropy, perpendicular_grad_, OutputScale), no Trainer: a step is
~20 ms and Lightning's per-step overhead would dominate. The held-out accuracy is measured every --eval-every steps.

The lazy/rich rows (Kumar et al., ICLR 2024) wrap the MLP in OutputScale(alpha, center=True) and train the
baseline (AdamW, weight decay 1.0) at lr = lazy_rich_lr(0.01, alpha) = 0.01 / alpha^2, the rule Prieto et al.'s
code also applies to AdamW (Kumar et al. use gradient descent and MSE; full-batch GD on this cross-entropy MLP
barely fitted the training pairs in 600 steps at lr 20). AdamW's decoupled decay lr * wd scales with 1/alpha^2 too.
"""

from __future__ import annotations

import multiprocessing
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from common import machine_line, parser, write_json
from torch.nn import functional as F

from lit_tricks.callbacks.perp_grad import perpendicular_grad_
from lit_tricks.data.modular import ModularArithmeticDataModule
from lit_tricks.functional.stablemax import stablemax_cross_entropy
from lit_tricks.nets import MLP
from lit_tricks.nets.output_scale import OutputScale, lazy_rich_lr

FIGURES = Path(__file__).parent.parent / "docs" / "figures"
TARGET = 0.95


@dataclass(frozen=True)
class Method:
    loss: str = "cross_entropy"
    perp: bool = False
    lr: float = 0.01
    weight_decay: float = 0.0
    beta2: float = 0.99
    alpha: float | None = None  # OutputScale's alpha (centred), with lr / alpha^2


METHODS = {
    "softmax CE + AdamW wd 1.0 (baseline)": Method(weight_decay=1.0),
    "softmax CE, no wd": Method(),
    "StableMax, no wd": Method(loss="stablemax", beta2=0.999),
    "softmax CE + ⊥Grad, no wd": Method(perp=True),
    "StableMax + ⊥Grad, no wd": Method(loss="stablemax", perp=True),
    **{
        f"baseline, OutputScale alpha={a:g}, lr 0.01/alpha^2": Method(
            lr=lazy_rich_lr(0.01, a), weight_decay=1.0, alpha=a
        )
        for a in (0.5, 1, 2, 8)
    },
}


def run(name: str, seed: int, p: int, max_steps: int, eval_every: int) -> dict:
    method = METHODS[name]
    data = ModularArithmeticDataModule(p=p, train_fraction=0.4, batch_size=None, seed=seed)
    data.setup()
    x, y = data.train_set.inputs, data.train_set.targets
    x_val, y_val = data.val_set.inputs, data.val_set.targets
    torch.manual_seed(seed)
    net = MLP(2 * p, p, hidden=(200, 200))
    if method.alpha is not None:
        net = OutputScale(net, method.alpha, center=True)
    eps = 1e-25 if method.weight_decay == 0 else 1e-8  # the authors' epsilon without decay; the usual one with it
    optimizer = torch.optim.AdamW(
        net.parameters(), lr=method.lr, betas=(0.9, method.beta2), eps=eps, weight_decay=method.weight_decay
    )
    curve: list[tuple[int, float, float]] = []  # (step, train acc, held-out acc)
    grokked_at = None
    start = time.perf_counter()
    for step in range(max_steps + 1):
        logits = net(x)
        if step % eval_every == 0:
            with torch.no_grad():
                val_acc = (net(x_val).argmax(-1) == y_val).float().mean().item()
            curve.append((step, (logits.argmax(-1) == y).float().mean().item(), val_acc))
            if val_acc >= TARGET:
                grokked_at = step
                break
        if step == max_steps:
            break
        loss = stablemax_cross_entropy(logits, y).mean() if method.loss == "stablemax" else F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if method.perp:
            perpendicular_grad_(net.parameters())
        optimizer.step()
    return {
        "method": name, "seed": seed, "p": p, "max_steps": max_steps, "grokked_at": grokked_at,
        "seconds": time.perf_counter() - start, "curve": curve, "config": asdict(method),
    }  # fmt: skip


def summary(rows: list[dict], max_steps: int) -> str:
    steps = sorted(r["grokked_at"] for r in rows if r["grokked_at"] is not None)
    missed = len(rows) - len(steps)
    if not steps:
        return f"not within {max_steps} steps ({missed}/{len(rows)} seeds)"
    text = ", ".join(str(s) for s in steps)
    return text + (f"; {missed}/{len(rows)} not within {max_steps}" if missed else "")


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["method"] for r in runs))
    cols = 3
    fig, axes = plt.subplots(-(-len(names) // cols), cols, figsize=(4 * cols, 2.6 * -(-len(names) // cols)))
    for ax, name in zip(axes.flat, names, strict=False):
        for r in (r for r in runs if r["method"] == name):
            steps, train, val = zip(*r["curve"], strict=True)
            ax.plot(steps, train, color="tab:blue", alpha=0.6, lw=1, label="train" if r["seed"] == 0 else None)
            ax.plot(steps, val, color="tab:orange", alpha=0.8, lw=1, label="held-out" if r["seed"] == 0 else None)
        ax.axhline(TARGET, color="grey", lw=0.5, ls="--")
        ax.set_title(name, fontsize=8)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("step", fontsize=8)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--max-steps", type=int, default=1000, help="step budget of every run")
    p.add_argument("--eval-every", type=int, default=20, help="steps between held-out evaluations")
    p.add_argument("--p", type=int, default=97, help="the modulus")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel, one torch thread each")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS), help="a subset of rows")
    p.add_argument("--tag", default="", help="suffix of the JSON and PNG names, for a run of a subset")
    p.add_argument("--figure", type=Path, default=FIGURES / "grokking_curves.png", help="PNG of the curves")
    args = p.parse_args()
    torch.set_num_threads(1)
    seeds = range(1 if args.quick else args.seeds)
    modulus, max_steps = (13, 40) if args.quick else (args.p, args.max_steps)
    eval_every = 5 if args.quick else args.eval_every
    jobs = [(name, seed, modulus, max_steps, eval_every) for seed in seeds for name in args.methods]
    with multiprocessing.get_context("spawn").Pool(args.jobs, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        runs = pool.starmap(run, jobs, chunksize=1)
    print(machine_line())
    print(
        f"Seeds: {len(seeds)}, p = {modulus}, budget {max_steps} full-batch steps, held-out accuracy every "
        f"{eval_every} steps{' (quick mode: not a measurement)' if args.quick else ''}\n"
    )
    print(f"| method | steps to {TARGET:.0%} held-out acc (each seed) | train acc at stop | held-out acc at stop |")
    print("|---|---|---|---|")
    for name in args.methods:
        rows = [r for r in runs if r["method"] == name]
        train = sum(r["curve"][-1][1] for r in rows) / len(rows)
        val = sum(r["curve"][-1][2] for r in rows) / len(rows)
        print(f"| {name} | {summary(rows, max_steps)} | {train:.1%} | {val:.1%} |")
    if not args.quick:
        figure = args.figure.with_stem(args.figure.stem + args.tag)
        plot(runs, figure)
        print(f"\nCurves: {figure}")
    path = write_json(args.out, "grokking" + args.tag + ("_quick" if args.quick else ""), {"runs": runs})
    print(f"Raw numbers: {path}")


if __name__ == "__main__":
    main()
