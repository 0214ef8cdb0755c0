"""Test-time adaptation on Digits-C: source vs BNAdapt, Tent, RMT and AdaNPC, continual and gradual protocols.

    python benchmarks/tta.py --seeds 3
    python benchmarks/tta.py --quick

Source model: CNN2D (width 16, BatchNorm) trained 15 epochs on the clean 8x8 digits (Adam 1e-3). Test stream:
the 359 test digits under each of the 10 corruptions at severity 5 (continual: one domain after another, no
reset) and, for the gradual protocol, each corruption at severities 1-5-1. Batch 64. Tent and RMT: Adam 1e-3,
one step per batch; AdaNPC: k 100, T 0.1, beta 0.1 on the source model's penultimate features. Error = online
error (%) on each domain; throughput = test samples per second of the whole stream.
"""

from __future__ import annotations

import copy
import sys
import time

import lightning.pytorch as pl
import torch
from common import machine_line, mean_std, parser, write_json

from lit_tricks import RMT, AdaNPC, BNAdapt, Classifier, Tent
from lit_tricks.data import CORRUPTIONS, CorruptionStreamDataModule, DigitsDataModule
from lit_tricks.nets import CNN2D

QUIET = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
             enable_model_summary=False)  # fmt: skip


def methods(source, data):
    features = source.forward_features(data.train_set.inputs).detach()
    return {
        "BNAdapt": lambda: BNAdapt(copy.deepcopy(source)),
        "Tent": lambda: Tent(copy.deepcopy(source), lr=1e-3),
        "RMT": lambda: RMT(copy.deepcopy(source), lr=1e-3),
        "AdaNPC": lambda: AdaNPC(copy.deepcopy(source), features, data.train_set.targets),
    }


def source_errors(source, stream) -> dict[str, float]:
    with torch.no_grad():
        wrong = (source(stream.stream.inputs).argmax(-1) != stream.stream.targets).float()
    domain = stream.stream.extras["domain"]
    return {name: wrong[domain == d].mean().item() for d, name in enumerate(stream.domain_names)}


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    seeds = range(1 if args.quick else args.seeds)
    corruptions = list(CORRUPTIONS[:3]) if args.quick else list(CORRUPTIONS)
    runs = []
    for seed in seeds:
        pl.seed_everything(seed, verbose=False)
        data = DigitsDataModule(as_image=True, batch_size=64, val_fraction=0.0, seed=seed)
        classifier = Classifier(CNN2D(num_classes=10, width=16), num_classes=10)
        pl.Trainer(max_epochs=2 if args.quick else 15, **QUIET).fit(classifier, data)
        source = classifier.backbone.eval()
        for protocol in ("continual", "gradual"):
            stream = CorruptionStreamDataModule(data, corruptions, severity=5, protocol=protocol, seed=seed)
            stream.setup()
            errors = source_errors(source, stream)
            runs.append({"seed": seed, "protocol": protocol, "method": "source", "errors": errors,
                         "samples_per_second": None})  # fmt: skip
            for name, make in methods(source, data).items():
                pl.seed_everything(seed, verbose=False)
                module = make()
                start = time.perf_counter()
                result = pl.Trainer(inference_mode=False, **QUIET).test(module, datamodule=stream, verbose=False)[0]
                seconds = time.perf_counter() - start
                errors = {key.removeprefix("test/error/"): value for key, value in result.items() if "error" in key}
                runs.append({"seed": seed, "protocol": protocol, "method": name, "errors": errors,
                             "samples_per_second": len(stream.stream) / seconds})  # fmt: skip
            print(f"seed {seed} {protocol} done", file=sys.stderr)

    print(machine_line())
    print(f"Seeds: {len(seeds)}{' (quick mode: not a measurement)' if args.quick else ''}\n")
    names = ["source", "BNAdapt", "Tent", "RMT", "AdaNPC"]
    print("Continual, severity 5, online error (%):\n")
    print("| method | " + " | ".join(corruptions) + " | mean | samples/s |")
    print("|---|" + "---|" * (len(corruptions) + 2))
    for method in names:
        rows = [r for r in runs if r["protocol"] == "continual" and r["method"] == method]
        cells = [mean_std([r["errors"][f"{c}_5"] for r in rows], 100) for c in corruptions]
        mean = mean_std([sum(r["errors"][f"{c}_5"] for c in corruptions) / len(corruptions) for r in rows], 100)
        speed = "-" if method == "source" else mean_std([r["samples_per_second"] for r in rows], digits=0)
        print(f"| {method} | " + " | ".join(cells) + f" | {mean} | {speed} |")
    print("\nGradual (severities 1-5-1 per corruption), mean online error over all domains (%):\n")
    print("| method | mean error |\n|---|---|")
    for method in names:
        rows = [r for r in runs if r["protocol"] == "gradual" and r["method"] == method]
        print(f"| {method} | {mean_std([sum(r['errors'].values()) / len(r['errors']) for r in rows], 100)} |")
    path = write_json(args.out, "tta" + ("_quick" if args.quick else ""), {"runs": runs})
    print(f"\nRaw numbers: {path}")


if __name__ == "__main__":
    main()
