"""The data side of constrained concept bottlenecks (Furby et al., 2024): a sampler that draws concept
combinations as if the concepts were independent, and two-shape scenes with per-concept masks to check where
a CBM looks."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Sampler

from lit_tricks.data.concepts import SCENE_CONCEPTS, _ConceptArrays, render_shape_scenes
from lit_tricks.data.loader import ResumableDataLoader
from lit_tricks.functional.constrained_cbm import independence_weights


class ConceptDecorrelationSampler(Sampler[int]):
    """Draw an epoch of ``len(concepts)`` indices with replacement, each with its
    :func:`~lit_tricks.functional.constrained_cbm.independence_weights` weight, so co-occurring concepts are
    separated by up-weighting the samples where they do not co-occur.

    The draws are a function of ``(seed, epoch)`` only (Lightning calls :meth:`set_epoch`), so resumed runs see
    the same batches; under DDP Lightning's ``DistributedSamplerWrapper`` gives each rank a shard of the epoch.

    Args:
        concepts: the training split's 0/1 concepts ``[N, k]``.
        seed: seed of the draws.

    Example::

        >>> sampler = ConceptDecorrelationSampler(torch.tensor([[1, 1], [1, 1], [1, 1], [1, 0], [0, 1], [0, 0]]))
        >>> len(list(sampler))
        6
    """

    def __init__(self, concepts: Tensor, seed: int = 0) -> None:
        self.weights = independence_weights(torch.as_tensor(concepts))
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.weights)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        yield from torch.multinomial(self.weights, len(self.weights), replacement=True, generator=generator).tolist()


class ShapeScenesDataModule(_ConceptArrays):
    """Two-shape scenes (:func:`~lit_tricks.data.concepts.render_shape_scenes`): 6 instance-level concepts
    (shapes and colours present), 8 classes (which shapes are present), and the test split's per-concept masks
    in :attr:`test_masks` ``[N, 6, H, W]``.

    Args:
        num_samples: training + validation images (test: ``num_samples // 4`` more, without co-occurrence).
        size: image side in pixels.
        cooccurrence: probability that a lone circle or square gets its partner, in the training split.
        decorrelate: draw training batches with :class:`ConceptDecorrelationSampler` (the constraint).
        generator_seed: seed of the rendering.
        **kwargs: :class:`~lit_tricks.data.ArrayDataModule` arguments (no other sampler option with ``decorrelate``).
    """

    num_classes = 8
    concept_names = SCENE_CONCEPTS

    def __init__(
        self,
        num_samples: int = 3000,
        size: int = 16,
        cooccurrence: float = 0.0,
        decorrelate: bool = False,
        generator_seed: int = 42,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if not 0.0 <= cooccurrence <= 1.0:
            raise ValueError(f"cooccurrence must be in [0, 1], got {cooccurrence}.")
        if not isinstance(decorrelate, bool):
            raise TypeError(f"decorrelate must be True or False, got {decorrelate!r}.")
        if decorrelate and (self.balance is not None or self.rs2_fraction is not None or self.hard_batches):
            raise ValueError("decorrelate chooses the training sampler: set none of balance, rs2_fraction, "
                             "hard_batches with it.")  # fmt: skip
        self.num_samples, self.size, self.cooccurrence = num_samples, size, cooccurrence
        self.decorrelate, self.generator_seed = decorrelate, generator_seed
        self.test_masks: Tensor | None = None

    def load_concept_arrays(self):
        x, c, y, _ = render_shape_scenes(self.num_samples, self.size, self.cooccurrence, self.generator_seed)
        x_test, c_test, y_test, self.test_masks = render_shape_scenes(
            self.num_samples // 4, self.size, 0.0, self.generator_seed + 1
        )
        return x, c, y, x_test, c_test, y_test

    def train_dataloader(self) -> DataLoader:
        if not self.decorrelate:
            return super().train_dataloader()
        sampler = ConceptDecorrelationSampler(self.train_set.extras["concepts"], seed=self.seed)
        return self._loader(self.train_set, self.batch_size, sampler=sampler, loader=ResumableDataLoader)
