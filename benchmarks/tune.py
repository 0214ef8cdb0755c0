"""PBT vs random search vs the hand-set defaults, on the 40%-noise MNIST-1D recipe with Mixup; Ray's overhead.

    python benchmarks/tune.py --seeds 3     # the table in BENCHMARKS.md (needs pip install -e ".[tune]")
    python benchmarks/tune.py --quick       # a few steps, to check the script runs

Recipe: configs/noisy_labels.yaml + configs/tricks/mixup.yaml (CNN1D on MNIST-1D, 40% symmetric label noise on the
training labels, clean validation and test labels; Adam). Searched: the learning rate (log-uniform 1e-3..3e-2) and
Mixup's alpha (log-uniform 0.05..2), over 20 epochs (the recipe's 40 halved to fit this machine's budget). PBT: 4
members, exploit/explore every 2 epochs; random search: 4 members with values drawn once, the same epochs each
(so the same total steps); defaults: the recipe's lr 0.01 and the snippet's alpha 0.2. Each member runs on one of
the 2 cores. "best val" is the best member's last validation accuracy (what PBT ranks by); "test" is that member's
final checkpoint on the test split. Ray's own cost: a
1-member tune run against a plain fit of the same recipe, wall time including Ray's start.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from common import machine_line, mean_std, parser, write_json

from lit_tricks.tune import build_run, tune

ROOT = Path(__file__).resolve().parent.parent
FILES = [ROOT / "configs/noisy_labels.yaml", ROOT / "configs/tricks/mixup.yaml"]
SPACE = {"model.optimizer.lr": {"loguniform": [1e-3, 3e-2]}, "Mixup.alpha": {"loguniform": [0.05, 2.0]}}
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def _test(checkpoint: Path, overrides: list[str]) -> float:
    cli = build_run(FILES, [*QUIET, *overrides, "--trainer.logger=false"])
    return cli.trainer.test(cli.model, cli.datamodule, ckpt_path=str(checkpoint), verbose=False)[0]["test/acc"]


def _defaults(seed: int, overrides: list[str], root: Path) -> dict:
    cli = build_run(FILES, [*QUIET, *overrides, f"--seed_everything={seed}", f"--trainer.default_root_dir={root}"])
    start = time.perf_counter()
    cli.trainer.fit(cli.model, cli.datamodule)
    seconds = time.perf_counter() - start
    val = float(cli.trainer.callback_metrics["val/acc"])
    test = cli.trainer.test(cli.model, cli.datamodule, ckpt_path="last", verbose=False)[0]["test/acc"]
    return {"method": "defaults", "seed": seed, "val": val, "test": test, "seconds": seconds}


def _tuned(scheduler: str, seed: int, population: int, epochs: int, interval: int, root: Path, extra: list) -> dict:
    overrides = [f"--seed_everything={seed}", *extra]
    start = time.perf_counter()
    result = tune(
        FILES, SPACE, scheduler=scheduler, population=population, perturbation_interval=interval,
        max_epochs=epochs, run_dir=root, name=f"{scheduler}-{seed}", seed=seed, overrides=overrides,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    test = _test(result.best_checkpoint, overrides)
    return {"method": "PBT" if scheduler == "pbt" else "random search", "seed": seed, "val": result.best_score,
            "test": test, "seconds": seconds, "schedule": result.schedule, "final": result.best_config}  # fmt: skip


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    seeds = range(1 if args.quick else args.seeds)
    epochs, interval = (2, 1) if args.quick else (20, 2)
    extra = [f"--trainer.max_epochs={epochs}"]
    if args.quick:
        extra += ["--trainer.limit_train_batches=3", "--trainer.limit_val_batches=2", "--trainer.limit_test_batches=2"]
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for seed in seeds:
            runs.append(_defaults(seed, [*extra], root / f"defaults-{seed}"))
            runs.append(_tuned("pbt", seed, 4, epochs, interval, root, extra))
            runs.append(_tuned("random", seed, 4, epochs, interval, root, extra))
            print({k: v for k, v in runs[-3].items() if k != "schedule"}, runs[-2], runs[-1], flush=True)
        # Ray's own cost: one member through tune vs the same fit without Ray
        plain = _defaults(0, extra, root / "plain")["seconds"]
        one = _tuned("random", 0, 1, epochs, interval, root, extra)["seconds"]
    print(machine_line())
    print("\n| method | best val acc (%) | its test acc (%) | wall time (s) |\n|---|---|---|---|")
    for method in ("defaults", "random search", "PBT"):
        rows = [r for r in runs if r["method"] == method]
        val, test = (mean_std([r[k] for r in rows], 100) for k in ("val", "test"))
        print(f"| {method} | {val} | {test} | {mean_std([r['seconds'] for r in rows], 1, 0)} |")
    print(f"\nRay's overhead: a 1-member tune run {one:.1f} s vs the plain fit {plain:.1f} s ({one / plain:.2f}x).")
    for r in runs:
        if r["method"] == "PBT":
            print(f"PBT seed {r['seed']} schedule (global step: values): {r['schedule']}")
    write_json(args.out, "tune_quick" if args.quick else "tune", {"runs": runs, "ray_one_member_seconds": one,
                                                                  "plain_fit_seconds": plain})  # fmt: skip


if __name__ == "__main__":
    main()
