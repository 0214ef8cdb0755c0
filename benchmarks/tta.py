"""Test-time adaptation on Digits-C and MNIST-1D-C: source vs BNAdapt, Tent, RMT, AdaNPC and EcoTTA, continual and
gradual protocols, throughput and memory; beside them the few-shot fine-tuning baseline (labelled target samples).

    python benchmarks/tta.py --seeds 3
    python benchmarks/tta.py --quick
    python benchmarks/tta.py --seeds 3 --methods source Tent "LP-FT 3-shot"   # a subset of the rows

Source models (Adam 1e-3, clean training split): Digits: CNN2D (width 16, BatchNorm), 15 epochs on the 8x8
digits; MNIST-1D: CNN1D (32 channels, BatchNorm), 20 epochs on 4000 signals. Test streams: the test split under
each of the 10 corruptions at severity 5 (continual: one domain after another, no reset) and, for the gradual
protocol, each corruption at severities 1-5-1. Batch 64. Tent and RMT: Adam 1e-3, one step per batch; AdaNPC:
k 100 (the authors' default; also k 10), T 0.1, beta 0.1 on the source model's penultimate features; EcoTTA:
one part per conv block, warm-up 10 epochs (SGD 5e-2) on the clean training split, then SGD 5e-3, lambda 0.5,
H0 = 0.4 ln C. LP-FT 3-shot (not source-free: it is given labels): 3 labelled samples per class from each
domain, drawn from the training split under the stream's corruptions at severity 5 (FewShotDataModule), a linear
probe of 400 steps (Adam 1e-4) then a full fine-tune of 1000 steps (a fresh Adam, 1e-5), batches of 32, as the
authors' protocol (daintlab/fewshot-SFDA), the last weights (no model selection); fitted once per seed and
tested frozen on both protocols. The source baseline (SourceOnly: frozen, its own BatchNorm statistics) runs
through the same Trainer.test and logs the same per-domain errors. Error = online error (%) on each domain;
throughput = test samples per second of the whole stream (EcoTTA's warm-up and LP-FT's fine-tune not included).
Memory (CPU has no allocator peak counter): the module's state (every network, buffer and memory bank) + the
optimizer's state + the reset snapshot, and the tensors saved for backward by one adaptation step on a batch of 64
(counted by storage with autograd's saved-tensor hooks), i.e. what an accelerator holds at the step's peak.
"""

from __future__ import annotations

import copy
import sys
import time

import lightning.pytorch as pl
import torch
from common import machine_line, mean_std, parser, write_json

from lit_tricks import RMT, AdaNPC, BNAdapt, Classifier, EcoTTA, Tent
from lit_tricks.data import CORRUPTIONS, CorruptionStreamDataModule, DigitsDataModule, MNIST1DDataModule
from lit_tricks.data.few_shot import FewShotDataModule
from lit_tricks.modules.tta import SourceOnly
from lit_tricks.modules.tta.few_shot import FewShotFineTune
from lit_tricks.nets import CNN1D, CNN2D

QUIET = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
             enable_model_summary=False)  # fmt: skip
NAMES = ["source", "BNAdapt", "Tent", "RMT", "AdaNPC", "AdaNPC k=10", "EcoTTA", "LP-FT 3-shot"]
SETUPS = {  # data set: (data module, network, source epochs, EcoTTA parts, one input's shape)
    "Digits-C": (lambda seed: DigitsDataModule(as_image=True, batch_size=64, val_fraction=0.0, seed=seed),
                 lambda: CNN2D(num_classes=10, width=16), 15, ["body.0", "body.1", "body.2", "body.3"], [1, 8, 8]),
    "MNIST-1D-C": (lambda seed: MNIST1DDataModule(batch_size=64, val_fraction=0.0, seed=seed),
                   lambda: CNN1D(num_classes=10, channels=32), 20, ["body.0", "body.1", "body.2"], [40]),
}  # fmt: skip


def methods(source, data, parts, input_shape, warmup_epochs, few_shot: dict):
    """The methods' factories; ``few_shot`` holds the data module and steps of LP-FT, and its fitted module
    once made (under ``"module"``), so that both protocols test the same fine-tuned model."""
    features = source.forward_features(data.train_set.inputs).detach()

    def ecotta():
        eco = EcoTTA(copy.deepcopy(source), parts, input_shape=input_shape)
        pl.Trainer(max_epochs=warmup_epochs, **QUIET).fit(eco, data)
        return eco

    def lp_ft():
        if "module" not in few_shot:
            lp_steps, ft_steps = few_shot["steps"]
            tuner = FewShotFineTune(copy.deepcopy(source), lp_steps=lp_steps, lp_lr=1e-4, lr=1e-5)
            pl.Trainer(max_steps=lp_steps + ft_steps, **QUIET).fit(tuner, few_shot["data"])
            few_shot["module"] = tuner
        return copy.deepcopy(few_shot["module"])

    return {
        "source": lambda: SourceOnly(copy.deepcopy(source)),
        "BNAdapt": lambda: BNAdapt(copy.deepcopy(source)),
        "Tent": lambda: Tent(copy.deepcopy(source), lr=1e-3),
        "RMT": lambda: RMT(copy.deepcopy(source), lr=1e-3),
        "AdaNPC": lambda: AdaNPC(copy.deepcopy(source), features, data.train_set.targets),
        "AdaNPC k=10": lambda: AdaNPC(copy.deepcopy(source), features, data.train_set.targets, k=10),
        "EcoTTA": ecotta,
        "LP-FT 3-shot": lp_ft,
    }


