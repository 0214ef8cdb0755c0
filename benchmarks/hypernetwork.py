"""Hypernetworks: the default formulation against Magnitude Invariant Parametrizations (MIP) on a loss-conditioned toy.

    python benchmarks/hypernetwork.py --seeds 3     # the table in BENCHMARKS.md (a few minutes on 2 CPU cores)
    python benchmarks/hypernetwork.py --quick       # a few steps, to check the script runs

Task: one HyperNetwork (hidden 16, 64, 128) predicts all weights of an MLP 1 -> 32 -> 32 -> 1 from the weight
lam ~ U(0, 1) of two regression losses, (1 - lam) (f(x) - sin(3 pi x))^2 + lam (f(x) - cos(3 pi x))^2, x ~ U(-1, 1),
a fresh batch of 128 (x, lam) pairs per step, Adam at three learning rates. The optimum for each lam is known,
f* = (1 - lam) sin + lam cos, so the excess loss E_x (f - f*)^2 is comparable across lam: it is measured on 11 lam
values and 128 x values every 25 steps. Prints, per form and learning rate (mean ± std over seeds): the mean excess
at a few steps, the steps until the mean excess first drops below 0.05, the spread of the excess over lam
(max - min) at step 250 and at the end, and the time of a training step of each form (the two alternate step by
step, so they share the machine's load); writes benchmarks/results/hypernetwork.json.
"""

from __future__ import annotations

import math
import statistics
import time

import torch
from common import machine_line, mean_std, parser, write_json

from lit_tricks.modules.hypernetwork import mixed_regression_loss
from lit_tricks.nets import MLP
from lit_tricks.nets.hypernetwork import HyperNetwork

STEPS, EVERY, BATCH, THRESHOLD, TIMED_STEPS = 1500, 25, 128, 0.05, 300
REPORT_AT = (0, 100, 250, 500, 1000, 1500)
SPREAD_AT = 250
LRS = (3e-4, 1e-3, 1e-2)
FORMS = {"plain": False, "MIP": True}
LAMS = torch.linspace(0, 1, 11)
X_GRID = torch.linspace(-1, 1, 128)[:, None]


def targets(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.sin(3 * math.pi * x), torch.cos(3 * math.pi * x)], dim=1)


@torch.no_grad()
def excess(net: HyperNetwork) -> list[float]:
    """``E_x (f_lam(x) - f*_lam(x))^2`` on the lam grid."""
    y = targets(X_GRID)
    return [
        ((net(X_GRID, lam.view(1)) - ((1 - lam) * y[:, :1] + lam * y[:, 1:])).square().mean().item()) for lam in LAMS
    ]


def make(mip: bool, lr: float) -> tuple[HyperNetwork, torch.optim.Optimizer]:
    net = HyperNetwork(1, MLP(1, 1, hidden=(32, 32)), hidden=(16, 64, 128), mip=mip)
    return net, torch.optim.Adam(net.parameters(), lr=lr)


def batch(data: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.rand(BATCH, 1, generator=data) * 2 - 1, torch.rand(BATCH, 1, generator=data)


def train_step(net: HyperNetwork, opt: torch.optim.Optimizer, x: torch.Tensor, lam: torch.Tensor) -> None:
    loss = mixed_regression_loss(net(x, lam), targets(x), lam)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def run(mip: bool, lr: float, seed: int, steps: int) -> dict:
    torch.manual_seed(seed)
    net, opt = make(mip, lr)
    data = torch.Generator().manual_seed(1000 + seed)
    curve = {0: excess(net)}
    for step in range(1, steps + 1):
        train_step(net, opt, *batch(data))
        if step % EVERY == 0 or step == steps:
            curve[step] = excess(net)
    means = {step: statistics.fmean(values) for step, values in curve.items()}
    return {
        "mean_excess": means,
        "excess_per_lam": curve,
        "steps_to_threshold": next((step for step, value in sorted(means.items()) if value < THRESHOLD), None),
        "spread": {step: max(values) - min(values) for step, values in curve.items()},
    }


def step_milliseconds(steps: int) -> dict[str, float]:
    """Milliseconds per training step of each form, alternating step by step on the same batches."""
    torch.manual_seed(0)
    nets = {name: make(mip, 1e-3) for name, mip in FORMS.items()}
    data = torch.Generator().manual_seed(0)
    totals = dict.fromkeys(FORMS, 0.0)
    for _ in range(steps):
        x, lam = batch(data)
        for name, (net, opt) in nets.items():
            start = time.perf_counter()
            train_step(net, opt, x, lam)
            totals[name] += time.perf_counter() - start
    return {name: 1000 * total / steps for name, total in totals.items()}


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    torch.set_num_threads(1)
    steps = 50 if args.quick else STEPS
    seeds = range(1 if args.quick else args.seeds)
    lrs = LRS[:1] if args.quick else LRS
    report_at = [s for s in REPORT_AT if s <= steps] + ([steps] if steps not in REPORT_AT else [])
    spread_at = min(SPREAD_AT, steps)
    runs: dict[str, list[dict]] = {}
    for lr in lrs:
        for seed in seeds:  # the two forms interleaved, so both see the same machine load
            for name, mip in FORMS.items():
                result = run(mip, lr, seed, steps)
                runs.setdefault(f"{name} lr={lr:g}", []).append({"seed": seed, **result})
    milliseconds = step_milliseconds(10 if args.quick else TIMED_STEPS)

    print(machine_line())
    print(f"\nMean excess loss over lam (11 values), {len(seeds)} seed(s); threshold {THRESHOLD}\n")
    steps_cols = " | ".join(f"step {s}" for s in report_at)
    spread_cols = f"spread over lam, step {spread_at} | spread over lam, step {steps}"
    print(f"| form | {steps_cols} | steps to < {THRESHOLD} | {spread_cols} |")
    print("|---|" + "---|" * (len(report_at) + 3))
    for lr in lrs:
        for name in FORMS:
            key = f"{name} lr={lr:g}"
            rs = runs[key]
            cells = " | ".join(mean_std([r["mean_excess"][s] for r in rs], digits=3) for s in report_at)
            reached = [r["steps_to_threshold"] for r in rs]
            hit = [s for s in reached if s is not None]
            reach = (mean_std(hit, digits=0) if hit else "never") + (
                f" ({len(hit)}/{len(rs)})" if len(hit) < len(rs) else ""
            )
            spreads = " | ".join(mean_std([r["spread"][s] for r in rs], digits=3) for s in (spread_at, steps))
            print(f"| {key} | {cells} | {reach} | {spreads} |")
    ratio = milliseconds["MIP"] / milliseconds["plain"]
    print(
        f"\nTraining step (batch {BATCH}, alternating the two forms): plain {milliseconds['plain']:.2f} ms, "
        f"MIP {milliseconds['MIP']:.2f} ms, ratio {ratio:.2f}"
    )
    payload = {"steps": steps, "runs": runs, "step_milliseconds": milliseconds}
    path = write_json(args.out, "hypernetwork_quick" if args.quick else "hypernetwork", payload)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
