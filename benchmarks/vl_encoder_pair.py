"""TFUP, LaBo and DN-CBM on a small offline image/text encoder pair trained CLIP-style on 8x8 digits.

    python benchmarks/vl_encoder_pair.py --seeds 3
    python benchmarks/vl_encoder_pair.py --quick

The encoder pair (trained per seed, in seconds). Digits (DigitsDataModule, 8x8 images; the fixed 360-image test
split): 60% of the 1,437 training images are the "pre-training" split, the other 40% (575) the downstream pool.
Image encoder: CNN2D width 16 -> D = 32, L2-normalised. Text encoder: a bag of words, the mean of learned word
embeddings (D = 32) of a phrase's words (stop words such as "a", "on", "the" dropped), L2-normalised. Words: the
ten digit names and the words of 14 concept phrases ("a closed loop", "a vertical stroke", "a horizontal stroke on
top", ...), each true of some digits by the hand table ATTRIBUTES; plus distractor words never trained ("blue",
"wings", ...). Each pre-training image gets a random caption per step: its digit's name (probability 1/2) and each
of its digit's phrases (probability 1/2), at least one of them. Loss: symmetric multi-positive InfoNCE, temperature
0.07, over the batch's image-caption pairs, a caption being positive for every image of the batch whose digit makes
it true (its name if any, and all its phrases); Adam 1e-2, batches of 128, 40 epochs (quick: 2). Phrases are
composed from shared words, so combinations never seen as captions exist (the LaBo distractors).
TFUP: class prompts "the digit <name>"; targets = the test split under impulse noise 5, Gaussian blur 5 and
contrast 3 (lit_tricks.data.corruptions); zero-shot = argmax of the cosine to the prompts; TFUP with the authors'
defaults, its cache from the unlabelled target images (the authors' transductive protocol).
LaBo: 6 candidate phrases written for each class (its true phrases, phrases of other digits, distractors: an LLM's
mistakes), k = 2 or 4 per class by the submodular selection (discriminability 1e7, coverage 1, cosine) vs a random
k of the same candidates; embeddings get a constant feature 1 appended (image and text alike) so that class-mean
similarities are positive, as LaBo's score needs (a constant shift of every class logit under the softmax prior).
The class-concept matrix starts from the language prior and trains with Adam 1e-2 for 100 full-batch steps;
"prior" = before training. Linear probe: scikit-learn LogisticRegression (C = 1) on the image embeddings. Shots per
class from the downstream pool: 1, 5, all (57.5 on average).
DN-CBM: SAE (expansion 8, M = 256, l1 1e-3, Adam 1e-3, batches of 64, 60 epochs, resampling every 10) on the
unlabelled image embeddings of pre-training split and pool; each neuron named by the nearest of the 14 phrases,
the 10 digit names and the 8 distractors; probe (Adam 1e-2, sparsity 1, 60 epochs) on the pool vs the linear probe.
"name true": of the neurons that fire on test images, the fraction whose name is a phrase true for (or the name of)
the digit with the largest mean activation; "chance": the same fraction for a name drawn uniformly from the
vocabulary; "named by a distractor": the fraction of those neurons named by one of the 8 never-trained phrases.
"""

from __future__ import annotations

import itertools
import random
import re

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from common import machine_line, mean_std, parser, write_json
from sklearn.linear_model import LogisticRegression
from torch import Tensor, nn

from lit_tricks.data import DigitsDataModule
from lit_tricks.data.corruptions import corrupt
from lit_tricks.data.indexed import ArrayDataset
from lit_tricks.functional.vl_embeddings import embed
from lit_tricks.modules.concept_bottleneck.dn_cbm import DNCBM, DNCBMAutoencoder
from lit_tricks.modules.concept_bottleneck.labo import LaBo
from lit_tricks.modules.tta.tfup import TFUP
from lit_tricks.nets import CNN2D

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
# phrase -> the digits it is true of (a hand table for 8x8 handwritten digits)
ATTRIBUTES = {
    "a closed loop": [0, 6, 8, 9],
    "a vertical stroke": [1, 4, 9],
    "a diagonal stroke": [2, 7],
    "a horizontal stroke on top": [5, 7],
    "a horizontal stroke at the bottom": [2],
    "a horizontal stroke in the middle": [4],
    "an open curve": [2, 3, 5],
    "two stacked loops": [8],
    "a loop at the bottom": [6],
    "a loop at the top": [9],
    "two bumps on the right": [3],
    "a round shape": [0],
    "crossing strokes": [4, 8],
    "a thin shape": [1],
}
PHRASES = list(ATTRIBUTES)
DISTRACTORS = ["a blue color", "shiny wings", "furry ears", "four wheels", "a striped tail", "a long beak",
               "green leaves", "a loop of wings"]  # fmt: skip
