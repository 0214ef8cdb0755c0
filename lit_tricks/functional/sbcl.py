r"""Subclass-balancing contrastive learning (SBCL, Hou et al., ICCV 2023): the subclass-count rule, a seeded
cosine k-means, the per-class temperatures and the bi-granularity contrastive loss.

Each head class is split by k-means, in the representation space, into subclasses of about the tail size, and a
contrastive loss pulls a sample towards its own subclass (instance- and subclass-balanced) and, more weakly and at
a class-specific temperature, towards the other subclasses of its class.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def subclass_counts(class_counts: Tensor, min_size: int = 10) -> Tensor:
    r"""Subclasses per class: :math:`k_c = \max\big(1, \lfloor n_c / \max(\min_{c'} n_{c'}, m) \rfloor\big)`, with
    :math:`m` = ``min_size`` and the minimum over the classes that have samples (a class without samples gets 1).

    Each subclass then holds about as many samples as the tail class (at least ``min_size``).

    Example::

        >>> subclass_counts(torch.tensor([100, 40, 12, 5]), min_size=10).tolist()
        [10, 4, 1, 1]
    """
    counts = torch.as_tensor(class_counts).long()
    present = counts[counts > 0]
    if counts.ndim != 1 or not len(present):
        raise ValueError(f"class_counts must be a 1-D tensor of counts with a positive one, got {class_counts!r}.")
    size = max(int(present.min()), min_size)
    return (counts // size).clamp(min=1)


def kmeans(
    x: Tensor, k: int, iters: int = 35, tol: float = 1e-3, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    r"""Cosine k-means (Lloyd): assign each row to the centre of least :math:`1 - \cos(x_i, c_j)`, move each centre
    to the plain mean of its rows; start from ``k`` distinct rows drawn with ``generator``; an empty cluster restarts
    at a random row. Stops after ``iters`` rounds or when :math:`(\sum_j \lVert c_j - c_j^{\mathrm{prev}} \rVert)^2`
    < ``tol``. Returns the assignment ``[n]`` (of the last round) and the centres ``[k, d]``.

    Example::

        >>> x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
        >>> labels, _ = kmeans(x, 2, generator=torch.Generator().manual_seed(0))
        >>> labels[0] == labels[1] != labels[2] == labels[3]
        tensor(True)
    """
    n = len(x)
    if not 1 <= k <= n:
        raise ValueError(f"kmeans needs 1 <= k <= number of rows, got k={k} for {n} rows.")
    x = x.float()
    unit = F.normalize(x, dim=1)
    centres = x[torch.randperm(n, generator=generator)[:k].to(x.device)].clone()
    for _ in range(iters):
        assign = (unit @ F.normalize(centres, dim=1).T).argmax(dim=1)  # least cosine distance
        previous = centres.clone()
        sizes = torch.bincount(assign, minlength=k)
        centres = torch.zeros_like(centres).index_add_(0, assign, x) / sizes.clamp(min=1)[:, None].to(x.dtype)
        for j in (sizes == 0).nonzero().flatten().tolist():
            centres[j] = x[int(torch.randint(n, (1,), generator=generator))]
        if float((centres - previous).norm(dim=1).sum()) ** 2 < tol:
            break
    return assign, centres


def cluster_subclasses(
    features: Tensor,
    labels: Tensor,
    counts: Tensor,
    iters: int = 35,
    tol: float = 1e-3,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Split each class ``c`` into ``counts[c]`` subclasses with :func:`kmeans` on its rows of ``features``.

    Returns global subclass ids ``[N]`` (class ``c``'s subclasses are numbered from ``counts[:c].sum()``) and the
    centres ``[counts.sum(), d]`` in that order (a class of one subclass: its mean; of no sample: zeros).

    Example::

        >>> x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [0.1, 1.0], [-1.0, 0.0]])
        >>> ids, centres = cluster_subclasses(x, torch.tensor([0, 0, 0, 0, 1]), torch.tensor([2, 1]),
        ...                                   generator=torch.Generator().manual_seed(0))
        >>> ids[0] == ids[2] != ids[1] == ids[3], int(ids[4]), tuple(centres.shape)
        (tensor(True), 2, (3, 2))
    """
    counts = counts.long().cpu()
    offsets = torch.cumsum(counts, 0) - counts
    ids = torch.empty(len(labels), dtype=torch.long, device=features.device)
    centres = features.new_zeros(int(counts.sum()), features.shape[1], dtype=torch.float32)
    for c, k in enumerate(counts.tolist()):
        rows = (labels == c).nonzero().flatten()
        start = int(offsets[c])
        if not len(rows):
            continue
        if k == 1:
            ids[rows], centres[start] = start, features[rows].float().mean(dim=0)
            continue
        assign, class_centres = kmeans(features[rows], min(k, len(rows)), iters, tol, generator)
        ids[rows] = start + assign
        centres[start : start + len(class_centres)] = class_centres
    return ids, centres


