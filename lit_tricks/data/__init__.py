"""Offline, seeded LightningDataModules and dataset wrappers (each imported on first use)."""

from lit_tricks import lazy_exports

_EXPORTS = {
    "lit_tricks.data.array_datamodule": ("ArrayDataModule",),
    "lit_tricks.data.balanced_sampler": ("ClassBalancedSampler", "class_balanced_indices"),
    "lit_tricks.data.concepts": (
        "ConceptToyDataModule",
        "DigitsConceptDataModule",
        "ShapesDataModule",
        "concept_toy",
        "render_shape_masks",
        "render_shape_scenes",
        "render_shapes",
    ),
    "lit_tricks.data.constrained_cbm": ("ConceptDecorrelationSampler", "ShapeScenesDataModule"),
    "lit_tricks.data.confounded_digits": ("ConfoundedDigits", "confounded_digits"),
    "lit_tricks.data.continual": ("ContinualDataModule", "split_classes", "task_stream"),
    "lit_tricks.data.corruption_stream": ("CorruptionStreamDataModule",),
    "lit_tricks.data.corruptions": ("CORRUPTIONS", "corrupt", "corrupt_signals"),
    "lit_tricks.data.digits": ("DigitsDataModule",),
    "lit_tricks.data.hard_batches": ("HardBatchSampler",),
    "lit_tricks.data.indexed": ("ArrayDataset", "IndexedDataset", "dataset_tensors"),
    "lit_tricks.data.label_noise": ("LabelNoise", "flip_labels"),
    "lit_tricks.data.loader": ("ResumableDataLoader",),
    "lit_tricks.data.long_tail": ("long_tail_counts", "long_tail_indices"),
    "lit_tricks.data.few_shot": ("FewShotDataModule", "few_shot_indices"),
    "lit_tricks.data.modular": ("ModularArithmeticDataModule", "modular_table"),
    "lit_tricks.data.mnist1d": ("MNIST1DDataModule", "generate_mnist1d"),
    "lit_tricks.data.open_set": ("NoiseDataset", "OpenSetDigitsDataModule"),
    "lit_tricks.data.rs2": ("RS2Sampler", "rs2_indices"),
    "lit_tricks.data.si_blurry": ("SiBlurrySplit", "si_blurry_classes", "si_blurry_split"),
    "lit_tricks.data.smote": ("smote_features",),
    "lit_tricks.data.sampler": ("EpochRandomSampler",),
    "lit_tricks.data.toy2d": ("Toy2DDataModule", "toy_2d"),
    "lit_tricks.data.unseen_classes": ("UnseenClassesDataModule",),
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(name for names in _EXPORTS.values() for name in names)
