"""TFUP: training-free unsupervised prompts, a cache of unlabelled target features beside zero-shot text logits."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lit_tricks.core.checks import check_number
from lit_tricks.functional.tfup import cache_shots, check_embeddings, select_cache, tfup_logits
from lit_tricks.modules.tta.base import TTAModule


def _text_embeddings(
    text_embeddings: Tensor | str | None, text_encoder: nn.Module | None, text_inputs: Any
) -> Tensor:  # fmt: skip
    if (text_embeddings is None) == (text_encoder is None):
        raise ValueError(
            "give the class text embeddings either as text_embeddings ([C, D] tensor or a torch.save'd file) or as "
            "text_encoder plus text_inputs (one input per class), not both and not neither."
        )
    if text_encoder is not None:
        if not isinstance(text_encoder, nn.Module) or text_inputs is None:
            raise TypeError("text_encoder must be an nn.Module called on text_inputs (one row per class).")
        with torch.no_grad():
            return text_encoder.eval()(torch.as_tensor(text_inputs)).detach().float()
    if isinstance(text_embeddings, str):
        text_embeddings = torch.load(text_embeddings, map_location="cpu", weights_only=True)
    if not isinstance(text_embeddings, Tensor):
        text_embeddings = torch.as_tensor(text_embeddings)
    return text_embeddings.detach().float()


class TFUP(TTAModule):
    r"""TFUP ("Training-Free Unsupervised Prompt for Vision-Language Models"; code ``wlb12345/TFUP``), for any
    image encoder and class text embeddings: ``Trainer.fit`` on the unlabelled target set encodes it once (no
    gradients, labels ignored) and builds the feature cache (:func:`~lit_tricks.functional.tfup.select_cache`:
    per class the ``2k`` most confident samples, of which the ``k`` most prototypical); ``Trainer.test`` then
    predicts :math:`\lambda\hat f\hat W^\top + \alpha\exp(-\beta(1 - (\hat f\hat K^\top)\odot\mathrm{sim}))L`
    (:func:`~lit_tricks.functional.tfup.tfup_logits`) and logs the TTA modules' ``test/acc`` and
    ``test/error/<domain>``. Nothing adapts at test time; the cache is a buffer, so it is in the checkpoint.
    Under DDP (test only: DDP cannot wrap a module with nothing to train, so fit on one device) each rank
    encodes its share of the stream and the ranks gather the features, so every rank builds the same cache.
    Without a fit, ``Trainer.test`` first encodes the whole test stream and builds the cache from it
    (``cache_from_test``: the authors' transductive protocol). Defaults from the authors' code: ``alpha`` 0.3,
    ``beta`` 1, logit scale 100, sharpness 10, ``k = clip(int(0.3 N / C), 9, 16)``.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from lit_tricks.modules.tta.tfup import TFUP
        >>> tfup = TFUP(nn.Identity(), text_embeddings=torch.eye(3))
        >>> tfup.build_cache(torch.eye(3).repeat(4, 1))
        >>> tfup(torch.tensor([[0.9, 0.1, 0.0]])).argmax(dim=1)
        tensor([0])

    Args:
        model: the frozen image encoder, inputs -> features ``[N, D]``.
        text_embeddings: class text embeddings ``[C, D]`` (row ``c`` for class ``c``) or the path of a
            ``torch.save``'d tensor; or instead
        text_encoder, text_inputs: a text encoder and its inputs, one per class (e.g. tokenised prompts),
            encoded once at construction.
        shots: cache entries per class (``k``), or ``None`` for the code's rule from the fit set's size.
        alpha: weight of the cache logits (the residual ratio).
        beta: sharpness of the affinity :math:`\exp(-\beta(1 - a))`.
        logit_scale: scale of the zero-shot cosine logits (CLIP's 100).
        sharpness: temperature inverse of the probabilities used to select and compare (the code's 10).
        cache_proportion: the fraction of the fit set per class that ``shots=None`` aims at, clipped to 9-16.
        cache_from_test: when testing (or predicting) with an empty cache, first encode the whole test stream
            and build the cache from it: the authors' transductive protocol, whose cache comes from the same
            unlabelled test images (``False``: an empty cache is an error).
        domain_names, source_checkpoint: as :class:`TTAModule`.
    """

    needs_grad = False
    needs_fit_checkpoint = False  # the CLI may test without a fit: the cache then comes from the test stream

    def __init__(
        self, model: nn.Module, text_embeddings: Tensor | str | None = None, text_encoder: nn.Module | None = None,
        text_inputs: Any = None, shots: int | None = None, alpha: float = 0.3, beta: float = 1.0,
        logit_scale: float = 100.0, sharpness: float = 10.0, cache_proportion: float = 0.3,
        cache_from_test: bool = True, domain_names: Sequence[str] | None = None, source_checkpoint: str | None = None,
    ) -> None:  # fmt: skip
        if shots is not None:
            check_number("shots", shots, at_least=1, integer=True, hint="None: the authors' rule.")
        check_number("alpha", alpha, at_least=0.0)
        check_number("beta", beta, at_least=0.0)
        check_number("logit_scale", logit_scale, above=0.0)
        check_number("sharpness", sharpness, above=0.0)
        check_number("cache_proportion", cache_proportion, above=0.0, at_most=1.0)
        text = _text_embeddings(text_embeddings, text_encoder, text_inputs)
        if text.ndim != 2 or not len(text):
            raise ValueError(f"text embeddings must be [C, D], one row per class, got shape {tuple(text.shape)}.")
        self._text = text  # registered in build_models, before the state is snapshot
        self.shots, self.alpha, self.beta, self.logit_scale = shots, alpha, beta, logit_scale
        self.sharpness, self.cache_proportion, self.cache_from_test = sharpness, cache_proportion, cache_from_test
        super().__init__(model, lr=1.0, steps=0, domain_names=domain_names, source_checkpoint=source_checkpoint)
        self._pending: list[Tensor] = []
        self.automatic_optimization = False  # the fit only encodes

    def build_models(self) -> None:
        text = self._text
        del self._text
        self.register_buffer("text", text)
        self.register_buffer("cache_keys", text.new_zeros(0, text.shape[1]))
        self.register_buffer("cache_labels", torch.zeros(0, dtype=torch.long))

    def configure_model(self) -> None:
        self.model.eval().requires_grad_(False)  # a frozen encoder with its own statistics

    def features(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            features = self.model(x).float()
        check_embeddings(features, self.text, name="the image encoder's features")
        return features

    def build_cache(self, features: Tensor) -> None:
        """Fill the cache from unlabelled target ``features`` ``[N, D]``."""
        check_embeddings(features, self.text)
        if not len(features):
            raise ValueError("TFUP got no target features to build its cache from: fit on a non-empty target set.")
        shots = self.shots or cache_shots(len(features), len(self.text), self.cache_proportion)
        rows, labels = select_cache(features, self.text, shots, self.sharpness)
        self.cache_keys, self.cache_labels = features[rows].clone(), labels

    def forward(self, x: Tensor) -> Tensor:
        if not len(self.cache_keys):
            raise ValueError(
                "TFUP's cache is empty: run Trainer.fit(tfup, target_data) on the unlabelled target set first "
                "(or tfup.build_cache(features))."
            )
        return tfup_logits(
            self.features(x), self.text, self.cache_keys, self.cache_labels, self.alpha, self.beta,
            self.logit_scale, self.sharpness,
        )  # fmt: skip

    def forward_and_adapt(self, x: Tensor) -> Tensor:
        """Predict; nothing adapts at test time."""
        with torch.no_grad():
            return self(x)

    def reset(self) -> None:
        """Nothing to reset: the cache is built at fit, not at test time."""

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        for name in ("cache_keys", "cache_labels"):  # the cache's size is the checkpoint's
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name], device=self.text.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ---------------------------------------------------------------- building the cache (Trainer.fit)
    def configure_optimizers(self) -> None:
        """No optimizer: TFUP is training-free."""
        return None

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.trainer.world_size > 1:
            raise ValueError(
                "TFUP's fit trains nothing, and DDP refuses a module without trainable parameters: fit the cache on "
                "one device (Trainer(devices=1)), or skip the fit and let Trainer.test build the cache from the test "
                "stream (cache_from_test=True; the ranks gather their shares)."
            )

    def on_train_epoch_start(self) -> None:
        self._pending = []

    @staticmethod
    def _inputs(batch: Any) -> Tensor:
        return batch["inputs"] if isinstance(batch, Mapping) else batch[0] if isinstance(batch, list | tuple) else batch

    def training_step(self, batch: Any, batch_idx: int) -> None:
        self._pending.append(self.features(self._inputs(batch)))

    def on_train_epoch_end(self) -> None:
        self.build_cache(torch.cat(self._pending) if self._pending else self.text.new_zeros(0, self.text.shape[1]))
        self._pending = []
        self.log(f"tricks/{type(self).__name__}/cache_size", float(len(self.cache_keys)))

    def _build_from_ranks(self, parts: list[Tensor]) -> None:
        local = torch.cat(parts) if parts else self.text.new_zeros(0, self.text.shape[1])
        features = self.all_gather(local).reshape(-1, local.shape[1]) if self.trainer.world_size > 1 else local
        self.build_cache(features)

    def _cache_from_stream(self, loaders: Any) -> None:
        if len(self.cache_keys) or not self.cache_from_test:
            return
        loaders = loaders if isinstance(loaders, list | tuple) else [loaders]
        self._build_from_ranks(
            [self.features(self._inputs(batch).to(self.device)) for loader in loaders for batch in loader]
        )

    def on_test_start(self) -> None:
        super().on_test_start()
        self._cache_from_stream(self.trainer.test_dataloaders)

    def on_predict_start(self) -> None:
        super().on_predict_start()
        self._cache_from_stream(self.trainer.predict_dataloaders)
