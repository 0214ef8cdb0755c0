import os
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))

# One torch thread per process (subprocesses inherit it through the environment): the test models are tiny, and
# on a busy 2-core machine a second thread spins waiting (a 2-epoch digits fit: 0.3-0.9 s on one thread, 17-46 s
# on two at load 6).
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parent.parent


class PlainModule(pl.LightningModule):
    """A plain LightningModule (not a TrickModule) for 64-feature digits: a linear layer and cross-entropy."""

    def __init__(self):
        super().__init__()
        self.net = nn.Linear(64, 10)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch["inputs"]), batch["targets"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.fixture
def quiet_trainer_kwargs(tmp_path):
    """Trainer arguments for a short, silent, CPU run."""
    return {
        "accelerator": "cpu",
        "devices": 1,
        "default_root_dir": tmp_path,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
