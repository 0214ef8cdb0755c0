"""ConsistencyModel logs from its first step, so a run shorter than log_every_n_steps still shows training."""

import lightning.pytorch as pl
from lightning.pytorch.loggers import Logger

from lit_tricks import ConsistencyModel
from lit_tricks.data import Toy2DDataModule
from lit_tricks.nets import TimeMLP


class Recorder(Logger):
    name, version, experiment = "recorder", 0, None

    def __init__(self):
        super().__init__()
        self.steps: dict[str, list[int]] = {}

    def log_metrics(self, metrics, step=None):
        for key in metrics:
            self.steps.setdefault(key, []).append(step)

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def test_a_short_run_logs_its_first_step():
    recorder = Recorder()
    trainer = pl.Trainer(
        max_steps=3, log_every_n_steps=2, logger=recorder, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(ConsistencyModel(TimeMLP(dim=2, hidden=16), data_shape=[2]), Toy2DDataModule("moons", num_samples=256))
    expected = ["train/loss", "train/consistency_loss", "consistency/num_levels", "consistency/c"]
    assert all(recorder.steps[key] == [0, 1] for key in expected), recorder.steps
