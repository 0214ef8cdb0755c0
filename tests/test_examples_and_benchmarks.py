"""Examples and benchmark scripts run (benchmarks in --quick mode), so they never rot; README and CI agree."""

import ast
import json
import os
import re
import subprocess
import sys

from conftest import ROOT

# One intra-op thread: these tiny models gain nothing from more, and on a machine loaded by other jobs OpenMP's
# spinning threads slowed a 2-epoch digits fit from 0.3 s to 17-46 s. The timeout only catches a hang.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TIMEOUT = 3600


def _run(args, cwd):
    proc = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT, env=ENV)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def test_quickstart_example(tmp_path):
    out = _run([str(ROOT / "examples/quickstart.py"), "--max-epochs", "2"], cwd=tmp_path)
    accuracy = float(re.search(r"'test/acc': ([0-9.]+)", out).group(1))
    assert accuracy > 0.8
    assert list((tmp_path / "lightning_logs").glob("version_0/events.out.tfevents.*"))


def test_tta_example(tmp_path):
    out = _run([str(ROOT / "examples/tta_digits.py"), "--source-epochs", "5"], cwd=tmp_path)
    errors = ast.literal_eval(out.strip().splitlines()[-1])
    assert set(errors) == {"source", "BNAdapt", "Tent", "RMT", "EcoTTA"}
    assert all(errors[name] < errors["source"] - 15 for name in ("BNAdapt", "Tent", "RMT", "EcoTTA"))
    assert all(list((tmp_path / "lightning_logs" / name).glob("events.out.tfevents.*")) for name in ("Tent", "RMT"))


def test_baseline_benchmark_quick(tmp_path):
    out = _run([str(ROOT / "benchmarks/baseline.py"), "--quick", "--out", str(tmp_path)], cwd=tmp_path)
    assert out.startswith("Machine: ") and "| MNIST-1D / CNN1D |" in out
    runs = json.loads((tmp_path / "baseline_quick.json").read_text())["runs"]
    assert {r["setup"] for r in runs} == {"digits / MLP", "digits / CNN2D", "MNIST-1D / MLP", "MNIST-1D / CNN1D"}
    assert all(0.0 <= r["acc"] <= 1.0 and r["fit_seconds"] > 0 for r in runs)


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    command = re.search(r"<!-- test-command -->\s*```bash\n(.+?)\n```", readme, re.S).group(1).strip()
    assert command in (ROOT / ".ci/run").read_text()


def test_ema_speed_benchmark_quick(tmp_path):
    out = _run([str(ROOT / "benchmarks/ema_speed.py"), "--quick", "--out", str(tmp_path)], cwd=tmp_path)
    assert out.startswith("Machine: ") and "| ResNet-50 layout |" in out
    runs = json.loads((tmp_path / "ema_speed_quick.json").read_text())["runs"]
    assert {r["model"] for r in runs} == {"MLP 8.4M params", "ResNet-50 layout"}
    assert all(r["ema_teacher_ms"] > 0 and r["lightning_ema_ms"] > 0 for r in runs)


def test_overhead_benchmark_quick(tmp_path):
    out = _run([str(ROOT / "benchmarks/overhead.py"), "--quick", "--out", str(tmp_path)], cwd=tmp_path)
    assert out.startswith("Machine: ") and "| Classifier + EMATeacher + Mixup + PS-KD + ELR |" in out
    assert "| plain LightningModule + the four tricks by hand |" in out
    runs = json.loads((tmp_path / "overhead_quick.json").read_text())["runs"]
    assert len(runs) == 2 and all(len(r["step_ms"]) == 6 for r in runs)
    assert set(runs[0]["hook_ms"]) == {"EMATeacher", "Mixup", "SelfDistill", "ELR"}
    assert all(ms[0] > 0 for r in runs for ms in r["step_ms"].values())


