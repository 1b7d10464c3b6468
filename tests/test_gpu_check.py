"""The one-shot GPU check's argument handling, and its CPU-only path (it stops before CUDA)."""

from __future__ import annotations

import pytest
import torch
from _scripts import load_script


@pytest.fixture(scope="module")
def gpu_check():
    return load_script("benchmarks/gpu_check.py")


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--budget", "5"], "--budget"),
        (["--dims", "8,x"], "--dims"),
        (["--batches", "0"], "--batches"),
        (["--rounds", "0"], "--rounds"),
        (["--wheels", "no_such_folder"], "--wheels"),
    ],
)
def test_bad_arguments_exit_with_one_line(gpu_check, argv, fragment, capsys):
    with pytest.raises(SystemExit) as stop:
        gpu_check.parse_args(argv)
    assert stop.value.code == 2
    assert fragment in capsys.readouterr().err.strip().splitlines()[-1]


def test_commands_cover_the_cuda_suites_and_the_spline_speed_table(gpu_check, tmp_path):
    args = gpu_check.parse_args(["--dims", "32", "--batches", "16384,65536", "--no-compile"])
    tests = gpu_check.test_command()
    assert tests[tests.index("--device") + 1] == "cuda"
    assert all((gpu_check.ROOT / s).exists() for s in tests if s.startswith("tests/"))
    speed = gpu_check.speed_command(args, tmp_path / "s.md")
    assert speed[speed.index("--batch") + 1] == "16384,65536" and "--compile" not in speed
    assert "--compile" in gpu_check.speed_command(gpu_check.parse_args([]), tmp_path / "s.md")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the path without CUDA")
def test_without_cuda_it_reports_and_stops(gpu_check, tmp_path):
    out = tmp_path / "report.md"
    assert gpu_check.main(["--out", str(out)]) == 2
    text = out.read_text()
    assert "no CUDA device" in text and "## Tests on CUDA" not in text
    assert f"torch {torch.__version__}" in text
