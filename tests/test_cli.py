"""End-to-end tests of the ``pyroflows`` command.

The round trip (fit -> info -> sample -> logprob, and the demo) runs as ``python -m
pyroflows`` subprocesses. Starting Python and importing torch costs seconds per process, so
the commands of each stage run concurrently: module-scoped fixtures start a batch of
processes and the tests check their results. Most bad-input cases call `pyroflows.cli.main`
in-process, which returns the exit status and prints the same one-line error.
"""

from __future__ import annotations

import io
import math
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

TINY = "--epochs 3 --layers 2 --hidden 16 --batch-size 64 --quiet"
FLOAT = r"(-?\d+(?:\.\d+)?(?:e[-+]?\d+)?|-?inf|nan)"


@dataclass
class Result:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str

    def __str__(self) -> str:
        return (
            f"pyroflows {' '.join(self.args)} -> {self.returncode}\n"
            f"--- stdout ---\n{self.stdout}\n--- stderr ---\n{self.stderr}"
        )


def run_all(commands: dict[str, str], cwd: Path, timeout: float = 120) -> dict[str, Result]:
    """Run ``python -m pyroflows ARGS`` for every entry at once (arguments split on spaces)."""
    env = dict(os.environ, MPLBACKEND="Agg")
    procs = {
        key: subprocess.Popen(
            [sys.executable, "-m", "pyroflows", *args.split()],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for key, args in commands.items()
    }
    results = {}
    try:
        for key, proc in procs.items():
            stdout, stderr = proc.communicate(timeout=timeout)
            results[key] = Result(commands[key].split(), proc.returncode, stdout, stderr)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


def printed_number(text: str, label: str) -> float:
    match = re.search(re.escape(label) + r"\s*" + FLOAT, text)
    assert match, f"no {label!r} in {text!r}"
    return float(match.group(1))


def assert_ok(result: Result) -> None:
    assert result.returncode == 0, str(result)
    assert "Traceback" not in result.stderr, str(result)


def assert_one_line_error(result: Result, *fragments: str, code: int | None = None) -> None:
    assert result.returncode != 0, str(result)
    if code is not None:
        assert result.returncode == code, str(result)
    assert "Traceback" not in result.stderr, str(result)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, str(result)
    assert lines[0].startswith("pyroflows: error:"), str(result)
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A folder with small tables for every test."""
    root = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(0)
    n = 300
    z = rng.uniform(-1, 1, n)
    x = rng.normal(size=n) + 2 * z
    y = 0.5 * x + rng.normal(size=n) * 0.3
    table = pd.DataFrame({"x": x, "y": y, "z": z})
    table.to_csv(root / "data.csv", index=False)
    table[["x", "y"]].to_csv(root / "xy.csv", index=False)
    pd.DataFrame({"z": [-0.5, 0.0, 0.5, 0.9]}).to_csv(root / "contexts.csv", index=False)
    table[["z"]].iloc[:10].to_csv(root / "short_context.csv", index=False)
    with_nan = table[["x", "y"]].copy()
    with_nan.loc[3, "x"] = np.nan
    with_nan.loc[7, "y"] = np.inf
    with_nan.to_csv(root / "nan.csv", index=False)
    labelled = table[["x", "y"]].copy()
    labelled["label"] = ["a" if v > 0 else "b" for v in x]
    labelled.to_csv(root / "labelled.csv", index=False)
    table[["x"]].to_csv(root / "only_x.csv", index=False)
    (root / "header_only.csv").write_text("x,y\n")
    (root / "empty.csv").write_text("")
    (root / "not_a_model.pt").write_text("just some text\n")
    return root


@pytest.fixture(scope="module")
def first(work: Path) -> dict[str, Result]:
    """Stage 1: fit two models, run the demo, and try bad input that needs no model."""
    return run_all(
        {
            "plain": f"fit xy.csv --out plain.pt {TINY}",
            "cond": f"fit data.csv --context-columns z --out cond.pt {TINY}",
            "demo": "demo --epochs 2 --out demo --quiet",
            # bad input
            "missing_file": "fit missing.csv --out m.pt",
            "not_a_model": "info not_a_model.pt",
        },
        work,
    )


@pytest.fixture(scope="module")
def fitted(first: dict[str, Result]) -> dict[str, Result]:
    return first


@pytest.fixture(scope="module")
def errors(first: dict[str, Result]) -> dict[str, Result]:
    return first


@pytest.fixture(scope="module")
def used(work: Path, fitted: dict[str, Result]) -> dict[str, Result]:
    """Stage 2: everything that reads the fitted models."""
    for key in ("plain", "cond"):
        assert_ok(fitted[key])
    return run_all(
        {
            "info": "info cond.pt",
            "sample": "sample plain.pt -n 50 --seed 1",
            "sample_cond": "sample cond.pt -n 5 --context contexts.csv -o cond_samples.csv",
            "logprob": "logprob plain.pt xy.csv --out lp.csv",
            "logprob_cond": "logprob cond.pt data.csv --out lp_cond.csv",
            # bad input that needs a model
            "context_mismatch": "logprob cond.pt xy.csv --context short_context.csv",
        },
        work,
    )


# --------------------------------------------------------------------------- round trip


def test_fit_prints_heldout_log_likelihood_and_saves(work: Path, fitted: dict[str, Result]):
    for key, model in (("plain", "plain.pt"), ("cond", "cond.pt")):
        result = fitted[key]
        assert_ok(result)
        assert math.isfinite(printed_number(result.stdout, "held-out log-likelihood:"))
        assert (work / model).is_file()


def test_info(used: dict[str, Result]):
    result = used["info"]
    assert_ok(result)
    out = result.stdout
    assert "nsf(" in out and "num_layers=2" in out and "hidden_dims=(16, 16)" in out
    assert re.search(r"dims:\s+2 data, 1 context", out)
    assert re.search(r"columns:\s+x, y", out)
    assert re.search(r"context columns:\s+z", out)
    assert int(re.search(r"parameters:\s+([\d,]+)", out).group(1).replace(",", "")) > 0
    assert "3 epochs" in out and "held-out log-lik" in out


def test_sample_unconditional_to_stdout(used: dict[str, Result]):
    result = used["sample"]
    assert_ok(result)
    table = pd.read_csv(io.StringIO(result.stdout))
    assert list(table.columns) == ["x", "y"]
    assert len(table) == 50
    assert np.isfinite(table.to_numpy()).all()


def test_sample_conditional(work: Path, used: dict[str, Result]):
    assert_ok(used["sample_cond"])
    table = pd.read_csv(work / "cond_samples.csv")
    assert list(table.columns) == ["row", "x", "y"]
    assert len(table) == 4 * 5
    assert table["row"].value_counts().sort_index().to_dict() == {0: 5, 1: 5, 2: 5, 3: 5}
    assert np.isfinite(table[["x", "y"]].to_numpy()).all()


@pytest.mark.parametrize("key, csv", [("logprob", "lp.csv"), ("logprob_cond", "lp_cond.csv")])
def test_logprob_mean_matches_csv(work: Path, used: dict[str, Result], key: str, csv: str):
    result = used[key]
    assert_ok(result)
    table = pd.read_csv(work / csv)
    assert list(table.columns) == ["row", "log_prob"]
    assert len(table) == 300 and table["row"].tolist() == list(range(300))
    assert np.isfinite(table["log_prob"]).all()
    printed = printed_number(result.stdout, "mean log_prob:")
    assert printed == pytest.approx(table["log_prob"].mean(), abs=1e-5)


def test_demo_writes_pngs(work: Path, fitted: dict[str, Result]):
    result = fitted["demo"]
    assert_ok(result)
    for name in ("data", "samples", "density", "training", "overview"):
        path = work / "demo" / f"{name}.png"
        assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert math.isfinite(printed_number(result.stdout, "held-out log-likelihood:"))
    assert "demo" in result.stdout


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "key, fragments",
    [("missing_file", ["no such file", "missing.csv"]), ("not_a_model", ["not a pyroflows model"])],
)
def test_bad_input_is_one_line(errors: dict[str, Result], key: str, fragments: list[str]):
    assert_one_line_error(errors[key], *fragments, code=1)


def test_context_rows_must_match_data_rows(used: dict[str, Result]):
    assert_one_line_error(used["context_mismatch"], "10 rows", "300", code=1)


# --------------------------------------------------------------------------- in-process
# The other cases through `main` itself, which returns the exit status and prints the same
# line: no process start-up, so many cases cost little.


def call(capsys, work: Path, command: str) -> Result:
    """``main(command.split())`` run in ``work``."""
    from pyroflows.cli import main

    args = command.split()
    cwd = os.getcwd()
    os.chdir(work)
    try:
        code = main(args)
    finally:
        os.chdir(cwd)
    captured = capsys.readouterr()
    return Result(args, code, captured.out, captured.err)


def test_fit_drop_nan_says_how_many(capsys, work: Path):
    command = "fit nan.csv --drop-nan --flow maf --bounds x=-100: -o dropnan.pt " + TINY
    result = call(capsys, work, command)
    assert_ok(result)
    assert "dropped 2 row(s)" in result.stderr
    assert "298 rows" in result.stdout
    assert (work / "dropnan.pt").is_file()


def test_logprob_drop_nan_to_stdout(capsys, work: Path, fitted: dict[str, Result]):
    result = call(capsys, work, "logprob plain.pt nan.csv --drop-nan")
    assert_ok(result)
    table = pd.read_csv(io.StringIO(result.stdout))
    assert len(table) == 298 and not {3, 7} & set(table["row"])
    assert "dropped 2 row(s)" in result.stderr
    printed = printed_number(result.stderr, "mean log_prob:")
    assert printed == pytest.approx(table["log_prob"].mean(), abs=1e-5)


@pytest.mark.parametrize(
    "command, fragments, code",
    [
        ("sample plain.pt", ["-n"], 2),
        ("fit data.csv --out m.pt --flow glow", ["glow"], 2),
        ("fit labelled.csv --out m.pt", ["'label'", "not numeric"], 1),
        ("fit nan.csv --out m.pt", ["NaN", "3, 7", "--drop-nan"], 1),
        ("fit header_only.csv --out m.pt", ["no rows"], 1),
        ("fit data.csv --columns x nope --out m.pt", ["'nope'"], 1),
        ("sample nowhere.pt -n 3", ["no such file", "nowhere.pt"], 1),
        ("fit empty.csv --out m.pt", ["is empty"], 1),
        ("fit xy.csv --context short_context.csv --out m.pt", ["10 rows", "300"], 1),
        ("fit xy.csv --out no_such_folder/m.pt", ["no_such_folder"], 1),
        ("fit xy.csv --out m.pt --bounds x=0:", ["outside", "'x'"], 1),
        ("fit xy.csv --out m.pt --bounds q=0:1", ["'q'"], 1),
        ("fit data.csv --out m.pt --flow maf --bins 4", ["--bins"], 1),
        ("logprob plain.pt only_x.csv", ["'y'", "only_x.csv"], 1),
        ("logprob plain.pt nan.csv", ["3, 7"], 1),
        ("sample cond.pt -n 3", ["conditional", "--context"], 1),
        ("sample plain.pt -n 3 --context contexts.csv", ["unconditional"], 1),
        ("info xy.csv", ["not a pyroflows model"], 1),
    ],
)
def test_more_bad_input(capsys, work, fitted, command: str, fragments: list[str], code: int):
    assert_one_line_error(call(capsys, work, command), *fragments, code=code)


def test_no_command(capsys):
    from pyroflows.cli import main

    assert main([]) == 2
    assert "choose a command" in capsys.readouterr().err
