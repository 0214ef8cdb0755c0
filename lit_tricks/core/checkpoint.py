"""Load a checkpoint file safely (``weights_only``), with a clear error when the file is missing or damaged."""

from __future__ import annotations

import os
import pickle
from typing import Any

import torch


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``; a missing, empty, truncated or non-checkpoint file raises an error
    that names the path and says the file is damaged, instead of ``EOFError`` or an unpickling message. A file
    that holds objects ``weights_only`` loading refuses (e.g. a malicious pickle) is still refused as torch does.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No checkpoint file at {os.fspath(path)!r}: check the path.")
    damaged = (
        f"The checkpoint {os.fspath(path)!r} is damaged or not a PyTorch checkpoint "
        f"({os.path.getsize(path)} bytes; e.g. a save that was interrupted, or a text file): "
        "use another checkpoint, e.g. an earlier one of the run."
    )
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        if "global" in str(error).lower():
            raise  # a refusal of an object weights_only loading forbids, not damage: keep torch's explanation
        raise ValueError(damaged) from error
    except (EOFError, IndexError, KeyError, UnicodeDecodeError) as error:
        raise ValueError(damaged) from error
    except RuntimeError as error:
        if "PytorchStreamReader" in str(error) or "zip archive" in str(error):
            raise ValueError(damaged) from error
        raise
