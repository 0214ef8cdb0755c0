"""A per-sample memory indexed by dataset index, identical on every rank (for PS-KD, ELR, ...)."""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import Dataset, Subset

from lit_tricks.core.distributed import all_gather_rows

TableDevice = Literal["module", "cpu"]


def index_range(dataset: Dataset) -> int:
    """How many rows a table needs for the indices a dataset's items carry: the length of the dataset under any
    ``Subset`` wrappers (``random_split(IndexedDataset(full))`` keeps the indices of ``full``)."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    try:
        return len(dataset)
    except TypeError:
        raise ValueError(
            f"Cannot size a per-sample table from a {type(dataset).__name__} without a length: pass num_samples= "
            "(one more than the largest dataset index)."
        ) from None


def check_table_options(table_dtype: str, table_device: str, num_samples: int | None) -> None:
    """Raise a clear ``ValueError`` for a bad ``table_dtype``, ``table_device`` or ``num_samples``."""
    if table_dtype not in ("float32", "float16"):
        raise ValueError(f"table_dtype must be 'float32' or 'float16', got {table_dtype!r}.")
    if table_device not in ("module", "cpu"):
        raise ValueError(f"table_device must be 'module' (the model's device) or 'cpu', got {table_device!r}.")
    if num_samples is not None and (not isinstance(num_samples, int) or num_samples < 1):
        raise ValueError(f"num_samples must be a positive integer (or None: from the data), got {num_samples!r}.")


def _moved(rows: Tensor, device: torch.device) -> Tensor:
    """``rows`` on ``device``: a non-blocking copy, from pinned memory when it leaves the host for CUDA."""
    if rows.device == device:
        return rows
    if rows.device.type == "cpu" and device.type == "cuda":
        rows = rows.pin_memory()
    return rows.to(device, non_blocking=True)


class SampleTable:
    """Rows ``[N, C]`` indexed by dataset index, with a ``seen`` mask.

    :meth:`write` gathers the rows of every rank under DDP (batches may differ in size), so every rank holds
    the whole table; the table travels in the owning callback's ``state_dict``. Rows that are not finite are
    never stored: they are skipped and counted in :attr:`nonfinite` (on the device, no host synchronisation).

    Args:
        dtype: storage type (``torch.float32`` or ``torch.float16``); a restored table is converted to it.
        device: ``"module"`` (the model's device) or ``"cpu"`` (host memory, pinned when CUDA is available;
            rows travel with non-blocking copies, and the batch's indices are copied to the host each step).
        num_samples: rows of the table; ``None``: the index range of the training set (see :func:`index_range`),
            the largest over ranks.
    """

    def __init__(
        self, dtype: torch.dtype = torch.float32, device: TableDevice = "module", num_samples: int | None = None
    ) -> None:
        self.dtype, self.device, self.num_samples = dtype, device, num_samples
        self.values: Tensor | None = None
        self.seen: Tensor | None = None
        self.nonfinite: Tensor | None = None  # rows refused because they were not finite
        self._owner = "SampleTable"
        self._checked_index: Tensor | None = None  # the last index tensor checked, and its copy on the table's device
        self._checked_table_index: Tensor | None = None
        self._all_seen = False  # every row written at least once (then `read` skips the seen flags)

    def allocate(self, trainer: pl.Trainer, module: pl.LightningModule, owner: str) -> None:
        """One row of ``module.num_classes`` per dataset index: zero rows, or the restored ones after checking their
        shape (converted to ``dtype``). Logs the table's memory once."""
        self._owner = owner
        num_samples = self.num_samples or index_range(trainer.train_dataloader.dataset)
        if trainer.world_size > 1 and self.num_samples is None:  # rank-local shards: the widest range
            num_samples = int(module.all_gather(torch.tensor(num_samples, device=module.device)).max())
        width = module.num_classes
        device = module.device if self.device == "module" else torch.device("cpu")
        if self.values is None:
            self.values = torch.zeros(num_samples, width, dtype=self.dtype, device=device)
            self.seen = torch.zeros(num_samples, dtype=torch.bool, device=device)
        elif self.values.shape != (num_samples, width):
            raise ValueError(
                f"The {owner} table in the checkpoint is {tuple(self.values.shape)} but the data has {num_samples} "
                f"sample indices of {width} classes: resume with the same training set (or the same num_samples)."
            )
        else:
            self.values, self.seen = self.values.to(device, self.dtype), self.seen.to(device)
        if device.type == "cpu" and torch.cuda.is_available():
            self.values, self.seen = self.values.pin_memory(), self.seen.pin_memory()
        self._all_seen = False
        self.nonfinite = (self.nonfinite if self.nonfinite is not None else torch.zeros((), dtype=torch.long)).to(
            module.device
        )
        megabytes = self.values.numel() * self.values.element_size() / 2**20
        rank_zero_info(
            f"{owner}: per-sample table {num_samples} x {width} {self.dtype} on {device}, {megabytes:.1f} MiB"
        )

    def read(self, index: Tensor, default: Tensor | float | None = None) -> Tensor:
        """The rows at ``index`` as float32, on ``index``'s device; with ``default``, rows never written are
        ``default`` instead (a tensor broadcastable to the rows, or a number). Once every row has been written,
        the ``seen`` flags are no longer read (known for free when the table is in host memory)."""
        table_index = self._table_index(index)
        try:
            values = self.values.index_select(0, table_index)
        except IndexError:
            raise self._out_of_range(index) from None
        values = _moved(values, index.device).float()
        if default is None or self._all_seen:
            return values
        seen = _moved(self.seen.index_select(0, table_index), index.device)
        if self.seen.device.type == "cpu":
            self._all_seen = bool(self.seen.all())  # rows never become unseen again
        return torch.where(seen.view(-1, *[1] * (values.ndim - 1)), values, default)

    def write(self, module: pl.LightningModule, index: Tensor, rows: Tensor) -> None:
        """Store ``rows`` at ``index``, from every rank under DDP; rows that are not finite are skipped and counted."""
        (index, rows), _ = all_gather_rows(module, index, rows)
        rows = rows.detach().to(self.dtype)
        table_index = self._table_index(index)
        try:
            if rows.device.type == "cpu" and self.values.device.type == "cpu" and math.isfinite(rows.sum()):
                # the common case, told apart for free on the CPU (a sum is finite only if every entry is; the
                # Python test of the host number costs one tensor op less than four of Tensor.isfinite)
                self.values.index_copy_(0, table_index, rows)
                if not self._all_seen:
                    self.seen.index_fill_(0, table_index, True)
                return
            finite = torch.isfinite(rows).all(dim=1)
            self.nonfinite += (~finite).sum()
            if self.values.device != rows.device:  # queue the copies; the index copy below waits for all of them
                host = self.values.device
                rows, finite = rows.to(host, non_blocking=True), finite.to(host, non_blocking=True)
            kept = torch.where(finite[:, None], rows, self.values.index_select(0, table_index))
            self.values.index_copy_(0, table_index, kept)
            self.seen.index_copy_(0, table_index, self.seen.index_select(0, table_index) | finite)
        except IndexError:
            raise self._out_of_range(index) from None

    def _table_index(self, index: Tensor) -> Tensor:
        """``index`` as int64 on the table's device; a step's write reuses its read's copy of the same tensor. On
        the CPU an index out of range makes the indexing itself fail (then :meth:`_out_of_range` explains it); an
        accelerator's index is checked by an asynchronous assertion first."""
        if index is self._checked_index:
            return self._checked_table_index
        if index.device.type != "cpu":
            n = len(self.values)
            torch._assert_async(((index >= 0) & (index < n)).all(), str(self._out_of_range(index, name_range=False)))
        self._checked_index, self._checked_table_index = index, index.to(self.values.device, torch.long)
        return self._checked_table_index

    def _out_of_range(self, index: Tensor, name_range: bool = True) -> ValueError:
        """The clear error for a batch whose dataset indices fall outside the table (``name_range``: say which)."""
        message = (
            f"{self._owner}: a batch holds a dataset index outside [0, {len(self.values)}), the rows of its "
            "per-sample table: pass num_samples= (one more than the largest index, e.g. the size of the full "
            "dataset the indices count in), or give indices that count from 0 within the training set."
        )
        if name_range:
            low, high = (int(end) for end in torch.aminmax(index))
            message += f" Got indices in [{low}, {high}]."
        return ValueError(message)

    def state_dict(self) -> dict[str, Any]:
        if self.values is None:
            return {}
        return {"values": self.values, "seen": self.seen, "nonfinite": self.nonfinite}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.values, self.seen = state["values"], state["seen"]
            self._all_seen = False
            self.nonfinite = state.get("nonfinite")
