"""Test-time adaptation with the plain Python API: a source model meets corrupted digits.

    python examples/tta_digits.py [--source-epochs 15]

Trains a small CNN on the clean 8x8 digits, then streams the test digits under 10 corruptions at severity 5
(continual: one after another, no reset) and compares the source model with BNAdapt, Tent, RMT (with source
class prototypes for its contrastive term) and EcoTTA (after its warm-up). Online error per corruption goes to
TensorBoard under lightning_logs/<method>.
"""

import argparse
import copy

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger

from lit_tricks import RMT, BNAdapt, Classifier, EcoTTA, Tent
from lit_tricks.data import CorruptionStreamDataModule, DigitsDataModule
from lit_tricks.functional import class_prototypes
from lit_tricks.nets import CNN2D


def main(source_epochs: int) -> dict[str, float]:
    pl.seed_everything(0)
    digits = DigitsDataModule(as_image=True, batch_size=64, val_fraction=0.0)
    classifier = Classifier(CNN2D(num_classes=10, width=16), num_classes=10)
    pl.Trainer(max_epochs=source_epochs, logger=False, enable_checkpointing=False).fit(classifier, digits)
    source = classifier.backbone.eval()

    stream = CorruptionStreamDataModule(digits, severity=5, protocol="continual")
    features = source.forward_features(digits.train_set.inputs).detach()
    prototypes = class_prototypes(features, digits.train_set.targets, num_classes=10)
    ecotta = EcoTTA(copy.deepcopy(source), parts=["body.0", "body.1", "body.2", "body.3"], input_shape=[1, 8, 8])
    pl.Trainer(max_epochs=10, logger=False, enable_checkpointing=False).fit(ecotta, digits)  # the warm-up

    methods = {
        "BNAdapt": BNAdapt(copy.deepcopy(source)),
        "Tent": Tent(copy.deepcopy(source), lr=1e-3),
        "RMT": RMT(copy.deepcopy(source), lr=1e-3, prototypes=prototypes),
        "EcoTTA": ecotta,
    }
    results = {"source": pl.Trainer(logger=False).test(classifier, stream, verbose=False)[0]["test/acc"]}
    for name, module in methods.items():
        trainer = pl.Trainer(inference_mode=False, logger=TensorBoardLogger(".", name="lightning_logs", version=name))
        results[name] = trainer.test(module, stream, verbose=False)[0]["test/acc"]
    return {name: round(100 * (1 - acc), 1) for name, acc in results.items()}  # mean online error (%)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source-epochs", type=int, default=15)
    print(main(parser.parse_args().source_epochs))
