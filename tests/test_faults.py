"""Faults while writing: signals, full disks, unwritable folders. No file is ever damaged.

Each test runs the writer in a subprocess (the Python API or the ``pyroflows`` command),
injects the fault, and checks that the previous file is byte-for-byte intact, or replaced
by a complete new one, and that the error is one line naming the path.
"""

from __future__ import annotations

import os
import random
import resource
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from pyroflows import flows, load, save

PYTHON = sys.executable


def _saver_script(path: Path) -> str:
    return textwrap.dedent(
        f"""
        import torch
        from pyroflows import flows, save
        flow = flows.maf(64, num_layers=2, hidden_dims=(256, 256))  # about 2 MB
        print("ready", flush=True)
        while True:
            save(flow, {str(path)!r})
        """
    )


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_a_save_killed_at_random_moments_leaves_a_valid_file(tmp_path, sig):
    path = tmp_path / "model.pt"
    save(flows.maf(2, num_layers=1), path)
    rng = random.Random(0)
    for _ in range(3):
        before = path.read_bytes()
        process = subprocess.Popen(
            [PYTHON, "-c", _saver_script(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        assert process.stdout.readline().strip() == b"ready"
        time.sleep(rng.uniform(0.0, 0.3))
        process.send_signal(sig)
        process.wait(timeout=60)
        after = path.read_bytes()
        assert after == before or load(path).input_dim in (2, 64)  # old file, or a whole new one
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "model.pt"]
    assert all(name.startswith(".model.pt.") for name in leftovers), leftovers


def _limit_file_size(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of a signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_save_on_a_full_disk_keeps_the_old_model(tmp_path):
    path = tmp_path / "model.pt"
    save(flows.maf(2, num_layers=1), path)
    before = path.read_bytes()
    script = textwrap.dedent(
        f"""
        import sys
        from pyroflows import flows, save
        try:
            save(flows.maf(64, num_layers=4, hidden_dims=(512, 512)), {str(path)!r})
        except OSError as error:
            sys.exit(str(error))
        """
    )
    result = subprocess.run(
        [PYTHON, "-c", script],
        capture_output=True,
        text=True,
        preexec_fn=_limit_file_size(1_000_000),
        timeout=120,
    )
    assert result.returncode == 1
    assert str(path) in result.stderr and "Traceback" not in result.stderr
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def _cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYTHON, "-m", "pyroflows", *args], capture_output=True, text=True, timeout=300, **kwargs
    )


@pytest.fixture()
def table(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3000, 2)) @ np.array([[1.0, 0.5], [0.0, 1.0]])
    path = tmp_path / "data.csv"
    path.write_text("a,b\n" + "\n".join(f"{u:.6f},{v:.6f}" for u, v in x) + "\n")
    return path


def _one_line_error(stderr: str, *names: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("pyroflows: error:"), stderr
    for name in names:
        assert name in lines[0], stderr


def test_cli_sample_on_a_full_disk_keeps_the_old_table(tmp_path, table):
    model, out = tmp_path / "m.pt", tmp_path / "samples.csv"
    assert _cli("fit", str(table), "--out", str(model), "--epochs", "1", "-q").returncode == 0
    out.write_text("previous,content\n1,2\n")
    result = _cli(
        "sample",
        str(model),
        "-n",
        "200000",
        "--out",
        str(out),
        preexec_fn=_limit_file_size(500_000),
    )
    assert result.returncode == 1
    _one_line_error(result.stderr, str(out))
    assert out.read_text() == "previous,content\n1,2\n"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_cli_fit_interrupted_at_random_moments_keeps_the_previous_model(tmp_path, table, sig):
    model = tmp_path / "m.pt"
    assert _cli("fit", str(table), "--out", str(model), "--epochs", "1", "-q").returncode == 0
    started = time.perf_counter()
    subprocess.run([PYTHON, "-c", "import pyroflows.cli"], check=True)
    startup = time.perf_counter() - started  # an interrupt before the command starts is Python's
    rng = random.Random(1)
    for _ in range(2):
        before = model.read_bytes()
        process = subprocess.Popen(
            [PYTHON, "-m", "pyroflows", "fit", str(table), "--out", str(model), "--epochs", "3"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        time.sleep(2 * startup + rng.uniform(0.0, 2.5))
        process.send_signal(sig)
        _, stderr = process.communicate(timeout=120)
        assert model.read_bytes() == before or load(model).input_dim == 2
        if sig == signal.SIGINT:  # before the end: "interrupted", 130; after: a normal exit
            assert process.returncode in (0, 130) and b"Traceback" not in stderr, stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_cli_fit_into_a_read_only_folder_is_one_line(tmp_path, table):
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        result = _cli("fit", str(table), "--out", str(folder / "m.pt"), "--epochs", "1", "-q")
    finally:
        folder.chmod(0o755)
    assert result.returncode == 1
    _one_line_error(result.stderr, str(folder))
