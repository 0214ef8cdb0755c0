r"""Energy-based concept bottleneck models (Xu et al., "Energy-Based Concept Bottleneck Models: Unifying Prediction,
Concept Intervention, and Probabilistic Interpretations", ICLR 2024), as pure functions.

Three energies score candidate (input, concept, class) tuples; lower is more compatible. Each is a gated pair
energy :math:`E(h, u) = w^\top \mathrm{ReLU}(h + h \odot u) + b` of a projected input (or concept) code :math:`h`
and an L2-normalised label embedding :math:`u`; a Boltzmann distribution :math:`p \propto e^{-E}` turns energies
into probabilities, trained by negative log-likelihood. Prediction minimises a weighted sum of the energies over
relaxed (softmaxed) concepts and classes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def gated_energy(h: Tensor, u: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    r""":math:`E = w^\top \mathrm{ReLU}(h + h \odot u) + b` over the last dimension (all arguments broadcast).

    Example::

        >>> h, u, w = torch.tensor([1.0, -2.0]), torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])
        >>> gated_energy(h, u, w, torch.tensor(0.5))
        tensor(2.5000)
    """
    return (F.relu(h + h * u) * weight).sum(-1) + bias


def boltzmann_nll(energy: Tensor, target: Tensor) -> Tensor:
    r"""Per-element :math:`-\log p(t) = E_t + \log \sum_v e^{-E_v}` of energies ``[..., V]`` at ``target`` ``[...]``
    (the cross-entropy of the logits :math:`-E`).

    Example::

        >>> boltzmann_nll(torch.tensor([[0.0, 0.0]]), torch.tensor([1]))
        tensor([0.6931])
    """
    return energy.gather(-1, target.long().unsqueeze(-1)).squeeze(-1) + torch.logsumexp(-energy, dim=-1)


def ecbm_loss(
    class_energy: Tensor,
    concept_energy: Tensor,
    global_energy: Tensor,
    targets: Tensor,
    concepts: Tensor,
    weights: Sequence[float] = (3.0, 1.0, 1.0),
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    r"""``(total, L_xy, L_xc, L_cy)``, :math:`\mathcal L = \lambda_{xy} \mathcal L_{xy} + \lambda_{xc} \mathcal L_{xc}
    + \lambda_{cy} \mathcal L_{cy}` with

    - :math:`\mathcal L_{xy} = \overline{E_{xy}(x, y) + \log \sum_m e^{-E_{xy}(x, m)}}` (class energies ``[N, M]``),
    - :math:`\mathcal L_{xc} = \sum_k \overline{E_{xc}(x, c_k) + \log \sum_{v \in \{0,1\}} e^{-E_{xc}(x, v)}}`
      (concept energies ``[N, k, 2]``: **summed** over concepts, averaged over samples),
    - :math:`\mathcal L_{cy}`: as :math:`\mathcal L_{xy}` on the global energies :math:`E_{cy}(c, m)` ``[N, M]``.

    ``weights`` = :math:`(\lambda_{xy}, \lambda_{xc}, \lambda_{cy})`; the authors' CUB values are (3, 1, 1).
    """
    l_xy = boltzmann_nll(class_energy, targets).mean()
    l_xc = boltzmann_nll(concept_energy, concepts).mean(0).sum()
    l_cy = boltzmann_nll(global_energy, targets).mean()
    return weights[0] * l_xy + weights[1] * l_xc + weights[2] * l_cy, l_xy, l_xc, l_cy


def inference_energy(
    class_energy: Tensor, concept_energy: Tensor, global_energy: Tensor, weights: Sequence[float] = (1.0, 1.0, 0.01)
) -> Tensor:
    r"""The objective minimised at prediction over relaxed concepts and classes,
    :math:`\lambda_{xy} \overline{E_{xy}} + \lambda_{xc} \sum_k \overline{E_{xc,k}} + \lambda_{cy} \overline{E_{cy}}`
    (energies ``[N]``, ``[N, k]``, ``[N]``; means over the batch). The authors' CUB values are (1, 1, 0.01).

    Example::

        >>> inference_energy(torch.tensor([1.0, 3.0]), torch.ones(2, 3), torch.tensor([10.0, 10.0]))
        tensor(5.1000)
    """
    return (
        weights[0] * class_energy.mean() + weights[1] * concept_energy.mean(0).sum() + weights[2] * global_energy.mean()
    )


def flip_concepts(
    concepts: Tensor, concept_ratio: float, sample_ratio: float, generator: torch.Generator | None = None
) -> Tensor:
    r"""The global energy's training augmentation: in :math:`\lceil \text{sample\_ratio} \cdot N \rceil` random samples
    flip the same :math:`\lceil \text{concept\_ratio} \cdot k \rceil` random concepts (binary ``[N, k]``).

    Example::

        >>> flip_concepts(torch.zeros(2, 2), 1.0, 1.0)
        tensor([[1., 1.],
                [1., 1.]])
    """
    n, k = concepts.shape
    n_concepts, n_samples = math.ceil(concept_ratio * k), math.ceil(sample_ratio * n)
    if n_concepts == 0 or n_samples == 0:
        return concepts
    cols = torch.zeros(k, dtype=torch.bool)
    cols[torch.randperm(k, generator=generator)[:n_concepts]] = True
    rows = torch.zeros(n, dtype=torch.bool)
    rows[torch.randperm(n, generator=generator)[:n_samples]] = True
    flip = (rows[:, None] & cols[None, :]).to(concepts.device)
    return torch.where(flip, 1 - concepts, concepts)


def concept_states(n_concepts: int) -> Tensor:
    """All :math:`2^k` binary concept vectors ``[2^k, k]`` (row ``s`` is ``s`` in binary, concept 0 the lowest bit).

    Example::

        >>> concept_states(2)
        tensor([[0., 0.],
                [1., 0.],
                [0., 1.],
                [1., 1.]])
    """
    if not 1 <= n_concepts <= 20:
        raise ValueError(f"Exact enumeration needs 1 <= n_concepts <= 20, got {n_concepts}.")
    codes = torch.arange(2**n_concepts)
    return ((codes[:, None] >> torch.arange(n_concepts)) & 1).float()


def state_prior(concepts: Tensor) -> Tensor:
    """The empirical distribution ``[2^k]`` of binary concept vectors ``[N, k]`` over :func:`concept_states`."""
    codes = (concepts > 0.5).long() @ (2 ** torch.arange(concepts.shape[1], device=concepts.device))
    return torch.bincount(codes, minlength=2 ** concepts.shape[1]).float() / len(concepts)


def concept_class_joint(global_energy: Tensor, prior: Tensor | None = None) -> Tensor:
    r""":math:`p(c, y) = p(y \mid c)\, p(c)` ``[2^k, M]`` from the global energies of every concept vector
    ``[2^k, M]``: :math:`p(y \mid c) = \mathrm{softmax}_y(-E_{cy}(c, y))` and :math:`p(c)` = ``prior`` (uniform if
    None; e.g. :func:`state_prior` of the training concepts).

    Example::

        >>> concept_class_joint(torch.zeros(2, 2))
        tensor([[0.2500, 0.2500],
                [0.2500, 0.2500]])
    """
    p_y_given_c = torch.softmax(-global_energy, dim=1)
    if prior is None:
        prior = torch.full((len(global_energy),), 1.0 / len(global_energy), device=global_energy.device)
    return p_y_given_c * (prior / prior.sum())[:, None]


def concept_given_class(joint: Tensor, states: Tensor) -> Tensor:
    r""":math:`p(c_k = 1 \mid y) = \sum_{c: c_k = 1} p(c, y) / \sum_c p(c, y)`, ``[M, k]``, from
    :func:`concept_class_joint` and :func:`concept_states` (the paper's marginal class-specific concept importance)."""
    return (joint.T @ states) / joint.sum(0)[:, None].clamp_min(1e-12)


def concept_given_concept(joint: Tensor, states: Tensor) -> Tensor:
    r""":math:`p(c_k = 1 \mid c_{k'} = 1) = \sum_y \sum_{c: c_k = c_{k'} = 1} p(c, y) / \sum_y \sum_{c: c_{k'} = 1}
    p(c, y)`, ``[k, k]`` (row :math:`k`, column :math:`k'`), from :func:`concept_class_joint` and
    :func:`concept_states`."""
    p_state = joint.sum(1)
    both = states.T @ (states * p_state[:, None])  # [k, k']: P(c_k = 1, c_k' = 1)
    return both / (p_state @ states).clamp_min(1e-12)[None, :]
