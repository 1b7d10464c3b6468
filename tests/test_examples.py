"""Smoke tests of the example scripts with tiny settings."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(
        f"example_{name}", ROOT / "examples" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quickstart(tmp_path):
    quickstart = load_example("quickstart")
    threads = torch.get_num_threads()
    out = tmp_path / "q.png"
    log_likelihood = quickstart.main(["--steps", "20", "--out", str(out)])
    assert out.is_file() and out.stat().st_size > 0
    assert math.isfinite(log_likelihood)
    assert torch.get_num_threads() == threads
