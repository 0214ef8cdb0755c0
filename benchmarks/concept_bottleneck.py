"""Concept bottleneck models on XOR / TRIG / DOT and rendered shapes; post-hoc CBMs on a digits CNN's features.

    python benchmarks/concept_bottleneck.py --seeds 3
    python benchmarks/concept_bottleneck.py --quick

Toys: 3,000 samples (2,400 train after the split, 750 test), encoder MLP d-64-64-(k + extra), Adam 1e-2,
batch 256, 40 epochs. Shapes: 2,000 16x16 images (500 test), 12 concepts in 4 groups, 9 classes, encoder a
small CNN, 30 epochs. Heads: linear, or MLP k-64-64-C. lambda = 1. Black box: the same encoder and MLP head with no
concept loss (lambda = 0). Hybrid: 16 extra unsupervised dimensions, linear head. CEM: m = 16, RandInt 0.25,
linear head. ECBM: the encoder (to 64-d, LeakyReLU) feeds the three energy networks (H = 64), the authors' loss
weights (3, 1, 1), inference (1, 1, 0.01) and intervention (0, 0, 3) weights, hard relaxation. "intervened": task
accuracy with every concept replaced by its true value; the curve is the mean over 5 random draws per number of
groups. Ceiling: the best accuracy of any function of the true concepts.
Post-hoc: a CNN2D trained on digits (20 epochs); PCBM on its frozen features with a CAV bank (linear-kernel SVC,
C = 0.1) from the 7 class-level digit concepts, sparse head lam = 2e-4 (the authors' CUB value, scikit-learn's
alpha), l1_ratio 0.99, SGD 0.1, 40 epochs; "SGDClassifier": the authors' solver (scikit-learn) on the same concept
activations and objective; PCBM-h adds the authors' residual (default init, Adam 0.01, 20 epochs).
"""

from __future__ import annotations

import sys

import lightning.pytorch as pl
import torch
from common import machine_line, mean_std, parser, write_json
from sklearn.linear_model import SGDClassifier
from torch import nn

from lit_tricks import Classifier, ConceptBottleneckModel, ConceptEmbeddingModel, PostHocCBM
from lit_tricks.data import ArrayDataModule, ConceptToyDataModule, DigitsConceptDataModule, ShapesDataModule
from lit_tricks.functional.concepts import concept_only_accuracy
from lit_tricks.modules.concept_bottleneck.ecbm import ECBM
from lit_tricks.nets import CNN2D

HIDDEN, EXTRA, EMB = 64, 16, 16


def mlp(d_in: int, d_out: int) -> nn.Module:
    return nn.Sequential(nn.Linear(d_in, HIDDEN), nn.LeakyReLU(), nn.Linear(HIDDEN, HIDDEN), nn.LeakyReLU(),
                         nn.Linear(HIDDEN, d_out))  # fmt: skip


def encoder(data, d_out: int) -> nn.Module:
    if isinstance(data, ShapesDataModule):
        return nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(128, HIDDEN), nn.LeakyReLU(), nn.Linear(HIDDEN, d_out),
        )  # fmt: skip
    return mlp(data.train_set.inputs.shape[1], d_out)


def build(model: str, data) -> pl.LightningModule:
    k, c = data.n_concepts, data.num_classes
    groups = getattr(data, "concept_groups", None)
    if model == "black box":
        return ConceptBottleneckModel(encoder(data, k), mlp(k, c), k, concept_loss_weight=0.0, bottleneck="logit")
    if model == "CEM":
        return ConceptEmbeddingModel(
            encoder(data, HIDDEN), k, c, latent_dim=HIDDEN, emb_size=EMB, concept_groups=groups
        )
    if model == "ECBM":
        features = nn.Sequential(encoder(data, HIDDEN), nn.LeakyReLU())
        return ECBM(features, k, c, feature_dim=HIDDEN, hidden_dim=HIDDEN, concept_groups=groups)
    if model == "hybrid (linear)":
        return ConceptBottleneckModel(encoder(data, k + EXTRA), nn.Linear(k + EXTRA, c), k, extra_dims=EXTRA,
                                      concept_groups=groups)  # fmt: skip
    mode, head = model.split(" (")
    task_head = nn.Linear(k, c) if head == "linear)" else mlp(k, c)
    return ConceptBottleneckModel(encoder(data, k), task_head, k, mode=mode, concept_groups=groups)


