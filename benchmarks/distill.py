"""Teacher -> student distillation (issue #14): KD, ND, DHKD, TGeo, MEAL V2, SLA, MIC against the student alone.

    python benchmarks/distill.py --seeds 3 --epochs 30
    python benchmarks/distill.py --quick

Two set-ups, each with a 10% validation split that only TGeo reads (its held-out batches; no row validates):
MNIST-1D with a CNN1D (32 channels) teacher and a narrow CNN1D (8 channels) student, Adam 1e-2; 8x8 digits (as
images) with a CNN2D (width 16) teacher and a narrow CNN2D (width 4) student, Adam 3e-3. Every student row has the
same network, data, batch size and epochs (``--epochs``; the teachers train 15). Per seed three teachers are trained
once (teacher 0 is the single teacher of every row, the three together the MEAL V2 ensemble, loaded from their
checkpoint paths), then the rows run interleaved on the same seed. Rows: student alone; KD (T 4, hard labels weight
1); ND (KD++: NDLoss, T 4, kd and nd weights 1); DHKD (the authors' T 2, non-linear auxiliary head, alpha 1 and
gamma 1 as their CIFAR-100 command); TGeo (T 1.5); MEAL V2 (the 3 teachers' averaged softmax, T 1, no hard labels);
SLA and SLA+SD (the SLA head, one test pass; the aggregated 4-pass test is printed below the table); MIC
(EMATeacher(decay 0.99, warm-up) + MIC(ratio 0.5), evaluated on the EMA weights, as docs/mic.md measured). Test
accuracy, ECE and NLL (mean ± std over seeds) and the student's fit wall time against "student alone" of the same
seed (ratio of the means). The teacher forwards are counted in every distillation row (per training step and
teacher); a last run per set-up stacks KD, EMA-KD (SelfDistill "ema") and MIC in one fit and counts the Distill
teacher's and the EMA model's forwards: one each per step.
"""

from __future__ import annotations

import importlib
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import yaml
from common import fit_and_test, machine_line, mean_std, parser, write_json
from lightning.pytorch.callbacks import Callback
from torch import nn

from lit_tricks import Classifier
from lit_tricks.callbacks.distill import Distill
from lit_tricks.callbacks.ema_teacher import EMATeacher
from lit_tricks.callbacks.mic import MIC
from lit_tricks.callbacks.self_distill import SelfDistill
from lit_tricks.callbacks.sla import SLA
from lit_tricks.data import DigitsDataModule, MNIST1DDataModule
from lit_tricks.distill import DHKDLoss, NDLoss, TGeoLoss
from lit_tricks.metrics.classification import classification_metrics
from lit_tricks.nets import CNN1D, CNN2D

NUM_TEACHERS = 3

# name -> (data module factory(quick), teacher backbone (class path, init args), student backbone factory, Adam lr,
# teacher epochs, MIC block size); the students' epochs are --epochs
SETUPS: dict[str, tuple] = {
    "MNIST-1D": (
        lambda quick: MNIST1DDataModule(batch_size=100, val_fraction=0.1, num_samples=500 if quick else 5000),
        ("lit_tricks.nets.CNN1D", {"num_classes": 10, "channels": 32}),
        lambda: CNN1D(10, channels=8),
        1e-2,
        15,
        None,
    ),
    "digits": (
        lambda quick: DigitsDataModule(batch_size=64, val_fraction=0.1, as_image=True),
        ("lit_tricks.nets.CNN2D", {"num_classes": 10, "width": 16}),
        lambda: CNN2D(10, width=4),
        3e-3,
        15,
        2,
    ),
}


def teacher_rows(teacher: Classifier, paths: list[str], block_size: int | None) -> dict[str, Callable[[], list]]:
    """Each row's callbacks, built fresh for every fit."""
    return {
        "student alone": lambda: [],
        "KD": lambda: [Distill(teacher, loss="kd", temperature=4.0)],
        "ND (KD++)": lambda: [Distill(teacher, loss=NDLoss(temperature=4.0, kd_weight=1.0, nd_weight=1.0))],
        "DHKD": lambda: [Distill(teacher, loss=DHKDLoss(temperature=2.0, head="nonlinear"), weight=1.0)],
        "TGeo": lambda: [Distill(teacher, loss=TGeoLoss(temperature=1.5))],
        "MEAL V2 (3 teachers)": lambda: [Distill(paths, temperature=1.0, hard_weight=0.0)],
        "SLA": lambda: [SLA()],
        "SLA+SD": lambda: [SLA(self_distill=True)],
        "MIC (EMA)": lambda: [
            EMATeacher(decay=0.99, warmup=True, warmup_power=0.75),
            MIC(block_size=block_size, ratio=0.5),
        ],
    }