STOP = {"a", "an", "on", "at", "the", "in", "of", "digit"}
WORDS = sorted({w for p in NAMES + PHRASES + DISTRACTORS for w in p.split() if w not in STOP})
D, TEMPERATURE = 32, 0.07
SHIFTS = (("impulse_noise", 5), ("gaussian_blur", 5), ("contrast", 3))  # TFUP's target domains
SHOTS = (1, 5, None)  # None: all of the pool
CONCEPTS_PER_CLASS = (2, 4)  # LaBo's k
TRUTH = torch.tensor([[c in ATTRIBUTES[p] for p in PHRASES] for c in range(10)])  # [10 digits, 14 phrases]


class BagOfWords(nn.Module):
    """The "text encoder": a list of phrases -> the L2-normalised mean of their words' embeddings."""

    def __init__(self) -> None:
        super().__init__()
        self.words = nn.Embedding(len(WORDS), D)

    def bags(self, phrases: list[str]) -> Tensor:
        rows = torch.zeros(len(phrases), len(WORDS))
        for i, phrase in enumerate(phrases):
            for word in re.findall(r"[a-z]+", phrase.lower()):
                if word not in STOP:
                    rows[i, WORDS.index(word)] += 1
        return rows

    def forward(self, phrases: list[str] | Tensor) -> Tensor:
        bags = phrases if isinstance(phrases, Tensor) else self.bags(phrases)
        return F.normalize(bags @ self.words.weight / bags.sum(1, keepdim=True).clamp_min(1), dim=1)


def pretrain(x: Tensor, y: Tensor, epochs: int, seed: int) -> tuple[nn.Module, BagOfWords]:
    """Train the encoder pair with the symmetric multi-positive InfoNCE described above."""
    torch.manual_seed(seed)
    image_encoder = nn.Sequential(CNN2D(num_classes=D, width=16), nn.Flatten())
    text_encoder = BagOfWords()
    name_bags, phrase_bags = text_encoder.bags(NAMES), text_encoder.bags(PHRASES)
    params = [*image_encoder.parameters(), *text_encoder.parameters()]
    optimizer = torch.optim.Adam(params, lr=1e-2)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for rows in torch.randperm(len(x), generator=g).split(128):
            xb, yb = x[rows], y[rows]
            # captions: the name with probability 1/2, each true phrase with probability 1/2, never empty
            use_name = torch.rand(len(rows), generator=g) < 0.5
            use_phrase = (torch.rand(len(rows), len(PHRASES), generator=g) < 0.5) & TRUTH[yb]
            use_name |= ~use_phrase.any(1)
            bags = use_name[:, None] * name_bags[yb] + use_phrase.float() @ phrase_bags
            # caption i is true of image j when image j's digit has its name (if any) and all its phrases
            name_ok = ~use_name[:, None] | (yb[:, None] == yb[None, :])
            phrases_ok = (use_phrase.float() @ TRUTH[yb].float().T) == use_phrase.sum(1, keepdim=True)
            positive = (name_ok & phrases_ok).float()  # [captions, images]
            logits = text_encoder(bags) @ F.normalize(image_encoder(xb), dim=1).T / TEMPERATURE
            loss = -(positive / positive.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
            loss = loss - (positive.T / positive.sum(0)[:, None] * logits.T.log_softmax(1)).sum(1).mean()
            optimizer.zero_grad()
            (loss / 2).backward()
            optimizer.step()
    return nn.Sequential(image_encoder, Normalize()).eval(), text_encoder.eval()


class Normalize(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x, dim=1)


def candidates(seed: int) -> tuple[list[str], Tensor]:
    """6 phrases "written for" each digit: its true phrases, then other digits' phrases and distractors."""
    rng = random.Random(seed)
    phrases, classes = [], []
    for c in range(10):
        own = [p for p in PHRASES if c in ATTRIBUTES[p]]
        others = rng.sample([p for p in PHRASES if c not in ATTRIBUTES[p]], 2)
        phrases += own + others + rng.sample(DISTRACTORS, 6 - len(own) - 2)
        classes += [c] * 6
    return phrases, torch.tensor(classes)


def trainer(epochs: int = 1, steps: int = -1) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs, max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )  # fmt: skip


def accuracy(logits: Tensor, y: Tensor) -> float:
    return (logits.argmax(1) == y).float().mean().item()


