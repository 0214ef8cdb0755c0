"""The stability gap (fine-tuning vs experience replay) and the cost of per-step continual evaluation.

    python benchmarks/continual.py --seeds 5                 # both parts
    python benchmarks/continual.py --seeds 5 --part cost     # only the cost table
    python benchmarks/continual.py --seeds 5 --part online   # only the Si-Blurry table (fine-tuning, ER, NMC)
    python benchmarks/continual.py --seeds 3 --part gap --methods NMC DKVB "ER + FPF" k-FPF   # some rows only
    python benchmarks/continual.py --seeds 3 --part footprint   # each method's fit time and state, no evaluation
    python benchmarks/continual.py --quick

Class-incremental, 5 tasks of 2 classes, one fit over the whole stream:
- Split-Digits: MLP 64-200-200-10, SGD lr 0.05, batch 32, 20 epochs per task; ER memory 200, w = 0.5.
- Split-MNIST-1D: 25,000 signals (4,000 training and 1,000 test per task), CNN1D, Adam lr 3e-3, batch 64,
  2 epochs per task; ER memory 2000, w = 0.5.
ContinualEvaluation every step on up to 1000 test samples per seen task (MNIST-1D has about 1,000 per
task). The same metrics from the task-end evaluations only ("coarse") show what the usual evaluation
reports. Gap rows beside fine-tuning and ER (issue #20): ER + FPF (a fine-tuning phase of the most drifted
module on the memory at every task switch and at the end), k-FPF (no per-step replay; a phase of the 3 most
drifted modules every 25 steps), NMC and DKVB on the raw inputs (flattened pixels / signals; no encoder is
pretrained here). Cost: wall time of the Split-MNIST-1D fine-tuning fit with the callback at every_n_steps = 1 and
10, against the same fit without it; and with smaller stratified subsets (subset_size 400 / 800, stratified=True),
which change the metrics (fewer samples) but cost less.
Online (Si-Blurry, Moon et al. 2023; the authors' N = 50, M = 10, 5 tasks, split seed = run seed): one pass over
the same data sets with the same models, fine-tuning and ER as above, and NMC (nearest class mean of the
L2-normalised raw inputs, no gradient step); ContinualEvaluation every 5 steps with the online metrics every 100
samples (A_auc, A_last), beside NMC on the split streams.
"""

from __future__ import annotations

import statistics
import sys
import time

import lightning.pytorch as pl
import torch
from common import machine_line, mean_std, parser, write_json

from lit_tricks import DKVB, FPF, Classifier, ContinualEvaluation, ExperienceReplay, NearestMeanClassifier
from lit_tricks.callbacks import PRD
from lit_tricks.data import ContinualDataModule, DigitsDataModule, MNIST1DDataModule
from lit_tricks.nets import CNN1D, MLP

SETUPS = {
    "Split-Digits": dict(
        data=lambda quick: DigitsDataModule(batch_size=32, val_fraction=0.0),
        net=lambda: MLP(64, 10, hidden=(200, 200)),
        optimizer=lambda params: torch.optim.SGD(params, lr=0.05),
        epochs_per_task=20,
        memory=200,
    ),
    "Split-MNIST-1D": dict(
        data=lambda quick: MNIST1DDataModule(num_samples=2500 if quick else 25_000, batch_size=64, val_fraction=0.0),
        net=lambda: CNN1D(10),
        optimizer=lambda params: torch.optim.Adam(params, lr=3e-3),
        epochs_per_task=2,
        memory=2000,
    ),
}
METRICS = ("acc", "min_acc", "wc_acc", "wf10")
GAP_METHODS = ("fine-tuning", "replay", "ER + FPF", "k-FPF", "PRD", "NMC", "DKVB")


def _model_and_tricks(spec: dict, method: str, seed: int) -> tuple[pl.LightningModule, list]:
    if method == "NMC":
        return NearestMeanClassifier(torch.nn.Flatten(), num_classes=10), []
    if method == "DKVB":
        return DKVB(torch.nn.Flatten(), num_classes=10, seed=seed), []
    tricks = {
        "fine-tuning": [],
        "replay": [ExperienceReplay(memory_size=spec["memory"], seed=seed)],
        "ER + FPF": [FPF(memory_size=spec["memory"], at_task_end=True, seed=seed)],
        "k-FPF": [FPF(memory_size=spec["memory"], replay=False, every_n_steps=25, num_groups=3, seed=seed)],
        "PRD": [PRD()],
    }[method]
    return Classifier(spec["net"](), num_classes=10, optimizer=spec["optimizer"]), tricks


