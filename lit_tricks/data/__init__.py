"""Offline, seeded LightningDataModules and dataset wrappers."""

from lit_tricks.data.array_datamodule import ArrayDataModule
from lit_tricks.data.concepts import (
    ConceptToyDataModule,
    DigitsConceptDataModule,
    ShapesDataModule,
    concept_toy,
    render_shapes,
)
from lit_tricks.data.continual import ContinualDataModule, split_classes, task_stream
from lit_tricks.data.corruption_stream import CorruptionStreamDataModule
from lit_tricks.data.corruptions import CORRUPTIONS, corrupt, corrupt_signals
from lit_tricks.data.digits import DigitsDataModule
from lit_tricks.data.indexed import ArrayDataset, IndexedDataset, dataset_tensors
from lit_tricks.data.label_noise import LabelNoise, flip_labels
from lit_tricks.data.mnist1d import MNIST1DDataModule, generate_mnist1d
from lit_tricks.data.rs2 import RS2Sampler, rs2_indices
from lit_tricks.data.sampler import EpochRandomSampler
from lit_tricks.data.toy2d import Toy2DDataModule, toy_2d

__all__ = [
    "ArrayDataModule",
    "ArrayDataset",
    "ConceptToyDataModule",
    "CORRUPTIONS",
    "ContinualDataModule",
    "CorruptionStreamDataModule",
    "DigitsConceptDataModule",
    "DigitsDataModule",
    "EpochRandomSampler",
    "IndexedDataset",
    "LabelNoise",
    "MNIST1DDataModule",
    "RS2Sampler",
    "ShapesDataModule",
    "Toy2DDataModule",
    "flip_labels",
    "generate_mnist1d",
    "concept_toy",
    "dataset_tensors",
    "corrupt",
    "corrupt_signals",
    "render_shapes",
    "rs2_indices",
    "split_classes",
    "task_stream",
    "toy_2d",
]