def linear_probe(x: Tensor, y: Tensor, x_test: Tensor, y_test: Tensor) -> float:
    probe = LogisticRegression(C=1.0, max_iter=2000).fit(x.numpy(), y.numpy())
    return float((probe.predict(x_test.numpy()) == y_test.numpy()).mean())


def few_shot(y: Tensor, shots: int | None, seed: int) -> Tensor:
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    if shots is None:
        return order
    return torch.cat([order[y[order] == c][:shots] for c in range(10)])


def run(seed: int, quick: bool) -> dict:
    pl.seed_everything(seed, verbose=False)
    dm = DigitsDataModule(as_image=True, val_fraction=0.0, seed=seed)
    dm.setup()
    x, y = dm.train_set.inputs, dm.train_set.targets
    x_test, y_test = dm.test_set.inputs, dm.test_set.targets
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    cut = int(0.6 * len(x))
    pre, pool = order[:cut], order[cut:]
    image_encoder, text_encoder = pretrain(x[pre], y[pre], 2 if quick else 40, seed)
    e_pool, e_test = embed(image_encoder, x[pool]), embed(image_encoder, x_test)
    y_pool = y[pool]
    prompts = embed(text_encoder, [f"the digit {n}" for n in NAMES])
    result: dict = {"seed": seed, "zero_shot_clean": accuracy(e_test @ prompts.T, y_test)}

    # TFUP on each shifted target, its cache from that target's unlabelled images
    for name, severity in SHIFTS:
        x_shift = corrupt(x_test, name, severity, generator=torch.Generator().manual_seed(seed)).clamp(0, 1)
        result[f"zero_shot/{name}"] = accuracy(embed(image_encoder, x_shift) @ prompts.T, y_test)
        tfup = TFUP(image_encoder, text_embeddings=prompts)
        loader = torch.utils.data.DataLoader(ArrayDataset(x_shift, y_test), batch_size=128)
        result[f"tfup/{name}"] = trainer().test(tfup, loader, verbose=False)[0]["test/acc"]

    # LaBo vs random selection vs linear probe
    phrases, phrase_classes = candidates(seed)
    one = torch.ones(1)
    t_cand = torch.cat([embed(text_encoder, phrases), one.expand(len(phrases), 1)], 1)
    p_pool, p_test = (torch.cat([e, one.expand(len(e), 1)], 1) for e in (e_pool, e_test))
    g = torch.Generator().manual_seed(seed)
    for shots, k in itertools.product(SHOTS, CONCEPTS_PER_CLASS):
        rows = few_shot(y_pool, shots, seed)
        key = f"{shots or 'all'}-shot/k{k}"
        random_pick = torch.cat([c * 6 + torch.randperm(6, generator=g)[:k] for c in range(10)])
        models = {
            "labo": LaBo.from_candidates(p_pool[rows], y_pool[rows], t_cand, phrase_classes, 10, k=k, lr=1e-2),
            "random": LaBo(t_cand[random_pick], phrase_classes[random_pick], 10, lr=1e-2),
        }
        for name, model in models.items():
            result[f"{name}_prior/{key}"] = accuracy(model(p_test).detach(), y_test)
            data = torch.utils.data.DataLoader(ArrayDataset(p_pool[rows], y_pool[rows]), batch_size=len(rows))
            trainer(steps=5 if quick else 100, epochs=-1).fit(model, data)
            result[f"{name}/{key}"] = accuracy(model(p_test).detach(), y_test)
        for name, picked in (("labo", models["labo"].selected.tolist()), ("random", random_pick.tolist())):
            true = [phrase_classes[i].item() in ATTRIBUTES.get(phrases[i], []) for i in picked]
            result[f"{name}_true_fraction/{key}"] = sum(true) / len(true)
            result[f"{name}_distinct/{key}"] = len({phrases[i] for i in picked})
    for shots in SHOTS:
        rows = few_shot(y_pool, shots, seed)
        key = f"{shots or 'all'}-shot"
        result[f"linear_probe/{key}"] = linear_probe(e_pool[rows], y_pool[rows], e_test, y_test)

    # DN-CBM: SAE on unlabelled embeddings, names, probe
    epochs = 2 if quick else 60
    e_all = torch.cat([embed(image_encoder, x[pre]), e_pool])
    sae = DNCBMAutoencoder(D, expansion_factor=8, l1_coeff=1e-3, lr=1e-3, resample_every=10)
    features = torch.utils.data.DataLoader(ArrayDataset(e_all, torch.zeros(len(e_all), dtype=torch.long)), 64,
                                           shuffle=True)  # fmt: skip
    trainer(epochs).fit(sae, features)
    vocabulary = PHRASES + NAMES + DISTRACTORS
    model = DNCBM.from_autoencoder(sae, embed(text_encoder, vocabulary), 10, vocabulary=vocabulary, lr=1e-2)
    pool_loader = torch.utils.data.DataLoader(ArrayDataset(e_pool, y_pool), batch_size=64, shuffle=True)
    trainer(epochs).fit(model, pool_loader)
    with torch.no_grad():
        acts = model.concepts(e_test)
        result["dn_cbm_probe"] = accuracy(model(e_test), y_test)
    result["dn_cbm_linear_probe"] = linear_probe(e_pool, y_pool, e_test, y_test)
    class_means = torch.stack([acts[y_test == c].mean(0) for c in range(10)])  # [10, M]
    alive = acts.amax(0) > 0
    top = class_means.argmax(0)
    truth = torch.cat([TRUTH, torch.eye(10, dtype=torch.bool), torch.zeros(10, len(DISTRACTORS), dtype=torch.bool)], 1)
    named_true = truth[top, model.concept_index]
    result["dn_cbm_alive"] = int(alive.sum())
    result["dn_cbm_l0"] = (acts > 0).float().sum(1).mean().item()
    result["dn_cbm_name_true"] = named_true[alive].float().mean().item()
    result["dn_cbm_name_chance"] = truth[top[alive]].float().mean().item()
    result["dn_cbm_name_distractor"] = (model.concept_index[alive] >= len(PHRASES) + 10).float().mean().item()
    result["dn_cbm_names"] = sorted({model.concept_names[i] for i in alive.nonzero().flatten().tolist()})
    return result


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    seeds = range(1 if args.quick else args.seeds)
    runs = [run(seed, args.quick) for seed in seeds]
    print(machine_line())
    print(f"Seeds: {len(seeds)}{' (quick mode: not a measurement)' if args.quick else ''}\n")

    def cell(key: str) -> str:
        return mean_std([r[key] for r in runs], 100)

    print(f"TFUP on the digits test split (zero-shot on the clean split: {cell('zero_shot_clean')}%; accuracy, %)\n")
    print("| target | zero-shot | TFUP | TFUP - zero-shot (paired by seed) |\n|---|---|---|---|")
    for name, severity in SHIFTS:
        gain = mean_std([r[f"tfup/{name}"] - r[f"zero_shot/{name}"] for r in runs], 100)
        print(f"| {name} {severity} | {cell(f'zero_shot/{name}')} | {cell(f'tfup/{name}')} | {gain} |")
    print()
    print("LaBo (k of 6 candidates per class) vs random selection vs linear probe (test accuracy, %)\n")
    print("| shots per class | k | LaBo prior | LaBo trained | random prior | random trained | linear probe | "
          "true phrases picked: LaBo / random | distinct phrases: LaBo / random |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for shots, k in itertools.product(SHOTS, CONCEPTS_PER_CLASS):
        key = f"{shots or 'all'}-shot/k{k}"
        cells = [f"{name}/{key}" for name in ("labo_prior", "labo", "random_prior", "random")]
        probe = cell(f"linear_probe/{shots or 'all'}-shot")
        picked = f"{cell(f'labo_true_fraction/{key}')} / {cell(f'random_true_fraction/{key}')}"
        distinct = " / ".join(
            mean_std([float(r[f"{n}_distinct/{key}"]) for r in runs], 1, 0) for n in ("labo", "random")
        )
        print(f"| {shots or 'all'} | {k} | {' | '.join(cell(c) for c in cells)} | {probe} | {picked} | {distinct} |")
    print("\nDN-CBM (SAE M = 256 on the image embeddings; probes on the whole pool)\n")
    print("| DN-CBM probe (%) | linear probe (%) | neurons firing | active per image | name true (%) | chance (%) "
          "| named by a distractor (%) |\n|---|---|---|---|---|---|---|")  # fmt: skip
    alive = mean_std([float(r["dn_cbm_alive"]) for r in runs], 1, 0)
    print(
        f"| {cell('dn_cbm_probe')} | {cell('dn_cbm_linear_probe')} | {alive} | "
        f"{mean_std([r['dn_cbm_l0'] for r in runs])} | {cell('dn_cbm_name_true')} | {cell('dn_cbm_name_chance')} | "
        f"{cell('dn_cbm_name_distractor')} |"
    )
    path = write_json(args.out, "vl_encoder_pair" + ("_quick" if args.quick else ""), {"runs": runs})
    print(f"\nRaw numbers: {path}")


if __name__ == "__main__":
    main()
