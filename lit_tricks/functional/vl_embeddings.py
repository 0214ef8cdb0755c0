r"""Image and text embeddings in one vision-language space, as the language-named concept bottlenecks use them
(LaBo, DN-CBM, KnoBo): the shape check every one of them makes, and one way to run a user's encoder.

Nothing here downloads weights. An encoder is any ``nn.Module`` or callable that maps a batch (a tensor of
images, or a list of strings for a text encoder) to ``[N, D]`` embeddings, e.g. ``open_clip``'s
``model.encode_image`` / ``lambda s: model.encode_text(tokenizer(s))``, a Hugging Face ``CLIPModel``'s
``get_image_features`` / ``get_text_features``, or a small network trained here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from lit_tricks.core.eval_mode import eval_mode

Encoder = Callable[[Any], Tensor]


def check_embedding_pair(
    image_embeddings: Tensor,
    text_embeddings: Tensor,
    image_name: str = "image_embeddings",
    text_name: str = "concept_embeddings",
    what: str = "candidate concepts",
    fix: str = "pass a non-empty candidate list",
) -> None:
    """Raise a ``ValueError`` unless ``text_embeddings`` is ``[M, D]`` with ``M >= 1`` and ``image_embeddings`` is
    ``[*, D]`` with the same ``D`` (one vision-language space); the messages name both arguments."""
    if text_embeddings.ndim != 2 or not len(text_embeddings):
        raise ValueError(
            f"{text_name} must be [M, D] with M >= 1 {what}, got shape {tuple(text_embeddings.shape)}: {fix}."
        )
    if image_embeddings.ndim != 2 or image_embeddings.shape[1] != text_embeddings.shape[1]:
        raise ValueError(
            f"{image_name} {tuple(image_embeddings.shape)} do not match {text_name} "
            f"{tuple(text_embeddings.shape)}: both must be [*, D] with the same D (one vision-language space)."
        )


def embed(encoder: Encoder, inputs: Tensor | Sequence[Any], batch_size: int = 256) -> Tensor:
    """Run a frozen ``encoder`` over ``inputs`` (a tensor, batched along dim 0, or a sequence such as a list of
    strings, batched as lists) without gradients (an ``nn.Module`` in eval mode, restored after; tensor batches
    moved to its parameters' device) and return the float ``[N, D]`` embeddings on the CPU.

    Example::

        >>> embed(torch.nn.Linear(3, 2, bias=False).requires_grad_(False).eval(), torch.zeros(5, 3)).shape
        torch.Size([5, 2])
        >>> embed(lambda words: torch.tensor([[float(len(w))] for w in words]), ["a", "bcd"]).tolist()
        [[1.0], [3.0]]
    """
    if not callable(encoder):
        raise TypeError(f"encoder must be an nn.Module or a callable returning [N, D] embeddings, got {encoder!r}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if not len(inputs):
        raise ValueError("inputs must not be empty: pass at least one image or one text.")
    chunks = []
    first = next(encoder.parameters(), None) if isinstance(encoder, nn.Module) else None
    device = first.device if first is not None else (inputs.device if isinstance(inputs, Tensor) else None)
    with torch.no_grad(), eval_mode(encoder) if isinstance(encoder, nn.Module) else nullcontext():
        for start in range(0, len(inputs), batch_size):
            part = inputs[start : start + batch_size]
            out = encoder(part.to(device) if isinstance(inputs, Tensor) else list(part))
            if not isinstance(out, Tensor) or out.ndim != 2 or len(out) != len(part):
                shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                raise ValueError(f"encoder must return [N, D] embeddings for N = {len(part)} inputs, got {shape}.")
            chunks.append(out.detach().float().cpu())
    return torch.cat(chunks)
