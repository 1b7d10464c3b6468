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


def test_two_moons_npe(tmp_path):
    """The posterior-estimation tutorial end to end with tiny settings: figures written, a
    C2ST in [0, 1] and a coverage gap; its exact reference sampler stays in the prior."""
    two_moons = load_example("two_moons_npe")
    result = two_moons.main(
        ["--simulations", "500", "--epochs", "3", "--draws", "300", "--coverage-pairs", "30"]
        + ["--out", str(tmp_path)]
    )
    assert 0.0 <= result["c2st"] <= 1.0 and 0.0 <= result["max_gap"] <= 1.0
    assert (tmp_path / "two_moons_posterior.png").is_file()
    assert (tmp_path / "two_moons_coverage.png").is_file()
    draws = two_moons.reference_draws(two_moons.OBSERVATION, 2000, torch.Generator())
    assert draws.shape == (2000, 2) and bool((draws.abs() < 1).all())
