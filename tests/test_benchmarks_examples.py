"""Smoke tests of ``examples/photo_z.py`` and ``benchmarks/density.py`` with tiny settings."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from _scripts import load_script

ROOT = Path(__file__).resolve().parents[1]
GALAXIES = ROOT / ".." / "shared" / "data" / "galaxies" / "galaxies.csv"

needs_galaxies = pytest.mark.skipif(
    not GALAXIES.is_file(), reason=f"galaxy data not found at {GALAXIES}"
)


@pytest.fixture(scope="module")
def density():
    return load_script("benchmarks/density.py")


def _finite_results(out: dict, tasks: list[str], libraries: list[str]) -> None:
    assert set(out["results"]) == set(tasks)
    for task in tasks:
        assert set(out["results"][task]) == set(libraries), out["notes"]
        for lib, cell in out["results"][task].items():
            assert math.isfinite(cell["mean"]), (task, lib, cell)
            assert cell["params"] > 0 and cell["steps"] > 0
        assert task in out["table"]


def _importable(*names: str) -> list[str]:
    return [n for n in names if importlib.util.find_spec(n) is not None]


@needs_galaxies
def test_photo_z_smoke(tmp_path):
    photo_z = load_script("examples/photo_z.py")
    threads = torch.get_num_threads()
    metrics = photo_z.main(
        ["--data", str(GALAXIES), "--epochs", "1", "--rows", "2000", "--out", str(tmp_path)]
        + ["--quiet"]
    )
    assert torch.get_num_threads() == threads
    assert metrics["n_train"] + metrics["n_val"] + metrics["n_test"] == 2000
    for key in ("test_log_likelihood", "val_log_likelihood", "pit_ks", "median_sigma_nmad"):
        assert math.isfinite(metrics[key]), key
    for level in (50, 68, 90, 95):
        assert 0.0 <= metrics[f"coverage_{level}"] <= 1.0
    assert metrics["coverage_50"] <= metrics["coverage_95"]
    assert 0.0 <= metrics["pit_ks"] <= 1.0
    assert sum(metrics["pit_hist_counts"]) == metrics["n_test"]
    # The sampled PIT agrees with the exact one up to Monte Carlo noise (500 samples).
    assert metrics["pit_sampling_vs_exact"] < 0.05
    for name in ("pit.png", "median_vs_true.png", "metrics.json"):
        assert (tmp_path / name).stat().st_size > 0


def test_photo_z_missing_data(tmp_path, capsys):
    photo_z = load_script("examples/photo_z.py")
    with pytest.raises(SystemExit):
        photo_z.main(["--data", str(tmp_path / "nowhere.csv")])
    assert "galaxy data not found" in capsys.readouterr().err


def test_density_quick_toys(density):
    tasks = ["two_moons", "checkerboard"]
    libraries = ["pyroflows", *_importable("zuko", "pyro")]
    threads = torch.get_num_threads()
    out = density.main(
        ["--quick", "--tasks", ",".join(tasks), "--libraries", ",".join(libraries)]
        + ["--steps", "10", "--quiet"]
    )
    assert torch.get_num_threads() == threads
    _finite_results(out, tasks, libraries)
    # Matched architectures: every library has the same number of parameters.
    for task in tasks:
        assert len({cell["params"] for cell in out["results"][task].values()}) == 1


@needs_galaxies
def test_density_quick_galaxies(density, tmp_path):
    tasks = ["galaxies", "photo_z"]
    libraries = ["pyroflows", *_importable("zuko", "pyro")]
    table = tmp_path / "table.md"
    out = density.main(
        ["--quick", "--tasks", ",".join(tasks), "--libraries", ",".join(libraries)]
        + ["--data", str(GALAXIES), "--steps", "10", "--out", str(table), "--quiet"]
    )
    _finite_results(out, tasks, libraries)
    assert "photo_z (D=1 given C=6)" in table.read_text()


def test_density_skips_missing_anchor(density, monkeypatch):
    builder = density.BUILDERS["zuko"][1]
    monkeypatch.setitem(density.BUILDERS, "zuko", ("no_such_module_for_pyroflows", builder))
    out = density.main(
        ["--quick", "--tasks", "rings", "--libraries", "pyroflows,zuko", "--steps", "3"]
        + ["--quiet"]
    )
    assert list(out["results"]["rings"]) == ["pyroflows"]
    assert any("skipped zuko" in note for note in out["notes"])
    assert "n/a" in out["table"]


def test_density_rejects_unknown_task(density):
    with pytest.raises(SystemExit):
        density.main(["--tasks", "no_such_task"])


def test_sbibm_quick_mode_recovers_the_builtin_gaussian_posterior(tmp_path):
    """``benchmarks/sbibm.py --quick`` (what CI runs, no sbibm needed): one fit on 2,000
    simulations of a Gaussian task with a closed-form posterior, C2ST near 0.5, files written."""
    sbibm_benchmark = load_script("benchmarks/sbibm.py")
    out, numbers = tmp_path / "sbibm.md", tmp_path / "sbibm.json"
    (result,) = sbibm_benchmark.main(["--quick", "--out", str(out), "--json", str(numbers)])
    assert result["method"] == "pyroflows" and len(result["c2st"]) == 2
    assert result["mean"] < 0.6
    assert "gaussian_2d_builtin | 2,000" in out.read_text()
    assert numbers.exists()


def test_density_ablations_build_what_they_say(density):
    arch = density.Architecture(layers=5, hidden=(64, 64), bins=8, batch_size=256)
    x = torch.randn(64, 2)

    def initial_log_prob(library: str) -> torch.Tensor:
        torch.manual_seed(0)
        model = density.BUILDERS[library][1](2, 0, arch)
        with torch.no_grad():
            return model.log_prob(x, None)

    identity = torch.distributions.Normal(0.0, 1.0).log_prob(x).sum(-1)
    torch.testing.assert_close(initial_log_prob("pyroflows"), identity)  # zero-initialised
    far = (initial_log_prob("pyroflows-random-init") - identity).abs().mean()
    near = (initial_log_prob("pyroflows-small-init") - identity).abs().mean()
    assert 0 < near < far
    torch.manual_seed(0)
    lu = density.BUILDERS["pyroflows-lu"][1](2, 0, arch).module
    assert sum(type(layer).__name__ == "LULinear" for layer in lu.layers) == arch.layers - 1
    out = density.main(
        ["--quick", "--tasks", "rings", "--steps", "3", "--quiet", "--libraries"]
        + [",".join(density.EXTRA_LIBRARIES[1:])]
    )
    _finite_results(out, ["rings"], list(density.EXTRA_LIBRARIES[1:]))


def test_defaults_benchmark_compares_old_and_new_defaults():
    defaults = load_script("benchmarks/defaults.py")
    results = defaults.main(["--quick", "--tasks", "two_moons"])
    by_variant = {r["variant"]: r for r in results}
    assert by_variant["old"]["batch_size"] == 512 and by_variant["new"]["batch_size"] == 64
    assert all(math.isfinite(r["test_ll"]) for r in results)


@needs_galaxies
def test_defaults_benchmark_bound_variants():
    defaults = load_script("benchmarks/defaults.py")
    split = defaults.make_split("photo_z", True, GALAXIES)
    scales = {}
    for variant in ("log", "fitted"):
        flow, options = defaults.bound_variant(variant, split, 0, True)
        x, c = split.x_train.float(), split.c_train.float()
        defaults.fit(flow, x, context=c, progress=False, **options)
        scales[variant] = float(flow.data_transforms[-1].scale)
    assert scales["log"] == math.inf and math.isfinite(scales["fitted"])
