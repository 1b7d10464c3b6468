"""Smoke test of ``benchmarks/speed.py``: the one-command speed benchmark, in seconds."""

from __future__ import annotations

import importlib.util
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _scripts import load_script
from torch.distributions import Distribution


@pytest.fixture(scope="module")
def speed():
    return load_script("benchmarks/speed.py")


def _importable(*names: str) -> list[str]:
    return [n for n in names if importlib.util.find_spec(n) is not None]


def test_speed_quick_run(speed, tmp_path):
    libraries = ["pyroflows", *_importable("zuko", "pyro")]
    threads, validate = torch.get_num_threads(), Distribution._validate_args
    out = speed.main(
        ["--quick", "--libraries", ",".join(libraries), "--out", str(tmp_path / "speed.md")]
        + ["--quiet"]
    )
    assert torch.get_num_threads() == threads
    assert Distribution._validate_args == validate
    assert set(out["configs"]) == set(out["results"])
    flows = {cfg.flow for cfg in out["configs"].values()}
    assert flows == set(speed.FLOWS)
    for key, cells in out["results"].items():
        for name in ("pyroflows", "floor"):
            cell = cells[name]
            assert not cell.note, (key, name, cell.note)
            assert cell.params > 0
            assert math.isfinite(cell.memory) and cell.memory > 0
            measures = ("train", "sample") if key.startswith("iaf-svi") else speed.MEASURES[:3]
            for measure in measures:
                assert math.isfinite(cell.median(measure)) and cell.median(measure) > 0, (
                    key,
                    name,
                    measure,
                )
        # Matched architectures: parameter counts within 5% of each other.
        counts = [c.params for lib, c in cells.items() if lib != "floor" and not c.note]
        assert max(counts) <= 1.05 * min(counts), (key, counts)
    text = (tmp_path / "speed.md").read_text()
    for title in ("Parameter counts", "Training step", "log_prob", "Sampling", "Peak memory"):
        assert title in text
    assert "Machine:" in text


def test_speed_skips_a_missing_library(speed, monkeypatch):
    monkeypatch.setitem(speed.MODULES, "zuko", "no_such_module_for_pyroflows")
    out = speed.main(
        ["--quick", "--flows", "maf", "--contexts", "0", "--libraries", "pyroflows,zuko"]
        + ["--quiet"]
    )
    assert any("zuko" in note for note in out["notes"])
    assert set(next(iter(out["results"].values()))) == {"pyroflows", "floor"}


def test_speed_rejects_unknown_flow(speed):
    with pytest.raises(SystemExit):
        speed.main(["--flows", "no_such_flow"])


def test_paired_comparison_runs_and_leaves_the_process_as_it_was():
    root = Path(__file__).resolve().parents[1]
    inside = (
        shutil.which("git")
        and subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True).returncode
        == 0
    )
    if not inside:
        pytest.skip("needs a git checkout (the base revision is read with git archive)")
    paired = load_script("benchmarks/paired.py")
    threads, validate = torch.get_num_threads(), Distribution._validate_args
    rows = paired.main(
        ["--base", "HEAD", "--flows", "maf,iaf", "--dims", "2", "--contexts", "0"]
        + ["--rounds", "2"]
    )
    assert [(r[0], r[3]) for r in rows] == [
        ("maf", "train"),
        ("maf", "log_prob"),
        ("maf", "sample"),
        ("iaf", "train"),
        ("iaf", "sample"),
    ]
    assert all(math.isfinite(r[4]) and r[4] > 0 for r in rows)
    assert torch.get_num_threads() == threads and Distribution._validate_args == validate
    assert not any(m.startswith("pyroflows_base") for m in sys.modules)
