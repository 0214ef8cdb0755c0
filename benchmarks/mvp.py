"""MVP vs fine-tuning vs ER on the Si-Blurry Digits stream (online, one pass) with a frozen pretrained tiny ViT.

    python benchmarks/mvp.py --seeds 3
    python benchmarks/mvp.py --quick        # checks the script only

Per seed: a ViT (8x8 images, 4x4 patches, width 32, 4 blocks) is pretrained for 10 epochs (Adam 1e-2, batch 32) on the
digits training set, either on all ten classes or on classes 0-4 only; the Si-Blurry stream (5 tasks, N = 50, M = 10,
batch 16, split seed = the seed) then runs once. Fine-tuning and ER train a new linear head on the frozen ViT (the
authors' baselines: a frozen ViT, head only, Adam 5e-3; one update per batch here, and, unlike theirs, no -inf on
unseen classes in training); ER keeps a reservoir of 200. MVP as configs/continual/mvp.yaml (key prompts at blocks
2, 3), with the authors' training mask and without it. A_auc and A_last from ContinualEvaluation(eval_period=100).
"""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from common import machine_line, mean_std, parser, write_json

from lit_tricks import Classifier, ContinualEvaluation, ExperienceReplay
from lit_tricks.data import ContinualDataModule, DigitsDataModule
from lit_tricks.modules.mvp import MVP
from lit_tricks.nets.vit import ViT

METHODS = ("fine-tuning", "ER", "MVP", "MVP, mask_unseen_in_training=False")


def pretrain(seed: int, classes: int, epochs: int) -> tuple[ViT, float]:
    """A ViT trained on the digits of ``classes`` lowest labels; its test accuracy on them."""
    data = DigitsDataModule(as_image=True, val_fraction=0.0)
    data.setup()
    keep = data.train_set.targets < classes
    x, y = data.train_set.inputs[keep], data.train_set.targets[keep]
    torch.manual_seed(seed)
    vit = ViT(image_size=8, patch_size=4, dim=32, depth=4, heads=2)
    optimizer = torch.optim.Adam(vit.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for rows in torch.randperm(len(x), generator=generator).split(32):
            loss = F.cross_entropy(vit(x[rows]), y[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    test = data.test_set.targets < classes
    with torch.no_grad():
        accuracy = (vit(data.test_set.inputs[test]).argmax(1) == data.test_set.targets[test]).float().mean().item()
    return vit.eval(), accuracy


def frozen_with_new_head(vit: ViT, seed: int) -> ViT:
    net = copy.deepcopy(vit).requires_grad_(False)
    net.head = torch.nn.Linear(net.num_features, 10)
    torch.nn.init.trunc_normal_(net.head.weight, std=0.02, generator=torch.Generator().manual_seed(seed))
    torch.nn.init.zeros_(net.head.bias)
    return net


def run(method: str, vit: ViT, seed: int, quick: bool) -> dict:
    pl.seed_everything(seed, verbose=False)
    data = DigitsDataModule(as_image=True, batch_size=16, val_fraction=0.0)
    stream = ContinualDataModule(data, scenario="si_blurry", seed=seed)
    evaluation = ContinualEvaluation(every_n_steps=10_000, eval_period=100)
    callbacks: list = [evaluation]
    if method.startswith("MVP"):
        model = MVP(vit, num_classes=10, e_prompt_layers=(2, 3), seed=seed,
                    mask_unseen_in_training="False" not in method)  # fmt: skip
    else:
        model = Classifier(frozen_with_new_head(vit, seed), num_classes=10,
                           optimizer=lambda params: torch.optim.Adam(params, lr=5e-3))  # fmt: skip
        callbacks += [ExperienceReplay(memory_size=200, seed=seed)] if method == "ER" else []
    trainer = pl.Trainer(
        max_epochs=1, limit_train_batches=8 if quick else None, accelerator="cpu", devices=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
    )  # fmt: skip
    trainer.fit(model, stream)
    summary = evaluation.summary()
    return {"a_auc": summary["a_auc"], "a_last": summary["a_last"]}


def main(argv: list[str] | None = None) -> dict:
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    seeds = [1] if args.quick else list(range(1, args.seeds + 1))  # the authors' scripts run seeds 1-5
    results: dict = {}
    lines = [machine_line()]
    for classes in (10, 5):
        for seed in seeds:
            vit, accuracy = pretrain(seed, classes, epochs=1 if args.quick else 10)
            results[f"{classes}/pretrain/{seed}"] = {"test_acc": accuracy}
            for method in METHODS:
                results[f"{classes}/{method}/{seed}"] = run(method, vit, seed, args.quick)
        pretrained = [results[f"{classes}/pretrain/{s}"]["test_acc"] for s in seeds]
        lines += ["", f"Pretrained on digits 0-{classes - 1} (its test accuracy there: {mean_std(pretrained, 100)} %)",
                  "", "| method | A_auc (%) | A_last (%) |", "|---|---|---|"]  # fmt: skip
        for method in METHODS:
            runs = [results[f"{classes}/{method}/{s}"] for s in seeds]
            auc, last = (mean_std([r[k] for r in runs], 100) for k in ("a_auc", "a_last"))
            lines.append(f"| {method} | {auc} | {last} |")
    print("\n".join(lines))
    write_json(args.out, "mvp_quick" if args.quick else "mvp", {"seeds": seeds, "runs": results})
    return results


if __name__ == "__main__":
    main()