MODELS = ["black box", "joint (linear)", "joint (MLP)", "sequential (MLP)", "independent (linear)",
          "independent (MLP)", "hybrid (linear)", "CEM", "ECBM"]  # fmt: skip


def fit(model: pl.LightningModule, data, epochs: int) -> None:
    pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0).fit(model, data)  # fmt: skip


def evaluate(model, data) -> dict:
    test = data.test_set
    x, c, y = test.inputs, test.extras["concepts"], test.targets
    model.eval()
    with torch.no_grad():
        probs, logits = model(x)
        c_logits, state = model.concept_logits(x)
        intervened = model.task_logits(c_logits, state, torch.ones_like(c, dtype=torch.bool), c)
    curve = model.intervention_curve(x, c, y, trials=5)
    return {"acc": (logits.argmax(-1) == y).float().mean().item(),
            "concept_acc": ((probs > 0.5) == c.bool()).float().mean().item(),
            "intervened": (intervened.argmax(-1) == y).float().mean().item(),
            "curve": {n: mean for n, (mean, _) in curve.items()}}  # fmt: skip


def post_hoc(seed: int, epochs: int) -> dict:
    """Digits CNN, then PCBM and PCBM-h on its frozen features."""
    pl.seed_everything(seed, verbose=False)
    data = DigitsConceptDataModule(as_image=True, batch_size=64, val_fraction=0.0, seed=seed)
    data.setup()
    cnn = Classifier(CNN2D(num_classes=10, width=16), num_classes=10)
    pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False).fit(cnn, data)  # fmt: skip
    cnn.eval()
    with torch.no_grad():
        features = {
            split: cnn.backbone.forward_features(getattr(data, f"{split}_set").inputs) for split in ("train", "test")
        }
        original = (cnn(data.test_set.inputs).argmax(-1) == data.test_set.targets).float().mean().item()
    c_train = data.train_set.extras["concepts"]
    positives = [features["train"][c_train[:, j] == 1] for j in range(data.n_concepts)]
    negatives = [features["train"][c_train[:, j] == 0] for j in range(data.n_concepts)]
    bank, intercepts = PostHocCBM.concept_bank_from_examples(positives, negatives)
    train_e, test_e = features["train"], features["test"]

    class Embeddings(ArrayDataModule):
        num_classes = 10

        def load_arrays(self):
            return train_e, data.train_set.targets, test_e, data.test_set.targets

    embeddings = Embeddings(batch_size=64, val_fraction=0.0, seed=seed)
    pcbm = PostHocCBM(bank, 10, intercepts=intercepts, lam=2e-4, lr=0.1)
    fit(pcbm, embeddings, 2 * epochs)
    hybrid = pcbm.hybrid()
    fit(hybrid, embeddings, epochs)
    with torch.no_grad():
        accs = {name: (m(test_e).argmax(-1) == data.test_set.targets).float().mean().item()
                for name, m in (("PCBM", pcbm), ("PCBM-h", hybrid))}  # fmt: skip
        train_s, test_s = pcbm.project(train_e).numpy(), pcbm.project(test_e).numpy()
    # the authors' solver on the same concept activations and objective (train_pcbm.py)
    sgd = SGDClassifier(loss="log_loss", penalty="elasticnet", alpha=pcbm.lam, l1_ratio=pcbm.l1_ratio,
                        max_iter=10_000, random_state=seed).fit(train_s, data.train_set.targets.numpy())  # fmt: skip
    return {"seed": seed, "original": original, **accs, "sparsity": (pcbm.head.weight == 0).float().mean().item(),
            "PCBM (SGDClassifier)": sgd.score(test_s, data.test_set.targets.numpy()),
            "sparsity (SGDClassifier)": float((sgd.coef_ == 0).mean())}  # fmt: skip


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", choices=MODELS, default=MODELS, help="the rows (post-hoc CBMs run with all)")
    args = p.parse_args()
    models = [m for m in MODELS if m in args.models]
    seeds = range(1 if args.quick else args.seeds)
    epochs = {"toy": 2, "shapes": 2} if args.quick else {"toy": 40, "shapes": 30}
    n = 400 if args.quick else 3000
    sets = {
        "XOR": lambda seed: ConceptToyDataModule("xor", n, batch_size=256, val_fraction=0.0, seed=seed),
        "TRIG": lambda seed: ConceptToyDataModule("trig", n, batch_size=256, val_fraction=0.0, seed=seed),
        "DOT": lambda seed: ConceptToyDataModule("dot", n, batch_size=256, val_fraction=0.0, seed=seed),
        "shapes": lambda seed: ShapesDataModule(2 * n // 3, batch_size=256, val_fraction=0.0, seed=seed),
    }
    runs, ceilings = [], {}
    for name, make in sets.items():
        for seed in seeds:
            data = make(seed)
            data.setup()
            ceilings[name] = concept_only_accuracy(data.train_set.extras["concepts"], data.train_set.targets,
                                                   data.test_set.extras["concepts"], data.test_set.targets)  # fmt: skip
            for model_name in models:
                pl.seed_everything(seed, verbose=False)
                model = build(model_name, data)
                fit(model, data, epochs["shapes" if name == "shapes" else "toy"])
                runs.append({"set": name, "model": model_name, "seed": seed, **evaluate(model, data)})
            print(f"{name} seed {seed} done", file=sys.stderr)
    posthoc = [post_hoc(seed, 2 if args.quick else 20) for seed in seeds] if models == MODELS else []

    print(machine_line())
    print(f"Seeds: {len(seeds)}{' (quick mode: not a measurement)' if args.quick else ''}\n")
    print("Task accuracy / concept accuracy / task accuracy with all concepts intervened (%), test split:\n")
    print("| model | " + " | ".join(f"{s} (ceiling {100 * ceilings[s]:.0f})" for s in sets) + " |")
    print("|---|" + "---|" * len(sets))
    for model_name in models:
        cells = []
        for name in sets:
            rows = [r for r in runs if r["set"] == name and r["model"] == model_name]
            acc, concept, intervened = (
                mean_std([r[key] for r in rows], 100) for key in ("acc", "concept_acc", "intervened")
            )
            cells.append(f"{acc} / {concept if model_name != 'black box' else '-'} / "
                         f"{intervened if model_name != 'black box' else '-'}")  # fmt: skip
        print(f"| {model_name} | " + " | ".join(cells) + " |")
    print("\nShapes: intervention curve (task accuracy %, mean over seeds of the mean over 5 random draws):\n")
    print("| model | " + " | ".join(f"{g} groups" for g in range(5)) + " |")
    print("|---|" + "---|" * 5)
    for model_name in (m for m in models if m != "black box"):
        rows = [r for r in runs if r["set"] == "shapes" and r["model"] == model_name]
        print(f"| {model_name} | " + " | ".join(f"{100 * sum(r['curve'][g] for r in rows) / len(rows):.1f}"
                                               for g in range(5)) + " |")  # fmt: skip
    if posthoc:
        print("\n| digits, frozen CNN2D features | test acc (%) |\n|---|---|")
        for key in ("original", "PCBM", "PCBM (SGDClassifier)", "PCBM-h"):
            print(f"| {key} | {mean_std([r[key] for r in posthoc], 100)} |")
        print(f"| PCBM head weights exactly zero | {mean_std([r['sparsity'] for r in posthoc], 100)} |")
        zero = mean_std([r["sparsity (SGDClassifier)"] for r in posthoc], 100)
        print(f"| SGDClassifier weights exactly zero | {zero} |")
    name = "concept_bottleneck" if models == MODELS else "concept_bottleneck_" + "_".join(m.split()[0] for m in models)
    path = write_json(args.out, name + ("_quick" if args.quick else ""),
                      {"runs": runs, "ceilings": ceilings, "posthoc": posthoc})  # fmt: skip
    print(f"\nRaw numbers: {path}")


if __name__ == "__main__":
    main()
