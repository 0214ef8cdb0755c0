"""Per-step optimizer time and state memory: lit_tricks' Lion and AdaBelief vs torch.optim.AdamW(foreach=True),
and vs the pip packages lion-pytorch and adabelief-pytorch when they are installed, on an 8.4M-parameter MLP
(8 tensors) and the ResNet-50 layout (161 small parameter tensors).

    python benchmarks/optim_speed.py --seeds 3
    python benchmarks/optim_speed.py --quick

Each optimizer steps its own copy of the same initial weights with the same fixed gradients (``optimizer.step()``
alone, no forward or backward); the optimizers take turns, a few steps each, so a change in the machine's load hits
all of them alike. Step time: median over the turns, after warm-up steps (AdaBelief's first ~5 steps are its
cheaper SGD steps). Hyperparameters: AdamW lr 1e-3, weight decay 0.01; Lion lr 1e-4, weight decay 0.1; AdaBelief
lr 1e-3, weight decay 0.01 (decoupled, rectified). The pip packages' column "max |Δθ| vs ours" is the largest
weight difference from lit_tricks' optimizer after the same steps (float32 round-off, or 0 when bit-exact).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import statistics
import time
from collections.abc import Callable

import torch
from common import machine_line, mean_std, parser, write_json
from ema_speed import MODELS
from torch import Tensor
from torch.optim import Optimizer

from lit_tricks.optim import AdaBelief, Lion

Factory = Callable[[list[Tensor]], Optimizer]


def optimizers() -> dict[str, tuple[Factory, str | None]]:
    """name -> (factory, the lit_tricks optimizer it is compared with); the pip packages only if installed."""
    found = {
        "AdamW foreach": (lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.01, foreach=True), None),
        "Lion": (lambda p: Lion(p, lr=1e-4, weight_decay=0.1), None),
        "AdaBelief": (lambda p: AdaBelief(p, lr=1e-3, weight_decay=0.01), None),
    }
    if importlib.util.find_spec("lion_pytorch"):
        from lion_pytorch import Lion as PipLion
        from lion_pytorch.foreach import Lion as PipLionForeach

        found["lion-pytorch"] = (lambda p: PipLion(p, lr=1e-4, weight_decay=0.1), "Lion")
        found["lion-pytorch foreach"] = (lambda p: PipLionForeach(p, lr=1e-4, weight_decay=0.1), "Lion")
    if importlib.util.find_spec("adabelief_pytorch"):
        from adabelief_pytorch import AdaBelief as PipAdaBelief

        def pip_adabelief(params: list[Tensor]) -> Optimizer:
            with contextlib.redirect_stdout(io.StringIO()):  # it prints its settings
                return PipAdaBelief(params, lr=1e-3, weight_decay=0.01, print_change_log=False)

        found["adabelief-pytorch"] = (pip_adabelief, "AdaBelief")
    return found


def state_per_parameter(optimizer: Optimizer) -> tuple[int, float]:
    """(state tensors of a parameter's shape per parameter, their megabytes over all parameters)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    full = [
        [t for t in optimizer.state[p].values() if isinstance(t, Tensor) and t.shape == p.shape and t.dim() > 0]
        for p in params
    ]
    megabytes = sum(t.numel() * t.element_size() for tensors in full for t in tensors) / 2**20
    return len(full[0]), megabytes


def run(make_net, seed: int, warmup: int, turns: int, steps_per_turn: int) -> dict[str, dict]:
    torch.manual_seed(seed)
    initial = [p.detach() for p in make_net().parameters()]
    grads = [torch.randn_like(p) * 1e-2 for p in initial]
    available = optimizers()
    runs = {}
    for name, (factory, _) in available.items():
        params = [p.clone().requires_grad_() for p in initial]
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        runs[name] = (params, factory(params))
    for _, optimizer in runs.values():
        for _ in range(warmup):
            optimizer.step()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(turns):
        for name, (_, optimizer) in runs.items():
            start = time.perf_counter()
            for _ in range(steps_per_turn):
                optimizer.step()
            times[name].append((time.perf_counter() - start) / steps_per_turn)
    results = {}
    for name, (params, optimizer) in runs.items():
        per_param, megabytes = state_per_parameter(optimizer)
        ours = available[name][1]
        diff = None
        if ours is not None:
            diff = max((a - b).abs().max().item() for a, b in zip(params, runs[ours][0], strict=True))
        results[name] = {
            "step_ms": statistics.median(times[name]) * 1e3,
            "state_tensors_per_param": per_param,
            "state_mb": megabytes,
            "max_abs_diff_vs_ours": diff,
        }
    return results


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    seeds, warmup, turns, steps_per_turn = (1, 6, 2, 1) if args.quick else (args.seeds, 10, 15, 4)
    rows = []
    for model, (make_net, _) in MODELS.items():
        for seed in range(seeds):
            for name, result in run(make_net, seed, warmup, turns, steps_per_turn).items():
                rows.append({"model": model, "seed": seed, "optimizer": name, **result})
    print(machine_line())
    note = " (quick mode: not a measurement)" if args.quick else ""
    print(f"Seeds: {seeds}, {warmup} warm-up steps, then {turns} turns of {steps_per_turn} steps each{note}\n")
    print("| model | optimizer | step (ms) | / AdamW foreach | state tensors per parameter | state (MB) "
          "| max abs Δθ vs ours |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for model in MODELS:
        baseline = {r["seed"]: r["step_ms"] for r in rows if r["model"] == model and r["optimizer"] == "AdamW foreach"}
        for name in optimizers():
            r = [row for row in rows if row["model"] == model and row["optimizer"] == name]
            ratio = [row["step_ms"] / baseline[row["seed"]] for row in r]
            diffs = [row["max_abs_diff_vs_ours"] for row in r if row["max_abs_diff_vs_ours"] is not None]
            print(
                f"| {model} | {name} | {mean_std([row['step_ms'] for row in r], digits=2)} "
                f"| {mean_std(ratio, digits=2)}x | {r[0]['state_tensors_per_param']} | {r[0]['state_mb']:.1f} "
                f"| {f'{max(diffs):.2g}' if diffs else '—'} |"
            )
    path = write_json(args.out, "optim_speed" + ("_quick" if args.quick else ""), {"runs": rows})
    print(f"\nRaw numbers: {path}")


if __name__ == "__main__":
    main()