def test_self_distill_benchmark_quick(tmp_path):
    out = _run([str(ROOT / "benchmarks/self_distill.py"), "--quick", "--out", str(tmp_path)], cwd=tmp_path)
    assert out.startswith("Machine: ") and "| MNIST-1D / CNN1D | 20% | EMA-KD |" in out
    runs = json.loads((tmp_path / "self_distill_quick.json").read_text())["runs"]
    assert {r["method"] for r in runs} == {"baseline", "EMA", "PS-KD", "EMA-KD"} and len(runs) == 16


def test_mixup_speed_benchmark_quick(tmp_path):
    out = _run([str(ROOT / "benchmarks/mixup_speed.py"), "--quick", "--out", str(tmp_path)], cwd=tmp_path)
    assert out.startswith("Machine: ") and "| CutMix |" in out
    runs = json.loads((tmp_path / "mixup_speed_quick.json").read_text())["runs"]
    assert {r["trick"] for r in runs} == {"Mixup", "CutMix"} and all(r["ours_ms"] > 0 for r in runs)


def test_label_noise_benchmark_quick(tmp_path):
    out = _run([str(ROOT / "benchmarks/label_noise.py"), "--quick", "--out", str(tmp_path)], cwd=tmp_path)
    assert out.startswith("Machine: ") and "| MNIST-1D / CNN1D | 40% | ELR |" in out
    runs = json.loads((tmp_path / "label_noise_quick.json").read_text())["runs"]
    assert len(runs) == 26
    assert {r["method"] for r in runs} >= {"ERM", "ELR", "EnsLoss", "ALDR-KL", "Bias loss", "AdaWAC"}


def test_long_tail_benchmark_quick(tmp_path):
    out = _run([str(ROOT / "benchmarks/long_tail.py"), "--quick", "--out", str(tmp_path)], cwd=tmp_path)
    assert out.startswith("Machine: ") and "| MNIST-1D / CNN1D | 10 | 0% | over-sampling |" in out
    runs = json.loads((tmp_path / "long_tail_quick.json").read_text())["runs"]
    assert len(runs) == 26 and all(0.0 <= r["balanced_acc"] <= 1.0 and r["steps"] > 0 for r in runs)
    assert "| digits / MLP | 10 | 0% | AdaWAC |" in out and "| MNIST-1D / CNN1D | 10 | 0% | SBCL |" in out
    assert "| digits / MLP | 10 | 0% | ERM + prior correction |" in out


def test_data_selection_benchmark_quick(tmp_path):
    out = _run([str(ROOT / "benchmarks/data_selection.py"), "--quick", "--out", str(tmp_path)], cwd=tmp_path)
    assert out.startswith("Machine: ") and "| RS2 r=0.25 |" in out
    runs = json.loads((tmp_path / "data_selection_quick.json").read_text())["runs"]
    assert len(runs) == 6 and all(r["curve"] and r["train_seconds"] > 0 for r in runs)
    assert {r["steps"] for r in runs if r["method"].startswith("RS2")} < {r["steps"] for r in runs}


def test_continual_benchmark_quick(tmp_path):
    out = _run([str(ROOT / "benchmarks/continual.py"), "--quick", "--out", str(tmp_path)], cwd=tmp_path)
    assert out.startswith("Machine: ") and "| Split-MNIST-1D | replay | task ends only |" in out
    assert "| Split-Digits | k-FPF | every step |" in out and "| Split-MNIST-1D | DKVB | every step |" in out
    result = json.loads((tmp_path / "continual_quick.json").read_text())
    assert len(result["runs"]) == 14 and {c["every_n_steps"] for c in result["costs"]} == {None, 1, 10}
    assert all(0 <= r["per_step"]["acc"] <= 1 for r in result["runs"])


def test_consistency_benchmark_quick(tmp_path):
    out = _run([str(ROOT / "benchmarks/consistency.py"), "--quick", "--out", str(tmp_path)], cwd=tmp_path)
    assert out.startswith("Machine: ") and "| digits | EDM | 50 (99) |" in out and "| + minibatch OT |" in out
    result = json.loads((tmp_path / "consistency_quick.json").read_text())
    assert len(result["runs"]) == 3 * (2 + 4) and set(result["floors"]) == {"moons", "8 Gaussians", "digits"}
    assert all(r["sample_seconds"] > 0 and r["energy"] == r["energy"] for r in result["runs"])


