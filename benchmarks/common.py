"""Shared by the benchmark scripts: arguments, the machine line, mean +- std, the JSON results."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
from pathlib import Path

import lightning
import torch

RESULTS = Path(__file__).parent / "results"


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (0, 1, ...)")
    p.add_argument("--quick", action="store_true", help="a tiny run that only checks the script works")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder of the JSON results")
    return p


def machine_line() -> str:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return (
        f"Machine: {os.cpu_count()} CPU cores ({platform.machine()}), torch {torch.__version__}, "
        f"lightning {lightning.__version__}, device {device}, {torch.get_num_threads()} torch threads"
    )


def mean_std(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    mean = statistics.fmean(values) * scale
    std = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def write_json(out: Path, name: str, payload: dict) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps({"machine": machine_line(), **payload}, indent=2))
    return path
