"""Smoke tests of the example scripts with tiny settings."""

from __future__ import annotations

import math

import torch
from _scripts import load_script


def load_example(name: str):
    return load_script(f"examples/{name}.py")


def test_quickstart(tmp_path):
    quickstart = load_example("quickstart")
    threads = torch.get_num_threads()
    out = tmp_path / "q.png"
    log_likelihood = quickstart.main(["--steps", "20", "--out", str(out)])
    assert out.is_file() and out.stat().st_size > 0
    assert math.isfinite(log_likelihood)
    assert torch.get_num_threads() == threads
