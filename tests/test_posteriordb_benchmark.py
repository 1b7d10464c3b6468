"""CI smoke test of ``benchmarks/posteriordb/run.py --quick`` (two posteriors, three guides)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from _scripts import load_script

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "posteriordb"

pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"posteriordb data not found at {DATA}")


def _load_runner():
    # run.py imports models.py and metrics.py by name
    return load_script("benchmarks/posteriordb/run.py", siblings=True)


def test_quick_run(tmp_path, capsys):
    run = _load_runner()
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    out_file = tmp_path / "table.md"
    out = run.main(["--quick", "--data", str(DATA), "--out", str(out_file)])
    assert torch.get_default_dtype() == dtype and torch.get_num_threads() == threads

    names, guides = list(run.QUICK_POSTERIORS), list(run.QUICK_GUIDES)
    assert list(out["results"]) == names
    for name in names:
        row = out["results"][name]
        assert math.isfinite(row["noise_floor"]["sliced_w2"])
        assert set(row["guides"]) == set(guides)
        for guide, cells in row["guides"].items():
            (cell,) = cells  # one seed
            for key in ("sliced_w2", "energy", "z_mean", "log_sd", "khat", "fit_seconds"):
                assert math.isfinite(cell[key]), (name, guide, key, cell)
            assert cell["finite"] == 1.0 and cell["steps"] <= run.QUICK.max_steps
        # AutoFlow with its defaults is preconditioned at the mode on both posteriors
        assert "at the mode" in row["guides"]["AutoFlow"][0]["preconditioning"]

    # the Markdown table: a header with every guide, one row per posterior
    table = out_file.read_text()
    header = next(line for line in table.splitlines() if line.startswith("| posterior"))
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "posterior",
        "noise floor",
        *guides,
    ]
    for name in names:
        row = next(line for line in table.splitlines() if line.startswith(f"| {name} |"))
        assert len(row.strip("|").split("|")) == len(guides) + 2
    assert table.splitlines()[0] in capsys.readouterr().out
    saved = json.loads(out_file.with_suffix(".json").read_text())
    assert saved["table"] == out["table"] and saved["settings"] == out["settings"]