def test_concept_bottleneck_benchmark_quick(tmp_path):
    out = _run([str(ROOT / "benchmarks/concept_bottleneck.py"), "--quick", "--out", str(tmp_path)], cwd=tmp_path)
    assert out.startswith("Machine: ") and "| ECBM |" in out and "| PCBM-h |" in out
    result = json.loads((tmp_path / "concept_bottleneck_quick.json").read_text())
    assert len(result["runs"]) == 4 * 9 and set(result["ceilings"]) == {"XOR", "TRIG", "DOT", "shapes"}
    assert all(0 <= r["intervened"] <= 1 for r in result["runs"])


def test_tta_benchmark_quick(tmp_path):
    out = _run([str(ROOT / "benchmarks/tta.py"), "--quick", "--out", str(tmp_path)], cwd=tmp_path)
    assert out.startswith("Machine: ") and "| EcoTTA |" in out and "MNIST-1D-C, gradual" in out
    runs = json.loads((tmp_path / "tta_quick.json").read_text())["runs"]
    methods = {"source", "BNAdapt", "Tent", "RMT", "AdaNPC", "AdaNPC k=10", "EcoTTA", "LP-FT 3-shot"}
    assert {r["method"] for r in runs} == methods
    assert {r["dataset"] for r in runs} == {"Digits-C", "MNIST-1D-C"}
    assert all(0 <= e <= 1 for r in runs for e in r["errors"].values())
    adapted = [r for r in runs if r["method"] != "source" and r["protocol"] == "continual"]
    assert all(r["memory"]["state"] > 0 for r in adapted)
    no_backward = ("BNAdapt", "AdaNPC", "LP-FT")  # LP-FT trains before the stream and predicts frozen
    assert all((r["memory"]["activations"] > 0) == (not r["method"].startswith(no_backward)) for r in adapted)


def test_optim_speed_benchmark_quick(tmp_path):
    out = _run([str(ROOT / "benchmarks/optim_speed.py"), "--quick", "--out", str(tmp_path)], cwd=tmp_path)
    assert out.startswith("Machine: ") and "| ResNet-50 layout | Lion |" in out
    runs = json.loads((tmp_path / "optim_speed_quick.json").read_text())["runs"]
    ours = {(r["model"], r["optimizer"]): r for r in runs}
    assert ours["MLP 8.4M params", "Lion"]["state_tensors_per_param"] == 1
    assert ours["MLP 8.4M params", "AdamW foreach"]["state_tensors_per_param"] == 2
    assert ours["ResNet-50 layout", "AdaBelief"]["state_tensors_per_param"] == 2
    assert all(r["step_ms"] > 0 for r in runs)


def test_layers_benchmark_quick(tmp_path):
    out = _run([str(ROOT / "benchmarks/layers.py"), "--quick", "--out", str(tmp_path)], cwd=tmp_path)
    assert out.startswith("Machine: ") and "| Ghost BN 512/32 |" in out
    runs = json.loads((tmp_path / "layers_quick.json").read_text())["runs"]
    assert {r["setup"] for r in runs} >= {"plain BN 512", "Ghost BN 512/32", "MSD K=8"}
    assert all(0.0 <= r["acc"] <= 1.0 and r["fit_seconds"] > 0 for r in runs)


def test_tract_benchmark_quick(tmp_path):
    out = _run([str(ROOT / "benchmarks/tract.py"), "--quick", "--out", str(tmp_path)], cwd=tmp_path)
    assert out.startswith("Machine: ") and "| digits / CNN2D | 3 | TrAct |" in out
    runs = json.loads((tmp_path / "tract_quick.json").read_text())["runs"]
    setups = ("digits / CNN2D", "MNIST-1D / CNN1D")
    assert {(r["setup"], r["method"]) for r in runs} == {(s, m) for s in setups for m in ("plain", "TrAct")}
    assert all(0.0 <= r["acc"] <= 1.0 and r["fit_seconds"] > 0 for r in runs)