def class_temperatures(
    features: Tensor, labels: Tensor, counts: Tensor, temperature: float = 0.1, low: float = 0.2, high: float = 0.8
) -> Tensor:
    r"""The class-level temperatures :math:`\tau_c` (authors' code; the paper's adaptive temperature).

    .. math:: d_c = \frac{\operatorname{mean}_{i: y_i = c} \lVert z_i - \mu_c \rVert_2}{\log(n_c + 10)},
              \quad \tilde d_c = \operatorname{clip}(d_c, q_{0.2}, q_{0.8}), \quad
              \tau_c = \tau\, \tilde d_c / \operatorname{mean}_{c'} \tilde d_{c'},

    with :math:`q` the quantiles of :math:`d` over the classes that have samples (``low``, ``high``), :math:`\mu_c`
    the class mean, and :math:`\tau_c = \tau` for a class of one subclass (``counts[c] == 1``) or no sample
    (:math:`\tau_c` is floored at :math:`\tau / 100`, a guard against a collapsed class not in the authors' code).

    Example::

        >>> z = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
        >>> [round(t, 4) for t in class_temperatures(z, torch.tensor([0, 0, 1, 1]), torch.tensor([2, 1])).tolist()]
        [0.16, 0.1]
    """
    num_classes = len(counts)
    n = torch.bincount(labels, minlength=num_classes)[:num_classes].to(features.device)
    features = features.float()
    means = torch.zeros(num_classes, features.shape[1], device=features.device).index_add_(0, labels, features)
    means = means / n.clamp(min=1)[:, None]
    spread = torch.zeros(num_classes, device=features.device).index_add_(
        0, labels, (features - means[labels]).norm(dim=1)
    )
    present = n > 0
    density = spread[present] / n[present] / torch.log(n[present].float() + 10)
    density = density.clamp(torch.quantile(density, low), torch.quantile(density, high))
    out = torch.full((num_classes,), float(temperature), device=features.device)
    # the floor and the NaN guard only act on collapsed classes (zero spread), never in the authors' regime
    out[present] = (temperature * density / density.mean()).nan_to_num(temperature).clamp(min=temperature / 100)
    out[counts.to(out.device) <= 1] = temperature
    return out


def sbcl_loss(
    z1: Tensor,
    z2: Tensor,
    labels: Tensor,
    subclasses: Tensor,
    temperature: float = 0.1,
    class_temperature: Tensor | float = 0.1,
    base_temperature: float = 0.07,
    class_weight: float = 0.25,
) -> Tensor:
    r"""The SBCL loss of each sample ``[N]`` over two views ``z1, z2`` ``[N, d]`` (unit rows).

    The :math:`2N` rows :math:`z = [z_1; z_2]` are the anchors; :math:`s_{ij} = z_i \cdot z_j`, :math:`i'` is the
    other view of :math:`i`, :math:`S(i)` the rows of :math:`i`'s subclass (without :math:`i`), :math:`P(i)` the
    rows of its class outside its subclass:

    .. math:: \mathcal L_{\mathrm{sub}}(i) = -\frac{1}{|S(i)|} \sum_{p \in S(i)}
              \log \frac{e^{s_{ip}/\tau}}{\sum_{a \ne i} e^{s_{ia}/\tau}}, \qquad
              \mathcal L_{\mathrm{cls}}(i) = -\frac{1}{|P(i)| + 1} \sum_{p \in P(i) \cup \{i'\}}
              \log \frac{e^{s_{ip}/\tau_{y_i}}}{\sum_{a \notin S(i) \cup \{i\}} e^{s_{ia}/\tau_{y_i}}
              + e^{s_{ii'}/\tau_{y_i}}},

    .. math:: \ell(i) = \frac{\tau}{\tau_b} \mathcal L_{\mathrm{sub}}(i) + \gamma\, \mathcal L_{\mathrm{cls}}(i),

    and a sample's loss is the mean of its two anchors' (so the batch mean is the authors' ``SupConLoss_rank``).
    ``temperature`` is :math:`\tau`, ``class_temperature`` :math:`\tau_c` (a number or ``[C]`` by class),
    ``base_temperature`` :math:`\tau_b`, ``class_weight`` :math:`\gamma`. With ``subclasses = labels``,
    ``base_temperature = temperature`` and ``class_weight = 0`` it is SupCon (the authors' warm-up).

    Example::

        >>> z = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=1)
        >>> sbcl_loss(z, z, torch.tensor([0, 1]), torch.tensor([0, 1])).shape
        torch.Size([2])
    """
    n = len(z1)
    z = torch.cat([z1, z2])
    labels, subclasses = labels.repeat(2), subclasses.repeat(2)
    sim = z @ z.T
    eye = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    same_sub = (subclasses[:, None] == subclasses[None, :]) & ~eye
    logits = (sim / temperature).masked_fill(eye, -math.inf)
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    sub_term = -log_prob.masked_fill(~same_sub, 0.0).sum(1) / same_sub.sum(1)
    loss = (temperature / base_temperature) * sub_term
    if class_weight:
        partner = torch.roll(eye, n, dims=1)
        if isinstance(class_temperature, Tensor):
            tau = class_temperature.to(z.dtype)[labels][:, None]
        else:
            tau = class_temperature
        allowed = ~(same_sub | eye) | partner
        positives = (labels[:, None] == labels[None, :]) & ~same_sub & ~eye | partner
        logits = (sim / tau).masked_fill(~allowed, -math.inf)
        log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
        class_term = -log_prob.masked_fill(~positives, 0.0).sum(1) / positives.sum(1)
        loss = loss + class_weight * class_term
    return loss.view(2, n).mean(dim=0)
