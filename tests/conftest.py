import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

ROOT = Path(__file__).resolve().parent.parent


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
