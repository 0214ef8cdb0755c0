"""Hypernetworks: the default formulation against Magnitude Invariant Parametrizations (MIP) on a loss-conditioned toy.

    python benchmarks/hypernetwork.py --seeds 3     # the table in BENCHMARKS.md (a few minutes on 2 CPU cores)
    python benchmarks/hypernetwork.py --quick       # a few steps, to check the script runs

Task: one HyperNetwork (hidden 16, 64, 128) predicts all weights of an MLP 1 -> 32 -> 32 -> 1 from the weight
lam ~ U(0, 1) of two regression losses, (1 - lam) (f(x) - sin(3 pi x))^2 + lam (f(x) - cos(3 pi x))^2, x ~ U(-1, 1),
a fresh batch of 128 (x, lam) pairs per step, Adam at two learning rates. The optimum for each lam is known,
f* = (1 - lam) sin + lam cos, so the excess loss E_x (f - f*)^2 is comparable across lam: it is measured on 11 lam
values and 128 x values every 25 steps. Prints, per form and learning rate (mean ± std over seeds): the mean excess
at a few steps, the steps until the mean excess first drops below 0.05, and the spread of the final excess over
lam (max - min), and the fit time with its ratio to the plain form's; writes benchmarks/results/hypernetwork.json.
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

STEPS, EVERY, BATCH, THRESHOLD = 1500, 25, 128, 0.05
REPORT_AT = (0, 100, 250, 500, 1000, 1500)
LRS = (1e-3, 1e-2)
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


def run(mip: bool, lr: float, seed: int, steps: int) -> dict:
    torch.manual_seed(seed)
    net = HyperNetwork(1, MLP(1, 1, hidden=(32, 32)), hidden=(16, 64, 128), mip=mip)
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=lr)
    data = torch.Generator().manual_seed(1000 + seed)
    curve = {0: excess(net)}
    seconds = 0.0
    for step in range(1, steps + 1):
        x = torch.rand(BATCH, 1, generator=data) * 2 - 1
        lam = torch.rand(BATCH, 1, generator=data)
        start = time.perf_counter()
        loss = mixed_regression_loss(net(x, lam), targets(x), lam)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seconds += time.perf_counter() - start
        if step % EVERY == 0 or step == steps:
            curve[step] = excess(net)
    means = {step: statistics.fmean(values) for step, values in curve.items()}
    reached = next((step for step, value in sorted(means.items()) if value < THRESHOLD), None)
    final = curve[steps]
    return {
        "mean_excess": means,
        "excess_per_lam_final": final,
        "steps_to_threshold": reached,
        "spread_final": max(final) - min(final),
        "seconds": seconds,
    }


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    torch.set_num_threads(1)
    steps = 50 if args.quick else STEPS
    seeds = range(1 if args.quick else args.seeds)
    lrs = LRS[:1] if args.quick else LRS
    report_at = [s for s in REPORT_AT if s <= steps] + ([steps] if steps not in REPORT_AT else [])
    runs: dict[str, list[dict]] = {}
    for lr in lrs:
        for seed in seeds:  # the two forms interleaved, so both see the same machine load
            for name, mip in FORMS.items():
                result = run(mip, lr, seed, steps)
                runs.setdefault(f"{name} lr={lr:g}", []).append({"seed": seed, **result})

    print(machine_line())
    print(f"\nMean excess loss over lam (11 values), {len(seeds)} seed(s); threshold {THRESHOLD}\n")
    steps_cols = " | ".join(f"step {s}" for s in report_at)
    print(f"| form | {steps_cols} | steps to < {THRESHOLD} | final spread over lam | fit s | time ratio |")
    print("|---|" + "---|" * (len(report_at) + 4))
    for lr in lrs:
        plain_seconds = statistics.fmean(r["seconds"] for r in runs[f"plain lr={lr:g}"])
        for name in FORMS:
            key = f"{name} lr={lr:g}"
            rs = runs[key]
            cells = " | ".join(mean_std([r["mean_excess"][s] for r in rs], digits=3) for s in report_at)
            reached = [r["steps_to_threshold"] for r in rs]
            hit = [s for s in reached if s is not None]
            reach = (mean_std(hit, digits=0) if hit else "never") + (
                f" ({len(hit)}/{len(rs)})" if len(hit) < len(rs) else ""
            )
            seconds = statistics.fmean(r["seconds"] for r in rs)
            print(
                f"| {key} | {cells} | {reach} | {mean_std([r['spread_final'] for r in rs], digits=3)} | "
                f"{seconds:.1f} | {seconds / plain_seconds:.2f} |"
            )
    path = write_json(args.out, "hypernetwork_quick" if args.quick else "hypernetwork", {"steps": steps, "runs": runs})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
