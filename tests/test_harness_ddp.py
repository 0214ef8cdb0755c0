"""Harness (c): every case fits under strategy="ddp" on 2 CPU processes (gloo), and the ranks agree."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harness import CASES, assert_same

SCRIPT = Path(__file__).with_name("ddp_run.py")
# one intra-op thread per rank: two ranks share 2 cores, and spinning OpenMP threads stall on a loaded machine
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
TIMEOUT = 1800  # catches a hang only
ALWAYS = ("sample_reweighting", "continual_replay")  # the two cases the tests below read


@pytest.fixture(scope="module")
def ddp_out(request, tmp_path_factory):
    """Every case this session selected, run in one pair of DDP processes (see ddp_run.py)."""
    names = {item.callspec.params["name"] for item in request.session.items if item.name.startswith("test_ddp_ranks")}
    names = sorted(names | set(ALWAYS))
    out = tmp_path_factory.mktemp("ddp")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(out), *names], capture_output=True, text=True, timeout=TIMEOUT, env=ENV
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def _results(out, name):
    error = out / name / "error.txt"
    assert not error.exists(), error.read_text()[-4000:]
    return [torch.load(out / name / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


@pytest.mark.parametrize("name", sorted(CASES))
def test_ddp_ranks_agree(name, ddp_out):
    ranks = _results(ddp_out, name)
    assert ranks[0]["world_size"] == 2
    assert_same(ranks[0]["params"], ranks[1]["params"], "params")
    assert_same(ranks[0]["callbacks"], ranks[1]["callbacks"], "callbacks")
    assert_same(ranks[0]["metrics"], ranks[1]["metrics"], "synced metrics")
    assert ranks[0]["metrics"], "validation metrics were logged"
    initial = ranks[0]["initial"]  # parameters a part adds at setup (a distillation head) were not there before
    changed = [k not in initial or not torch.equal(initial[k], v) for k, v in ranks[0]["params"].items()]
    assert all(changed), "training changed every parameter"


def test_ddp_reweighting_equals_single_process_global_batch(ddp_out):
    """Under DDP each rank's weights are its slice of the weights of the global batch (rank 0's samples
    first), exactly what one process computes from all the losses."""
    from lit_tricks.functional import reweighting_weights

    records = [rank["records"][0] for rank in _results(ddp_out, "sample_reweighting")]
    assert len(records[0]) == len(records[1]) == 6
    for step0, step1 in zip(*records, strict=True):
        global_losses = torch.cat([step0["loss"], step1["loss"]])
        expected = reweighting_weights(global_losses, "quadratic", 0.5, 1.0)
        torch.testing.assert_close(torch.cat([step0["weight"], step1["weight"]]), expected)
        assert not torch.allclose(step0["weight"], reweighting_weights(step0["loss"], "quadratic", 0.5, 1.0))


def test_ddp_continual_evaluation_equals_a_single_process_evaluation(ddp_out):
    """Each rank evaluates a shard of every task's subset; the summed counts must give the accuracy one process
    measures on the whole subsets with the final weights."""
    from harness import CASES

    result = _results(ddp_out, "continual_replay")[0]
    state = result["callbacks"][1]
    assert state["steps"][-1] == 6 and state["task"] >= 1  # the last evaluation saw the final weights
    model, stream, (_, evaluation) = CASES["continual_replay"]()
    model.load_state_dict(result["params"], strict=False)
    stream.setup()
    model.eval()
    expected = []
    with torch.no_grad():
        for k, data in enumerate(stream.task_eval_sets()[: state["task"] + 1]):
            inputs, targets = evaluation._subset(k, data.inputs, data.targets)
            expected.append((model(inputs).argmax(-1) == targets).float().mean().item())
    torch.testing.assert_close(torch.tensor(state["accuracy"][-1][: len(expected)]), torch.tensor(expected))
