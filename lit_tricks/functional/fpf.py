r"""Forgetting-prone parameters (Zhao, Zhou, Long, Jiang & Zhang, "Does Continual Learning Equally Forget All
Parameters?", ICML 2023): the modules whose parameters move most while a new task is learned.

The parameters are grouped by the module that owns them (a ``Linear``, a convolution, a batch norm: the paper
compares modules). A group's drift between a reference point (the start of the current task) and now is the mean
absolute change of its parameters,

.. math:: d_g = \frac{1}{|\theta_g|} \sum_{p \in g} \lVert \theta_p - \theta_p^{\text{ref}} \rVert_1 ,

normalised by the group's size so that a small module (a batch norm, the classifier) can rank above a large one;
the forgetting-prone groups are the ``num_groups`` groups of largest drift.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn


def parameter_groups(module: nn.Module) -> dict[str, list[str]]:
    """``{module name: names of the trainable parameters it owns itself}`` for every module owning one, in
    registration order (``""`` is the root's own parameters).

    Example::

        >>> net = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3), nn.ReLU(), nn.Linear(3, 2))
        >>> parameter_groups(net)
        {'0': ['0.weight', '0.bias'], '1': ['1.weight', '1.bias'], '3': ['3.weight', '3.bias']}
    """
    groups = {}
    for name, child in module.named_modules():
        own = [
            f"{name}.{p}" if name else p for p, value in child.named_parameters(recurse=False) if value.requires_grad
        ]
        if own:
            groups[name] = own
    return groups


def group_drift(
    reference: Mapping[str, Tensor], current: Mapping[str, Tensor], groups: Mapping[str, Sequence[str]]
) -> Tensor:
    r"""``[G]`` the drift :math:`d_g` of each group (in the order of ``groups``): mean absolute change per parameter.

    Example::

        >>> ref = {"a.weight": torch.zeros(4), "b.weight": torch.zeros(1)}
        >>> now = {"a.weight": torch.tensor([1.0, 0, 0, 0]), "b.weight": torch.tensor([-0.5])}
        >>> group_drift(ref, now, {"a": ["a.weight"], "b": ["b.weight"]})
        tensor([0.2500, 0.5000])
    """
    drifts = []
    for names in groups.values():
        missing = [name for name in names if name not in reference or name not in current]
        if missing:
            raise ValueError(f"group_drift: no reference or current value for {missing}.")
        change = sum((current[n].detach().float() - reference[n].detach().float()).abs().sum() for n in names)
        drifts.append(change / sum(current[n].numel() for n in names))
    return torch.stack(drifts)


def forgetting_prone(drift: Tensor, names: Sequence[str], num_groups: int) -> list[str]:
    """The ``num_groups`` names of largest drift, in descending drift (ties: the earlier name first).

    Example::

        >>> forgetting_prone(torch.tensor([0.1, 0.5, 0.3]), ["conv1", "bn1", "fc"], 2)
        ['bn1', 'fc']
    """
    if drift.shape != (len(names),):
        raise ValueError(f"forgetting_prone: drift has shape {tuple(drift.shape)} for {len(names)} names.")
    if not 1 <= num_groups <= len(names):
        raise ValueError(f"num_groups must be in [1, {len(names)}] (the number of groups), got {num_groups}.")
    order = torch.sort(drift.cpu(), descending=True, stable=True).indices[:num_groups]
    return [names[i] for i in order.tolist()]