ROWS = list(teacher_rows(None, [], None))  # type: ignore[arg-type]


class ForwardCounter(Callback):
    """Counts, inside training batches only, the forwards of each teacher of the trainer's Distill (through its
    first layer with weights, which every forward path crosses: logits alone or with features) and the eval-mode
    forwards of the student (an EMATeacher runs the student's module in eval mode with the averaged weights)."""

    def __init__(self) -> None:
        self.teacher_calls: list[int] = []
        self.ema_calls = 0
        self._active = False
        self._handles: list[Any] = []

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        distills = [cb for cb in trainer.callbacks if isinstance(cb, Distill)]
        models = distills[0].teacher.models if distills else []
        self.teacher_calls = [0] * len(models)
        for k, model in enumerate(models):
            first = next(m for m in model.modules() if not list(m.children()) and list(m.parameters(recurse=False)))
            self._handles.append(first.register_forward_hook(lambda *_, k=k: self._count_teacher(k)))
        self._handles.append(pl_module.register_forward_hook(self._count_student))

    def _count_teacher(self, k: int) -> None:
        self.teacher_calls[k] += self._active

    def _count_student(self, module: nn.Module, *_: Any) -> None:
        self.ema_calls += self._active and not module.training

    def on_train_batch_start(self, *_: Any) -> None:
        self._active = True

    def on_train_batch_end(self, *_: Any) -> None:
        self._active = False

    def on_fit_end(self, *_: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def adam(lr: float) -> Callable:
    return lambda params: torch.optim.Adam(params, lr=lr)


def train_teachers(setup: str, seed: int, quick: bool, folder: Path) -> tuple[list[Classifier], list[str], list]:
    """Train the seed's teachers; each is saved as a ``python -m lit_tricks fit`` run (``config.yaml`` and
    ``checkpoints/last.ckpt``), so Distill can rebuild it from the path. Quick mode: one epoch."""
    make_data, (class_path, init_args), _, lr, epochs, _ = SETUPS[setup]
    epochs = 1 if quick else epochs
    models, paths, results = [], [], []
    for k in range(NUM_TEACHERS):
        pl.seed_everything(1000 * seed + k, verbose=False)
        datamodule = make_data(quick)
        datamodule.seed = seed
        module_name, _, name = class_path.rpartition(".")
        net = getattr(importlib.import_module(module_name), name)(**init_args)
        model = Classifier(net, num_classes=10, optimizer=adam(lr))
        test, seconds, trainer = fit_and_test(model, datamodule, max_epochs=epochs, limit_val_batches=0)
        run = folder / f"{setup}_seed{seed}_teacher{k}"
        trainer.save_checkpoint(run / "checkpoints" / "last.ckpt")
        backbone = {"class_path": class_path, "init_args": init_args}
        config = {
            "model": {"class_path": "lit_tricks.Classifier", "init_args": {"backbone": backbone, "num_classes": 10}}
        }
        (run / "config.yaml").write_text(yaml.safe_dump(config))
        models.append(model.eval())
        paths.append(str(run / "checkpoints" / "last.ckpt"))
        results.append(
            {"acc": test["test/acc"], "ece": test["test/ece"], "nll": test["test/nll"], "fit_seconds": seconds}
        )
    return models, paths, results


def aggregated_metrics(model: Classifier, datamodule: pl.LightningDataModule) -> dict[str, float]:
    """SLA's aggregated inference (4 transformed passes) on the test split."""
    metrics = classification_metrics(10, "agg_")
    for batch in datamodule.test_dataloader():
        metrics.update(SLA.aggregated_logits(model, batch["inputs"]).softmax(dim=-1), batch["targets"])
    return {key: value.item() for key, value in metrics.compute().items()}


def run_student(setup: str, row: str, callbacks: list, seed: int, quick: bool, epochs: int) -> dict[str, Any]:
    """Fit and test one student row, counting the teacher forwards."""
    make_data, _, make_student, lr, _, _ = SETUPS[setup]
    pl.seed_everything(100 + seed, verbose=False)
    datamodule = make_data(quick)
    datamodule.seed = seed
    model = Classifier(make_student(), num_classes=10, optimizer=adam(lr))
    counter = ForwardCounter()
    test, seconds, trainer = fit_and_test(
        model, datamodule, max_epochs=epochs, limit_val_batches=0, callbacks=[*callbacks, counter]
    )
    steps = trainer.global_step
    result = {
        "data": setup, "method": row, "seed": seed, "steps": steps, "acc": test["test/acc"], "ece": test["test/ece"],
        "nll": test["test/nll"], "fit_seconds": seconds,
        "teacher_forwards_per_step": [calls / steps for calls in counter.teacher_calls],
        "ema_forwards_per_step": counter.ema_calls / steps,
    }  # fmt: skip
    if any(isinstance(cb, SLA) for cb in callbacks):
        result.update(aggregated_metrics(model, datamodule))
    return result


def forward_check(setup: str, teacher: Classifier) -> dict[str, Any]:
    """KD + EMA-KD + MIC in one short fit (one epoch, not timed): the Distill teacher and the EMA model should
    each run once per training step."""
    callbacks = [
        Distill(teacher, loss="kd", temperature=4.0),
        EMATeacher(decay=0.99, warmup=True),
        SelfDistill("ema", temperature=4.0),
        MIC(block_size=SETUPS[setup][5], ratio=0.5),
    ]
    result = run_student(setup, "KD + EMA-KD + MIC", callbacks, 0, True, 1)
    return {
        key: result[key] for key in ("data", "method", "steps", "teacher_forwards_per_step", "ema_forwards_per_step")
    }


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--data", choices=list(SETUPS), nargs="+", default=list(SETUPS), help="set-ups to run")
    p.add_argument("--epochs", type=int, default=15, help="the students' epochs (teachers: 15)")
    args = p.parse_args()
    epochs = 1 if args.quick else args.epochs
    torch.set_num_threads(1)
    seeds = range(1 if args.quick else args.seeds)
    runs, teachers, checks = [], [], []
    with tempfile.TemporaryDirectory() as folder:
        for setup in args.data:
            for seed in seeds:
                models, paths, results = train_teachers(setup, seed, args.quick, Path(folder))
                teachers += [{"data": setup, "seed": seed, "teacher": k, **r} for k, r in enumerate(results)]
                for row, make_callbacks in teacher_rows(models[0], paths, SETUPS[setup][5]).items():
                    runs.append(run_student(setup, row, make_callbacks(), seed, args.quick, epochs))
            checks.append(forward_check(setup, models[0]))
    print(machine_line())
    print(f"Seeds: {len(seeds)}{' (quick mode: not a measurement)' if args.quick else ''}")
    teacher_epochs = 1 if args.quick else SETUPS[args.data[0]][4]
    print(f"Students: MNIST-1D CNN1D(channels=8), digits CNN2D(width=4), {epochs} epochs; teachers {teacher_epochs}\n")
    print("| data | student | test acc (%) | ECE (%) | NLL | fit time vs alone |")
    print("|---|---|---|---|---|---|")
    for setup in args.data:
        cell = [t for t in teachers if t["data"] == setup and t["teacher"] == 0]
        class_path, init_args = SETUPS[setup][1]
        widths = ", ".join(f"{key}={value}" for key, value in init_args.items() if key != "num_classes")
        print(
            f"| {setup} | teacher 0: {class_path.rpartition('.')[2]}({widths}) "
            f"| {mean_std([t['acc'] for t in cell], 100)} | {mean_std([t['ece'] for t in cell], 100)} "
            f"| {mean_std([t['nll'] for t in cell], digits=3)} | — |"
        )
        base = statistics.fmean(r["fit_seconds"] for r in runs if r["data"] == setup and r["method"] == ROWS[0])
        for row in ROWS:
            rows = [r for r in runs if r["data"] == setup and r["method"] == row]
            ratio = statistics.fmean(r["fit_seconds"] for r in rows) / base
            print(
                f"| {setup} | {row} | {mean_std([r['acc'] for r in rows], 100)} "
                f"| {mean_std([r['ece'] for r in rows], 100)} | {mean_std([r['nll'] for r in rows], digits=3)} "
                f"| {ratio:.2f}x |"
            )
    print()
    for setup in args.data:
        for row in ("SLA", "SLA+SD"):
            rows = [r for r in runs if r["data"] == setup and r["method"] == row]
            print(
                f"{setup}, {row} aggregated (4 test passes): acc {mean_std([r['agg_acc'] for r in rows], 100)} %, "
                f"ECE {mean_std([r['agg_ece'] for r in rows], 100)} %, "
                f"NLL {mean_std([r['agg_nll'] for r in rows], digits=3)}"
            )
    for check in checks:
        print(
            f"{check['data']}, {check['method']}: {check['steps']} steps, Distill teacher forwards per step "
            f"{check['teacher_forwards_per_step'][0]:.2f}, EMA model forwards per step "
            f"{check['ema_forwards_per_step']:.2f}"
        )
    payload = {"student_epochs": epochs, "runs": runs, "teachers": teachers, "forward_checks": checks}
    path = write_json(args.out, "distill" + ("_quick" if args.quick else ""), payload)
    print(f"\nRaw numbers: {path}")


if __name__ == "__main__":
    main()