# (every_n_steps, subset_size): today's evaluation (up to 1000 samples per seen task) and smaller stratified subsets
COST_ROWS = ((None, None), (10, None), (1, None), (10, 800), (1, 400))


def fit(setup: str, seed: int, method: str, evaluation: ContinualEvaluation | None, quick: bool, cache: dict):
    spec = SETUPS[setup]
    pl.seed_everything(seed, verbose=False)
    if setup not in cache:
        cache[setup] = spec["data"](quick)
        cache[setup].setup()
    epochs_per_task = 1 if quick else spec["epochs_per_task"]
    stream = ContinualDataModule(cache[setup], num_tasks=5, epochs_per_task=epochs_per_task, seed=seed)
    model, callbacks = _model_and_tricks(spec, method, seed)
    callbacks += [evaluation] if evaluation is not None else []  # after FPF: evaluations see its phases
    trainer = pl.Trainer(
        max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(model, stream)
    return time.perf_counter() - start, trainer.global_step, state_bytes(model, callbacks)


def state_bytes(model: pl.LightningModule, callbacks: list) -> int:
    """The bytes of the tensors a checkpoint keeps for the method: the module's state dict (the network, NMC's
    means, DKVB's keys and values) and its tricks' states (replay buffers, FPF's snapshots, PRD's prototypes)."""
    states = [model.state_dict()] + [cb.state_dict() for cb in callbacks if not isinstance(cb, ContinualEvaluation)]
    return _tensor_bytes(states)


def _tensor_bytes(state: object) -> int:
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(_tensor_bytes(value) for value in state.values())
    if isinstance(state, (list, tuple)):
        return sum(_tensor_bytes(value) for value in state)
    return 0


ONLINE_METRICS = ("acc", "min_acc", "a_auc", "a_last")
ONLINE_RUNS = (("si_blurry", "fine-tuning"), ("si_blurry", "replay"), ("si_blurry", "NMC"), ("class", "NMC"))


def fit_online(setup: str, scenario: str, method: str, seed: int, quick: bool, cache: dict) -> dict:
    """One pass over a Si-Blurry (or split) stream of ``setup`` with ``method``; the evaluation's summary."""
    spec = SETUPS[setup]
    pl.seed_everything(seed, verbose=False)
    if setup not in cache:
        cache[setup] = spec["data"](quick)
        cache[setup].setup()
    stream = ContinualDataModule(cache[setup], scenario=scenario, num_tasks=5, seed=seed)
    evaluation = ContinualEvaluation(every_n_steps=5, eval_period=100)
    callbacks = [evaluation]
    if method == "NMC":
        model = NearestMeanClassifier(torch.nn.Flatten(), num_classes=10)
    else:
        model = Classifier(spec["net"](), num_classes=10, optimizer=spec["optimizer"])
        callbacks += [ExperienceReplay(memory_size=spec["memory"], seed=seed)] if method == "replay" else []
    trainer = pl.Trainer(
        max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
    )  # fmt: skip
    trainer.fit(model, stream)
    return evaluation.summary()


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument(
        "--part", choices=("all", "gap", "cost", "online", "footprint"), default="all", help="which table(s) to measure"
    )
    p.add_argument("--methods", nargs="+", choices=GAP_METHODS, default=GAP_METHODS, help="the gap table's rows")
    p.add_argument("--setups", nargs="+", choices=list(SETUPS), default=list(SETUPS), help="the gap table's streams")
    args = p.parse_args()
    seeds = range(1 if args.quick else args.seeds)
    cache: dict = {}
    fit("Split-Digits", 0, "fine-tuning", None, True, {})  # untimed warm-up
    runs, costs = [], []
    for setup in args.setups if args.part in ("all", "gap") else ():
        for seed in seeds:
            for method in args.methods:
                evaluation = ContinualEvaluation(every_n_steps=1)
                seconds, steps, _ = fit(setup, seed, method, evaluation, args.quick, cache)
                print(f"{setup} {method} seed {seed}: {seconds:.1f} s", file=sys.stderr)
                _, _, acc = evaluation.history()
                runs.append({"setup": setup, "method": method, "seed": seed, "steps": steps, "seconds": seconds,
                             "per_step": evaluation.summary(), "coarse": evaluation.summary(end_of_task_only=True),
                             "first_task_curve": acc[:, 0].tolist(), "eval_steps": evaluation.steps})  # fmt: skip
    if args.part in ("all", "cost"):
        fit("Split-MNIST-1D", 0, "fine-tuning", None, True, {})  # untimed warm-up of the CNN1D path
    for seed in seeds if args.part in ("all", "cost") else ():
        for every, subset in COST_ROWS:
            size = subset // 10 if subset and args.quick else subset  # quick mode's tasks have ~100 test samples
            evaluation = None if every is None else ContinualEvaluation(every, subset_size=size, stratified=bool(size))
            seconds, _, _ = fit("Split-MNIST-1D", seed, "fine-tuning", evaluation, args.quick, cache)
            costs.append({"seed": seed, "every_n_steps": every, "subset_size": subset, "seconds": seconds})
    footprint = []  # each gap method without ContinualEvaluation: its own fit time and checkpointed state
    for setup in args.setups if args.part in ("all", "footprint") else ():
        for seed in seeds:
            for method in args.methods:
                seconds, _, size = fit(setup, seed, method, None, args.quick, cache)
                footprint.append({"setup": setup, "method": method, "seed": seed, "seconds": seconds, "bytes": size})
    online = []
    for setup in SETUPS if args.part in ("all", "online") else ():
        for scenario, method in ONLINE_RUNS:
            for seed in seeds:
                summary = fit_online(setup, scenario, method, seed, args.quick, cache)
                online.append(dict(setup=setup, scenario=scenario, method=method, seed=seed, summary=summary))

    print(machine_line())
    print(f"Seeds: {len(seeds)}{' (quick mode: not a measurement)' if args.quick else ''}\n")
    if runs:
        print("| stream | method | evaluation | ACC (%) | min-ACC (%) | WC-ACC (%) | WF10 (%) |")
        print("|---|---|---|---|---|---|---|")
    for setup in args.setups if runs else ():
        for method in args.methods:
            rows = [r for r in runs if r["setup"] == setup and r["method"] == method]
            for kind, label in (("per_step", "every step"), ("coarse", "task ends only")):
                cells = " | ".join(mean_std([r[kind][m] for r in rows], 100) for m in METRICS)
                print(f"| {setup} | {method} | {label} | {cells} |")
    if costs:
        print("\n| Split-MNIST-1D fine-tuning | fit time (s) | vs without |")
        print("|---|---|---|")
    for every, subset in COST_ROWS if costs else ():
        rows = [c for c in costs if (c["every_n_steps"], c.get("subset_size")) == (every, subset)]
        ratios = [
            c["seconds"] / next(b["seconds"] for b in costs if b["seed"] == c["seed"] and b["every_n_steps"] is None)
            for c in rows
        ]
        label = "without ContinualEvaluation" if every is None else f"every_n_steps={every}"
        label += f", stratified subset_size={subset}" if subset else ""
        print(f"| {label} | {mean_std([c['seconds'] for c in rows])} | {mean_std(ratios, digits=2)}x |")
    if footprint:
        print("\n| stream | method | fit time (s), no evaluation | vs fine-tuning | state in the checkpoint (KB) |")
        print("|---|---|---|---|---|")
    for setup in args.setups if footprint else ():
        base = {f["seed"]: f["seconds"] for f in footprint if (f["setup"], f["method"]) == (setup, "fine-tuning")}
        for method in args.methods:
            rows = [f for f in footprint if (f["setup"], f["method"]) == (setup, method)]
            ratio = mean_std([f["seconds"] / base[f["seed"]] for f in rows], digits=2) + "x" if base else "-"
            kb = statistics.fmean(f["bytes"] for f in rows) / 1024
            print(f"| {setup} | {method} | {mean_std([f['seconds'] for f in rows])} | {ratio} | {kb:.0f} |")
    if online:
        print("\n| data | stream | method | ACC (%) | min-ACC (%) | A_auc (%) | A_last (%) |")
        print("|---|---|---|---|---|---|---|")
    for setup in SETUPS if online else ():
        for scenario, method in ONLINE_RUNS:
            rows = [r for r in online if (r["setup"], r["scenario"], r["method"]) == (setup, scenario, method)]
            cells = " | ".join(mean_std([r["summary"][m] for r in rows], 100) for m in ONLINE_METRICS)
            stream = "Si-Blurry" if scenario == "si_blurry" else "split"
            print(f"| {setup.removeprefix('Split-')} | {stream} | {method} | {cells} |")
    name = "continual" + ("" if args.part == "all" else f"_{args.part}") + ("_quick" if args.quick else "")
    path = write_json(args.out, name, {"runs": runs, "costs": costs, "online": online, "footprint": footprint})
    print(f"\nRaw numbers: {path}")


if __name__ == "__main__":
    main()
