"""Offline data sets with concept annotations: the XOR, TRIG and DOT toys, digits with class-level concepts, and
rendered shapes with instance-level concepts. Batches are dicts ``{"inputs", "concepts", "targets", "index"}``."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch import Tensor

from lit_tricks.data.array_datamodule import ArrayDataModule
from lit_tricks.data.indexed import ArrayDataset

Toy = Literal["xor", "trig", "dot"]


def concept_toy(name: Toy, n: int, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    r"""``(x, c, y)`` of a concept toy set (Espinosa Zarlenga et al., "Concept Embedding Models", 2022):

    - XOR: :math:`x \sim U(0,1)^2`, :math:`c = [x_1 > .5, x_2 > .5]`, :math:`y = c_1 \oplus c_2` (complete concepts);
    - TRIG: :math:`a, b, z \sim \mathcal N(0, 2^2)`, :math:`x = [\sin a + a, \cos a + a, \sin b + b, \cos b + b,
      \sin z + z, \cos z + z, a^2 + b^2 + z^2]`, :math:`c = [a > 0, b > 0, z > 0]`, :math:`y = a + b + z > 1`
      (incomplete: the best function of the true concepts reaches ~81%);
    - DOT: :math:`v_1, v_3 \sim \mathcal N(0, 2^2 I_2)`, :math:`v_2 = [1, 1]`, :math:`v_4 = [-1, -1]`,
      :math:`x = [v_1 + v_3, v_1 - v_3]`, :math:`c = [v_1 \cdot v_2 > 0, v_3 \cdot v_4 > 0]`,
      :math:`y = v_1 \cdot v_3 > 0` (incomplete, ~75%).

    One numpy generator per call (a public implementation re-seeds between draws so that DOT's ``v3 = v1``).
    """
    rng = np.random.default_rng(seed)
    if name == "xor":
        x = rng.random((n, 2))
        c = x > 0.5
        y = c[:, 0] ^ c[:, 1]
    elif name == "trig":
        a, b, z = (rng.normal(0, 2, n) for _ in range(3))
        x = np.stack([np.sin(a) + a, np.cos(a) + a, np.sin(b) + b, np.cos(b) + b, np.sin(z) + z, np.cos(z) + z,
                      a**2 + b**2 + z**2], axis=1)  # fmt: skip
        c = np.stack([a > 0, b > 0, z > 0], axis=1)
        y = (a + b + z) > 1
    elif name == "dot":
        v1, v3 = rng.normal(0, 2, (n, 2)), rng.normal(0, 2, (n, 2))
        x = np.concatenate([v1 + v3, v1 - v3], axis=1)
        c = np.stack([v1.sum(axis=1) > 0, -v3.sum(axis=1) > 0], axis=1)
        y = (v1 * v3).sum(axis=1) > 0
    else:
        raise ValueError(f"name must be 'xor', 'trig' or 'dot', got {name!r}.")
    return torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(c, dtype=torch.float32), torch.as_tensor(y).long()


class _ConceptArrays(ArrayDataModule):
    """An ArrayDataModule whose data sets also carry ``concepts`` (the training split's label noise, if any,
    applies to the task labels only)."""

    concept_names: list[str]
    _extra_arrays: dict[str, tuple[Tensor, Tensor]] = {}  # more per-sample arrays (train + val, test) to split

    def load_concept_arrays(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        raise NotImplementedError

    def load_arrays(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        x, c, y, x_test, c_test, y_test = self.load_concept_arrays()
        self._concepts = (c, c_test)
        return x, y, x_test, y_test

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if self.prune_scores is not None:
            raise ValueError(f"{type(self).__name__} does not support prune_scores (its concepts would not follow).")
        super().setup(stage)
        # re-split the concepts (and any other per-sample arrays) exactly as the inputs were split
        order = torch.randperm(len(self._concepts[0]), generator=torch.Generator().manual_seed(self.seed))
        n_val = round(self.val_fraction * len(order))
        val_idx, train_idx = order[:n_val], order[n_val:]
        for name, (values, test_values) in {"concepts": self._concepts, **self._extra_arrays}.items():
            self.train_set.extras[name] = values[train_idx]
            if self.val_set is not None:
                self.val_set.extras[name] = values[val_idx]
            self.test_set.extras[name] = test_values

    @property
    def n_concepts(self) -> int:
        return len(self.concept_names)


class ConceptToyDataModule(_ConceptArrays):
    """XOR, TRIG or DOT (:func:`concept_toy`), inputs standardised with the training statistics.

    Args:
        name: ``"xor"``, ``"trig"`` or ``"dot"``.
        num_samples: training + validation samples (test: ``num_samples // 4`` more, drawn independently).
        generator_seed: seed of the data.
        **kwargs: :class:`~lit_tricks.data.ArrayDataModule` arguments (batch size, split seed, ...).
    """

    num_classes = 2

    def __init__(self, name: Toy = "xor", num_samples: int = 3000, generator_seed: int = 42, **kwargs) -> None:
        super().__init__(**kwargs)
        concept_toy(name, 1)  # an unknown name fails here
        self.name, self.num_samples, self.generator_seed = name, num_samples, generator_seed
        self.concept_names = {"xor": ["x1>0.5", "x2>0.5"], "trig": ["a>0", "b>0", "z>0"],
                              "dot": ["v1.v2>0", "v3.v4>0"]}[name]  # fmt: skip

    def load_concept_arrays(self):
        x, c, y = concept_toy(self.name, self.num_samples + self.num_samples // 4, self.generator_seed)
        mean, std = x[: self.num_samples].mean(dim=0), x[: self.num_samples].std(dim=0)
        x = (x - mean) / std
        n = self.num_samples
        return x[:n], c[:n], y[:n], x[n:], c[n:], y[n:]


#: Class-level concepts of the ten digits (what each numeral has when written).
DIGIT_CONCEPTS = {
    "even": [1, 0, 1, 0, 1, 0, 1, 0, 1, 0],
    "greater_than_4": [0, 0, 0, 0, 0, 1, 1, 1, 1, 1],
    "prime": [0, 0, 1, 1, 0, 1, 0, 1, 0, 0],
    "closed_loop": [1, 0, 0, 0, 1, 0, 1, 0, 1, 1],
    "vertical_stroke": [0, 1, 0, 0, 1, 0, 0, 1, 0, 1],
    "curved_top": [1, 0, 1, 1, 0, 0, 1, 0, 1, 1],
    "two_loops": [0, 0, 0, 0, 0, 0, 0, 0, 1, 0],
}


class DigitsConceptDataModule(_ConceptArrays):
    """scikit-learn's 8x8 digits with the class-level concepts of :data:`DIGIT_CONCEPTS` (every image gets its
    class's vector, as CUB's concepts are made class-level). The seven concepts identify the class, so the set is
    complete. Arguments as :class:`~lit_tricks.data.DigitsDataModule`."""

    num_classes = 10
    concept_names = list(DIGIT_CONCEPTS)

    def __init__(self, test_fraction: float = 0.2, as_image: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        from lit_tricks.data.digits import DigitsDataModule

        self._digits = DigitsDataModule(test_fraction=test_fraction, as_image=as_image)

    def load_concept_arrays(self):
        x, y, x_test, y_test = self._digits.load_arrays()
        table = torch.tensor(list(DIGIT_CONCEPTS.values()), dtype=torch.float32).T  # [10, k]
        return x, table[y], y, x_test, table[y_test], y_test


SHAPES, COLOURS = ("square", "circle", "triangle"), ("red", "green", "blue")


def render_shapes(n: int, size: int = 16, cooccurrence: float = 0.0, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """``(images [n, 3, size, size], concepts [n, 12], targets [n])``: one shape per image, drawn with numpy.

    Concepts (instance-level, in 4 groups): shape (square, circle, triangle), colour (red, green, blue), size
    (small, large), quadrant (4). Target: shape x colour (9 classes; complete concepts). ``cooccurrence`` is the
    probability that a circle is forced red (a spurious correlation between concept groups). Where each shape is:
    :func:`render_shape_masks`.
    """
    images, concepts, targets, _ = _draw_shapes(n, size, cooccurrence, seed)
    return images, concepts, targets


def render_shape_masks(n: int, size: int = 16, cooccurrence: float = 0.0, seed: int = 0) -> Tensor:
    """``[n, size, size]`` boolean masks of the pixels each image of :func:`render_shapes` (same arguments) paints:
    the ground-truth region of all of that image's present concepts (shape, colour, size and quadrant are all
    properties of the one shape)."""
    return _draw_shapes(n, size, cooccurrence, seed)[3]


def _draw_shapes(n: int, size: int, cooccurrence: float, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    rng = np.random.default_rng(seed)
    shape = rng.integers(0, 3, n)
    colour = rng.integers(0, 3, n)
    colour = np.where((shape == 1) & (rng.random(n) < cooccurrence), 0, colour)
    large = rng.random(n) < 0.5
    quadrant = rng.integers(0, 4, n)
    images = np.zeros((n, 3, size, size), dtype=np.float32)
    masks = np.zeros((n, size, size), dtype=bool)
    yy, xx = np.mgrid[0:size, 0:size]
    half = size // 2
    for i in range(n):  # data generation, once
        radius = (0.42 if large[i] else 0.24) * half
        cy = (quadrant[i] // 2) * half + half / 2 + rng.uniform(-1, 1)
        cx = (quadrant[i] % 2) * half + half / 2 + rng.uniform(-1, 1)
        dy, dx = yy - cy, xx - cx
        if shape[i] == 0:
            mask = (np.abs(dy) <= radius) & (np.abs(dx) <= radius)
        elif shape[i] == 1:
            mask = dy**2 + dx**2 <= radius**2
        else:
            mask = (dy <= radius) & (dy >= -radius) & (np.abs(dx) <= (dy + radius) / 2)
        images[i, colour[i]][mask] = 1.0
        masks[i] = mask
    images += 0.05 * rng.standard_normal(images.shape).astype(np.float32)
    concepts = np.concatenate(
        [np.eye(3)[shape], np.eye(3)[colour], np.stack([~large, large], axis=1), np.eye(4)[quadrant]], axis=1
    )
    targets = torch.as_tensor(shape * 3 + colour)
    return torch.as_tensor(images), torch.as_tensor(concepts, dtype=torch.float32), targets, torch.as_tensor(masks)


class ShapesDataModule(_ConceptArrays):
    """Rendered shapes (:func:`render_shapes`) with 12 instance-level concepts in 4 groups
    (:attr:`concept_groups`) and 9 classes (shape x colour).

    Args:
        num_samples: training + validation images (test: ``num_samples // 4`` more).
        size: image side in pixels.
        cooccurrence: probability that a circle is forced red in the training split (the test split has none).
        generator_seed: seed of the rendering.
        with_masks: batches also carry ``"masks"`` ``[N, size, size]`` (:func:`render_shape_masks`), where each
            image's shape is, for the concept location metric (:class:`~lit_tricks.callbacks.concept_metrics.
            ConceptMetrics`).
        **kwargs: :class:`~lit_tricks.data.ArrayDataModule` arguments.
    """

    num_classes = 9
    concept_names = [*SHAPES, *COLOURS, "small", "large", "top_left", "top_right", "bottom_left", "bottom_right"]
    concept_groups = [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9, 10, 11]]

    def __init__(
        self,
        num_samples: int = 3000,
        size: int = 16,
        cooccurrence: float = 0.0,
        generator_seed: int = 42,
        with_masks: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if not 0.0 <= cooccurrence <= 1.0:
            raise ValueError(f"cooccurrence must be in [0, 1], got {cooccurrence}.")
        if not isinstance(with_masks, bool):
            raise TypeError(f"with_masks must be True or False, got {with_masks!r}.")
        self.num_samples, self.size, self.cooccurrence = num_samples, size, cooccurrence
        self.generator_seed, self.with_masks = generator_seed, with_masks

    def load_concept_arrays(self):
        train = (self.num_samples, self.size, self.cooccurrence, self.generator_seed)
        test = (self.num_samples // 4, self.size, 0.0, self.generator_seed + 1)
        x, c, y, masks = _draw_shapes(*train)
        x_test, c_test, y_test, masks_test = _draw_shapes(*test)
        self._extra_arrays = {"masks": (masks, masks_test)} if self.with_masks else {}
        return x, c, y, x_test, c_test, y_test


def concept_tensors(data: ArrayDataset) -> tuple[Tensor, Tensor, Tensor]:
    """``(inputs, concepts, targets)`` of a concept data set."""
    return data.inputs, data.extras["concepts"], data.targets


#: Concepts of :func:`render_shape_scenes`: which shapes and which colours are in the image.
SCENE_CONCEPTS = [*SHAPES, *COLOURS]


def render_shape_scenes(
    n: int, size: int = 16, cooccurrence: float = 0.0, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(images [n, 3, size, size], concepts [n, 6], targets [n], masks [n, 6, size, size])``: two shapes per
    image, each in its own quadrant, so that concepts have separate ground-truth regions (one shape per image, as
    in :func:`render_shapes`, puts its shape and colour on the same pixels).

    Concepts (instance-level, multi-hot): square, circle, triangle, red, green, blue present. ``masks[i, j]`` is
    the pixels of the objects that carry concept ``j`` (empty where it is absent). Target: which shapes are
    present, ``square + 2 circle + 4 triangle`` (8 classes, 0 never occurs; complete concepts).
    ``cooccurrence`` is the probability that an image with a circle but no square (or a square but no circle)
    has one of its objects turned into the missing partner: at 1 circle and square always co-occur, as the
    playing cards of a poker hand do in Furby et al. (2024).
    """
    if not 0.0 <= cooccurrence <= 1.0:
        raise ValueError(f"cooccurrence must be in [0, 1], got {cooccurrence}.")
    rng = np.random.default_rng(seed)
    shape = rng.integers(0, 3, (n, 2))
    colour = rng.integers(0, 3, (n, 2))
    quadrants = np.argsort(rng.random((n, 4)), axis=1)[:, :2]
    square, circle = (shape == 0).any(axis=1), (shape == 1).any(axis=1)
    pair = (square ^ circle) & (rng.random(n) < cooccurrence)
    # the object to change: a triangle if there is one, else the second (two squares or two circles)
    which = np.where(shape[:, 1] == 2, 1, np.where(shape[:, 0] == 2, 0, 1))
    rows = np.nonzero(pair)[0]
    shape[rows, which[rows]] = np.where(square[rows], 1, 0)
    images = np.zeros((n, 3, size, size), dtype=np.float32)
    masks = np.zeros((n, 6, size, size), dtype=bool)
    yy, xx = np.mgrid[0:size, 0:size]
    half = size // 2
    radius = 0.38 * half
    for i in range(n):  # data generation, once
        for o in range(2):
            q = quadrants[i, o]
            dy = yy - ((q // 2) * half + half / 2 + rng.uniform(-0.5, 0.5))
            dx = xx - ((q % 2) * half + half / 2 + rng.uniform(-0.5, 0.5))
            if shape[i, o] == 0:
                mask = (np.abs(dy) <= radius) & (np.abs(dx) <= radius)
            elif shape[i, o] == 1:
                mask = dy**2 + dx**2 <= radius**2
            else:
                mask = (dy <= radius) & (dy >= -radius) & (np.abs(dx) <= (dy + radius) / 2)
            images[i, colour[i, o]][mask] = 1.0
            masks[i, shape[i, o]] |= mask
            masks[i, 3 + colour[i, o]] |= mask
    images += 0.05 * rng.standard_normal(images.shape).astype(np.float32)
    concepts = masks.any(axis=(2, 3))
    targets = concepts[:, 0] * 1 + concepts[:, 1] * 2 + concepts[:, 2] * 4
    return (torch.as_tensor(images), torch.as_tensor(concepts, dtype=torch.float32),
            torch.as_tensor(targets).long(), torch.as_tensor(masks))  # fmt: skip