def test_hypernetwork_benchmark_quick(tmp_path):
    out = _run([str(ROOT / "benchmarks/hypernetwork.py"), "--quick", "--out", str(tmp_path)], cwd=tmp_path)
    assert out.startswith("Machine: ") and "| MIP lr=0.0003 |" in out
    result = json.loads((tmp_path / "hypernetwork_quick.json").read_text())
    assert {"plain lr=0.0003", "MIP lr=0.0003"} <= set(result["runs"]) and result["step_milliseconds"]["MIP"] > 0


def test_efficient_train_benchmark_quick(tmp_path):
    out = _run([str(ROOT / "benchmarks/efficient_train.py"), "--quick", "--out", str(tmp_path)], cwd=tmp_path)
    assert out.startswith("Machine: ") and "| digits 16x16 / CNN2D | EfficientTrain |" in out
    result = json.loads((tmp_path / "efficient_train_quick.json").read_text())
    assert len(result["runs"]) == 8 and len(result["step_ms"]) == 2


def test_distill_benchmark_quick(tmp_path):
    out = _run([str(ROOT / "benchmarks/distill.py"), "--quick", "--out", str(tmp_path)], cwd=tmp_path)
    assert out.startswith("Machine: ") and "| digits | MIC (EMA) |" in out
    result = json.loads((tmp_path / "distill_quick.json").read_text())
    assert len(result["runs"]) == 18 and len(result["teachers"]) == 6
    meal = [r["teacher_forwards_per_step"] for r in result["runs"] if r["method"].startswith("MEAL")]
    assert meal == [[1.0, 1.0, 1.0]] * 2  # one forward per step per teacher
    checks = result["forward_checks"]  # KD + EMA-KD + MIC in one fit: each teacher once per step
    assert all(c["teacher_forwards_per_step"] == [1.0] and c["ema_forwards_per_step"] == 1.0 for c in checks)


def test_adversarial_training_benchmark_quick(tmp_path):
    out = _run([str(ROOT / "benchmarks/adversarial_training.py"), "--quick", "--out", str(tmp_path)], cwd=tmp_path)
    assert out.startswith("Machine: ") and "| long tail rho=10 | PGD-AT + DRW |" in out
    runs = json.loads((tmp_path / "adversarial_training_quick.json").read_text())["runs"]
    assert {(r["rho"], r["method"]) for r in runs} == {
        *((10.0, m) for m in ("ERM", "PGD-AT", "PGD-AT + RW", "PGD-AT + DRW")),
        (None, "ERM"),
        (None, "PGD-AT"),
    }
    assert all(0.0 <= r["pgd_acc"] <= r["clean_acc"] + 0.05 for r in runs)


def test_nested_dropout_benchmark_quick(tmp_path):
    out = _run([str(ROOT / "benchmarks/nested_dropout.py"), "--quick", "--out", str(tmp_path)], cwd=tmp_path)
    assert out.startswith("Machine: ") and "| digits / MLP | 40% | ERM |" in out
    runs = json.loads((tmp_path / "nested_dropout_quick.json").read_text())["runs"]
    assert len(runs) == 4 and all(0.0 <= r["acc"] <= 1.0 for r in runs)


def test_neural_collapse_benchmark_quick(tmp_path):
    out = _run([str(ROOT / "benchmarks/neural_collapse.py"), "--quick", "--out", str(tmp_path)], cwd=tmp_path)
    assert out.startswith("Machine: ") and "| MNIST-1D / CNN1D | 0% | Mixup |" in out
    runs = json.loads((tmp_path / "neural_collapse_quick.json").read_text())["runs"]
    assert [r["method"] for r in runs] == ["ERM", "Mixup"] and all(r["temperature"] > 0 for r in runs)


def test_ood_benchmark_quick(tmp_path):
    out = _run([str(ROOT / "benchmarks/ood.py"), "--quick", "--out", str(tmp_path)], cwd=tmp_path)
    assert out.startswith("Machine: ") and "| MixOE (cutmix) |" in out
    runs = json.loads((tmp_path / "ood_quick.json").read_text())["runs"]
    assert len(runs) == 4 and all(0 <= r["near (digits 6-9)"]["auroc"] <= 1 for r in runs)


