r"""DN-CBM ("Discover-then-Name: Task-Agnostic Concept Bottlenecks via Automated Concept Discovery", Rao et al.,
ECCV 2024) as pure functions: the sparse autoencoder's loss, naming dictionary directions from a vocabulary, and
the resampling of dead neurons.

Notation as the authors' code (``neuroexplicit-saar/Discover-then-Name``, which trains the SAE of its vendored
``sparse_autoencoder`` package): image features :math:`x \in \mathbb R^D`, tied bias :math:`b`, encoder
:math:`W_e` ``[M, D]`` and :math:`b_e`, decoder :math:`W_d` ``[D, M]`` with unit-norm columns (the dictionary
directions), :math:`M = ` expansion factor :math:`\times D`:

.. math:: f(x) = \mathrm{ReLU}\big(W_e (x - b) + b_e\big), \qquad \hat x = W_d f(x) + b.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lit_tricks.functional.vl_embeddings import check_embedding_pair


def sae_loss(inputs: Tensor, reconstruction: Tensor, activations: Tensor, l1_coeff: float) -> tuple[Tensor, Tensor]:
    r"""The SAE loss of the code (``L2ReconstructionLoss`` + ``LearnedActivationsL1Loss`` under a
    ``LossReducer``), per sample then averaged over the batch:

    .. math:: L = \frac1N \sum_i \Big[\frac1D \lVert x_i - \hat x_i \rVert_2^2 + \lambda \lVert f(x_i) \rVert_1\Big]

    (a mean over feature dimensions in the reconstruction term, a sum over the :math:`M` neurons in the sparsity
    term), :math:`\lambda` = ``l1_coeff``. Returns ``(reconstruction term, sparsity term)``, both batch means,
    the sparsity term already scaled.

    Example::

        >>> x, x_hat, f = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 2.0]]), torch.tensor([[3.0, 0.0, 1.0]])
        >>> [round(t.item(), 4) for t in sae_loss(x, x_hat, f, l1_coeff=0.1)]
        [0.5, 0.4]
    """
    reconstruction_term = (inputs - reconstruction).pow(2).mean(dim=-1).mean()
    sparsity_term = l1_coeff * activations.abs().sum(dim=-1).mean()
    return reconstruction_term, sparsity_term


def name_directions(
    directions: Tensor, vocabulary_embeddings: Tensor, normalize_vocabulary: bool = True
) -> tuple[Tensor, Tensor]:
    r"""Name each dictionary direction (decoder column :math:`d_j`, given as rows ``[M, D]``) by its nearest
    vocabulary entry (the code's ``get_concept_name_similarity_matrix`` + ``argmax`` over the vocabulary, as in
    ``scripts/assign_names.py``):

    .. math:: \mathrm{name}(j) = \arg\max_v \; \frac{d_j}{\lVert d_j \rVert} \cdot \frac{t_v}{\lVert t_v \rVert}.

    The decoder directions live in the image-embedding space, which a vision-language model shares with its text
    embeddings :math:`t_v` (``vocabulary_embeddings`` ``[V, D]``), so no other map is needed. The code normalises
    the directions and multiplies by the stored vocabulary embeddings as they are; ``normalize_vocabulary=True``
    (the paper's cosine similarity) also normalises those. Returns ``(indices [M], similarities [M])``.

    Example::

        >>> d = torch.tensor([[1.0, 0.1], [0.0, -2.0]])
        >>> vocab = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
        >>> name_directions(d, vocab)[0].tolist()
        [0, 2]
    """
    check_embedding_pair(
        directions,
        vocabulary_embeddings,
        image_name="dictionary directions",
        text_name="vocabulary_embeddings",
        what="vocabulary entries",
        fix="pass at least one text embedding to name the directions with",
    )
    vocab = F.normalize(vocabulary_embeddings.float(), dim=1) if normalize_vocabulary else vocabulary_embeddings.float()
    similarity = F.normalize(directions.float(), dim=1) @ vocab.T
    best = similarity.max(dim=1)
    return best.indices, best.values


def resample_dead_neurons(
    inputs: Tensor,
    sample_losses: Tensor,
    n_dead: int,
    alive_encoder_rows: Tensor,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    r"""New parameters for ``n_dead`` dead neurons, as the code's ``ActivationResampler`` (after Anthropic's
    "Towards Monosemanticity"): draw inputs :math:`x_k` with probability :math:`\propto L_k^2` (their SAE loss;
    without replacement, as ``torch.multinomial`` there, unless fewer inputs than dead neurons have a loss),
    set the decoder column to :math:`x_k / \lVert x_k \rVert` and the encoder row to
    :math:`0.2\, \overline{\lVert W_{e,\mathrm{alive}} \rVert}\; x_k / \lVert x_k \rVert` (the mean norm of the
    alive neurons' encoder rows); the encoder bias becomes 0 (the caller's job).

    Returns ``(decoder columns [n_dead, D], encoder rows [n_dead, D])``.

    Example::

        >>> dec, enc = resample_dead_neurons(torch.tensor([[3.0, 4.0]]), torch.ones(1), 1, torch.tensor([[0.0, 5.0]]))
        >>> dec.tolist(), enc.tolist()
        ([[0.6000000238418579, 0.800000011920929]], [[0.6000000238418579, 0.800000011920929]])
    """
    if n_dead == 0:
        empty = inputs.new_zeros(0, inputs.shape[1])
        return empty, empty
    weights = sample_losses.float().pow(2)
    if not bool(weights.sum() > 0):
        weights = torch.ones_like(weights)
    replace = n_dead > int((weights > 0).sum())
    picked = torch.multinomial(weights.cpu(), n_dead, replacement=replace, generator=generator).to(inputs.device)
    directions = F.normalize(inputs[picked].float(), dim=1)
    alive_norm = alive_encoder_rows.norm(dim=1).mean() if len(alive_encoder_rows) else inputs.new_tensor(1.0)
    return directions, directions * (0.2 * alive_norm)


def probe_l1(weight: Tensor) -> Tensor:
    r"""The probe's sparsity term of the code (``torch.nn.L1Loss()`` of the flattened weights against zeros):
    the *mean* absolute weight :math:`\frac{1}{CM}\sum_{c,j} |W_{cj}|`, multiplied by
    ``probe_sparsity_loss_lambda`` outside.

    Example::

        >>> probe_l1(torch.tensor([[1.0, -3.0]])).item()
        2.0
    """
    return weight.abs().mean()