def storage_bytes(tensors, exclude: set[int] = frozenset()) -> tuple[int, set[int]]:
    """Bytes of the distinct storages of ``tensors`` not in ``exclude``, and their pointers."""
    sizes = {}
    for t in tensors:
        if torch.is_tensor(t) and t.device.type != "meta":
            storage = t.untyped_storage()
            sizes.setdefault(storage.data_ptr(), storage.nbytes())
    kept = {ptr: size for ptr, size in sizes.items() if ptr not in exclude}
    return sum(kept.values()), set(sizes)


def memory(module, x) -> dict[str, int]:
    """State bytes (networks, buffers, optimizer, reset snapshot) and bytes saved for backward by one step."""
    optimizer = [v for s in module.tta_optimizer.state.values() for v in s.values()] if module.tta_optimizer else []
    state, pointers = storage_bytes([*module.state_dict().values(), *optimizer, *module._source_state.values()])
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module.adapt({"inputs": x})
    activations, _ = storage_bytes(saved, exclude=pointers)
    return {"state": state, "activations": activations}


def run(dataset: str, seeds, corruptions, quick: bool, names: list[str]) -> list[dict]:
    make_data, make_net, epochs, parts, input_shape = SETUPS[dataset]
    runs = []
    for seed in seeds:
        pl.seed_everything(seed, verbose=False)
        data = make_data(seed)
        if quick:  # small test streams: the quick run only checks that the script works
            if isinstance(data, MNIST1DDataModule):
                data.num_samples = 600
            else:
                data.test_fraction = 0.05
        classifier = Classifier(make_net(), num_classes=10)
        pl.Trainer(max_epochs=2 if quick else epochs, **QUIET).fit(classifier, data)
        source = classifier.backbone.eval()
        few_data = FewShotDataModule(data, shots=3, corruptions=corruptions, severity=5, batch_size=32, seed=seed)
        few_shot = {"data": few_data, "steps": (2, 3) if quick else (400, 1000)}
        for protocol in ("continual", "gradual"):
            stream = CorruptionStreamDataModule(data, corruptions, severity=5, protocol=protocol, seed=seed)
            stream.setup()
            for name, make in methods(source, data, parts, input_shape, 1 if quick else 10, few_shot).items():
                if name not in names:
                    continue
                pl.seed_everything(seed, verbose=False)
                module = make()
                start = time.perf_counter()
                result = pl.Trainer(inference_mode=False, **QUIET).test(module, datamodule=stream, verbose=False)[0]
                seconds = time.perf_counter() - start
                record = {"dataset": dataset, "seed": seed, "protocol": protocol, "method": name,
                          "errors": {k.removeprefix("test/error/"): v for k, v in result.items() if "error" in k},
                          "samples_per_second": len(stream.stream) / seconds}  # fmt: skip
                if protocol == "continual":
                    record["memory"] = memory(module, stream.stream.inputs[:64])
                runs.append(record)
            print(f"{dataset} seed {seed} {protocol} done", file=sys.stderr)
    return runs


def report(runs: list[dict], dataset: str, corruptions: list[str]) -> None:
    print(f"\n### {dataset}, continual, severity 5, online error (%)\n")
    print("| method | " + " | ".join(corruptions) + " | mean | samples/s | state MB | saved for backward MB |")
    print("|---|" + "---|" * (len(corruptions) + 4))
    names = [name for name in NAMES if any(r["method"] == name for r in runs)]
    for method in names:
        rows = [r for r in runs if r["dataset"] == dataset and r["protocol"] == "continual" and r["method"] == method]
        cells = [mean_std([r["errors"][f"{c}_5"] for r in rows], 100) for c in corruptions]
        mean = mean_std([sum(r["errors"][f"{c}_5"] for c in corruptions) / len(corruptions) for r in rows], 100)
        mb = [sum(r["memory"][k] for r in rows) / len(rows) / 2**20 for k in ("state", "activations")]
        extra = [mean_std([r["samples_per_second"] for r in rows], digits=0), f"{mb[0]:.2f}", f"{mb[1]:.2f}"]
        print(f"| {method} | " + " | ".join(cells) + f" | {mean} | " + " | ".join(extra) + " |")
    print(f"\n{dataset}, gradual (severities 1-5-1 per corruption), mean online error over all domains (%):\n")
    print("| method | mean error |\n|---|---|")
    for method in names:
        rows = [r for r in runs if r["dataset"] == dataset and r["protocol"] == "gradual" and r["method"] == method]
        print(f"| {method} | {mean_std([sum(r['errors'].values()) / len(r['errors']) for r in rows], 100)} |")


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    p.add_argument("--methods", nargs="+", default=NAMES, choices=NAMES, help="the rows to run (default: all)")
    args = p.parse_args()
    seeds = range(1 if args.quick else args.seeds)
    corruptions = list(CORRUPTIONS[:3]) if args.quick else list(CORRUPTIONS)
    runs = [r for dataset in args.datasets for r in run(dataset, seeds, corruptions, args.quick, args.methods)]
    print(machine_line())
    print(f"Seeds: {len(seeds)}{' (quick mode: not a measurement)' if args.quick else ''}")
    for dataset in args.datasets:
        report(runs, dataset, corruptions)
    path = write_json(args.out, "tta" + ("_quick" if args.quick else ""), {"runs": runs})
    print(f"\nRaw numbers: {path}")


if __name__ == "__main__":
    main()