def test_self_supervised_benchmark_quick(tmp_path):
    out = _run([str(ROOT / "benchmarks/self_supervised.py"), "--quick", "--out", str(tmp_path)], cwd=tmp_path)
    assert out.startswith("Machine: ") and "| MNIST-1D / CNN1D | MoCHi |" in out
    runs = json.loads((tmp_path / "self_supervised_quick.json").read_text())["runs"]
    assert {r["method"] for r in runs} == {"untrained encoder", "Barlow Twins", "MixBT", "MoCo-v2", "MoCHi"}
    assert all(0.0 <= r["probe_accuracy"] <= 1.0 for r in runs)


def test_metric_learning_benchmark_quick(tmp_path):
    out = _run([str(ROOT / "benchmarks/metric_learning.py"), "--quick", "--out", str(tmp_path)], cwd=tmp_path)
    assert out.startswith("Machine: ") and "| MNIST-1D / CNN1D | multi_similarity | input |" in out
    rows = [line for line in out.splitlines() if line.startswith("| digits") or line.startswith("| MNIST-1D")]
    assert len(rows) == 16


def test_concept_metrics_benchmark_quick(tmp_path):
    out = _run([str(ROOT / "benchmarks/concept_metrics.py"), "--quick", "--out", str(tmp_path)], cwd=tmp_path)
    assert out.startswith("Machine: ") and "| CBM |" in out and "| PCBM |" in out
    result = json.loads((tmp_path / "concept_metrics_quick.json").read_text())
    assert set(result["runs"]) == {"CBM", "CEM", "ECBM", "PCBM"} and "| ECBM |" in out
    assert all(0 <= r["location@1"] <= 1 for kind, runs in result["runs"].items() if kind != "ECBM" for r in runs)
    assert all(0 <= r["existence@1"] <= 1 for runs in result["runs"].values() for r in runs)


def test_smmix_benchmark_quick(tmp_path):
    out = _run([str(ROOT / "benchmarks/smmix.py"), "--quick", "--out", str(tmp_path)], cwd=tmp_path)
    assert out.startswith("Machine: ") and "| SMMix |" in out
    runs = json.loads((tmp_path / "smmix_quick.json").read_text())["runs"]
    assert [r["arm"] for r in runs] == ["ViT", "Mixup (0.8, smoothing 0.1)", "CutMix (1.0)", "SMMix"]
    assert all(0.0 <= r["test_acc"] <= 1.0 for r in runs)


def test_constrained_cbm_benchmark_quick(tmp_path):
    out = _run([str(ROOT / "benchmarks/constrained_cbm.py"), "--quick", "--out", str(tmp_path)], cwd=tmp_path)
    assert out.startswith("Machine: ") and "| cooccurrence 0.95, constrained |" in out
    assert len(json.loads((tmp_path / "constrained_cbm_quick.json").read_text())["results"]) == 3


def test_mvp_benchmark_quick(tmp_path):
    out = _run([str(ROOT / "benchmarks/mvp.py"), "--quick", "--out", str(tmp_path)], cwd=tmp_path)
    assert out.startswith("Machine: ") and "| MVP |" in out
    assert {"10/MVP/1", "5/ER/1"} <= set(json.loads((tmp_path / "mvp_quick.json").read_text())["runs"])


def test_vl_encoder_pair_benchmark_quick(tmp_path):
    out = _run([str(ROOT / "benchmarks/vl_encoder_pair.py"), "--quick", "--out", str(tmp_path)], cwd=tmp_path)
    assert out.startswith("Machine: ") and "| contrast 3 |" in out and "| DN-CBM probe (%) |" in out
    (run,) = json.loads((tmp_path / "vl_encoder_pair_quick.json").read_text())["runs"]
    fractions = [v for k, v in run.items() if ("/" in k and "distinct" not in k) or k.startswith("dn_cbm_name_")]
    assert len(fractions) > 40 and all(0.0 <= v <= 1.0 for v in fractions)
    assert run["dn_cbm_names"] and 0 < run["dn_cbm_alive"] <= 256
