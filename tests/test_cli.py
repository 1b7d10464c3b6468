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
    assert "nsf(" in out and "num_layers=2" in out
    assert re.search(r"hidden_dims=[(\[]16, 16[)\]]", out)
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
    assert list(pd.read_csv(work / "demo" / "data.csv").columns) == ["x", "y"]
    assert (work / "demo" / "model.pt").is_file()
    assert [p.name for p in (work / "demo").iterdir() if p.name.endswith(".tmp")] == []


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
        ("fit xy.csv --out m.pt --bounds x=0:", ["outside", "xy.csv", "x=0:"], 1),
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


def test_package_exports_and_entry_points():
    from pyroflows.cli import CLIError, build_parser, main

    assert callable(main) and issubclass(CLIError, Exception)
    assert build_parser().prog == "pyroflows"
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert 'pyroflows = "pyroflows.cli:main"' in pyproject


# --------------------------------------------------------------------------- helpers


def snapshot(work: Path, *names: str) -> dict[str, bytes]:
    return {name: (work / name).read_bytes() for name in names}


def assert_unchanged(work: Path, before: dict[str, bytes]) -> None:
    for name, content in before.items():
        assert (work / name).read_bytes() == content, f"{name} was changed"


def leftovers(folder: Path) -> list[str]:
    """Temporary files an atomic write would leave behind."""
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


def start(args: list[str], cwd: Path, **kwargs) -> subprocess.Popen:
    env = dict(os.environ, MPLBACKEND="Agg", OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, "-m", "pyroflows", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **kwargs,
    )


# --------------------------------------------------------------------------- 1. outputs


@pytest.mark.parametrize(
    "command, victim",
    [
        ("sample plain.pt -n 3 --out plain.pt", "plain.pt"),
        ("logprob plain.pt xy.csv --out plain.pt", "plain.pt"),
        ("logprob plain.pt xy.csv --out xy.csv", "xy.csv"),
        ("fit xy.csv --out xy.csv", "xy.csv"),
        ("fit xy.csv --context contexts.csv --out contexts.csv", "contexts.csv"),
        ("sample cond.pt -n 2 --context contexts.csv --out contexts.csv", "contexts.csv"),
        (
            "logprob cond.pt xy.csv --context short_context.csv -o short_context.csv",
            "short_context.csv",
        ),
        ("sample plain.pt -n 3 --out plain_link.pt", "plain.pt"),  # a link to the input
    ],
)
def test_output_that_is_an_input_is_refused(capsys, work, fitted, command, victim):
    link = work / "plain_link.pt"
    if not link.exists():
        link.symlink_to(work / "plain.pt")
    before = snapshot(work, victim)
    result = call(capsys, work, command + " --epochs 100000")  # refused before any training
    if result.returncode == 2:  # sample/logprob have no --epochs: run without it
        result = call(capsys, work, command)
    assert_one_line_error(result, "also an input", code=1)
    assert result.stdout == ""
    assert_unchanged(work, before)


@pytest.mark.parametrize(
    "command, fragments",
    [
        ("sample plain.pt -n 3 --out no_folder/x.csv", ["no_folder", "does not exist"]),
        ("logprob plain.pt xy.csv --out no_folder/x.csv", ["no_folder", "does not exist"]),
        ("fit xy.csv --out no_folder/m.pt", ["no_folder", "does not exist"]),
        ("sample plain.pt -n 3 --out a_folder/", ["a_folder/", "directory"]),
        ("sample plain.pt -n 3 --out a_folder", ["a_folder", "directory"]),
        ("fit xy.csv --out a_folder", ["a_folder", "directory"]),
        ("sample plain.pt -n 3 --out /dev/null", ["/dev/null", "not a regular file"]),
    ],
)
def test_unwritable_output_is_one_line(capsys, work, fitted, command, fragments):
    (work / "a_folder").mkdir(exist_ok=True)
    assert_one_line_error(call(capsys, work, command), *fragments, code=1)
    assert not (work / "no_folder").exists()


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes anywhere")
def test_read_only_folder_is_one_line(capsys, work, fitted):
    folder = work / "read_only"
    folder.mkdir(exist_ok=True)
    folder.chmod(0o555)
    try:
        result = call(capsys, work, "sample plain.pt -n 3 --out read_only/x.csv")
    finally:
        folder.chmod(0o755)
    assert_one_line_error(result, "read_only", "not writable", code=1)


def _wait_for(proc: subprocess.Popen, ready, timeout: float = 60) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the command did not start"
        time.sleep(0.05)


@pytest.mark.skipif(not hasattr(__import__("signal"), "SIGXFSZ"), reason="needs POSIX signals")
def test_failed_or_interrupted_sample_keeps_the_previous_file(work, fitted):
    """A file-size limit and Ctrl-C in the middle of writing: the old file stays."""
    import resource
    import signal

    for name in ("limited.csv", "interrupted.csv"):
        (work / name).write_text("x,y\n1,2\n")
    before = snapshot(work, "limited.csv", "interrupted.csv")

    def limit():  # files may not grow past 20 kB
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    sample = ["sample", "plain.pt", "-n"]
    limited = start([*sample, "200000", "--out", "limited.csv"], work, preexec_fn=limit)
    interrupted = start([*sample, "100000000", "--out", "interrupted.csv"], work)
    _wait_for(interrupted, lambda: any(n.startswith(".interrupted") for n in leftovers(work)))
    interrupted.send_signal(signal.SIGINT)
    out, err = limited.communicate(timeout=120)
    assert_one_line_error(Result([], limited.returncode, out.decode(), err.decode()), code=1)
    assert "limited.csv" in err.decode() and "File too large" in err.decode()
    out, err = interrupted.communicate(timeout=60)
    assert interrupted.returncode == 130, err
    assert err.decode() == "pyroflows: interrupted\n"
    assert_unchanged(work, before)
    assert leftovers(work) == []


def test_interrupted_fit_keeps_the_previous_model(capsys, monkeypatch, work, fitted):
    from pyroflows.cli import fit

    def interrupted_fit(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(fit, "fit", interrupted_fit)
    before = snapshot(work, "plain.pt")
    result = call(capsys, work, f"fit xy.csv --out plain.pt {TINY}")
    assert result.returncode == 130 and result.stderr == "pyroflows: interrupted\n"
    assert_unchanged(work, before)


def test_broken_pipe_is_quiet(capsys, monkeypatch, work, fitted):
    class ClosedPipe(io.StringIO):
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    result = call(capsys, work, "sample plain.pt -n 100")
    assert result.returncode == 1 and result.stderr == ""


# --------------------------------------------------------------------------- 2. streaming


@pytest.mark.parametrize("n, chunk", [(50, 16), (5, 8), (20, 8), (3, 1000)])
def test_sample_streams_in_chunks(capsys, monkeypatch, work, fitted, n, chunk):
    from pyroflows.cli import sample, tables

    monkeypatch.setattr(sample, "CHUNK_ROWS", chunk)
    sizes = []
    write_rows = tables.write_rows

    def recording(handle, frame, header, *args):
        sizes.append(len(frame))
        write_rows(handle, frame, header, *args)

    monkeypatch.setattr(sample, "write_rows", recording)
    result = call(capsys, work, f"sample cond.pt -n {n} --context contexts.csv --seed 0")
    assert_ok(result)
    assert max(sizes) <= max(chunk, n) and sum(sizes) == 4 * n
    table = pd.read_csv(io.StringIO(result.stdout))
    assert list(table.columns) == ["row", "x", "y"]  # one header, then only rows
    assert table["row"].tolist() == np.repeat(np.arange(4), n).tolist()
    assert np.isfinite(table[["x", "y"]].to_numpy()).all()
    if chunk >= n:  # unconditional: chunks of CHUNK_ROWS
        sizes.clear()
        assert_ok(call(capsys, work, f"sample plain.pt -n {3 * n + 1}"))
        assert max(sizes) <= chunk and sum(sizes) == 3 * n + 1


def test_sample_float_format(capsys, work, fitted):
    result = call(capsys, work, "sample plain.pt -n 20 --seed 3")
    assert_ok(result)
    # Samples leave the model's float64 data maps: each value is written as the shortest
    # decimal that reads back as the same float64 (no digits lost, none invented).
    for line in result.stdout.splitlines()[1:]:
        for value in line.split(","):
            assert repr(float(value)) == value, value


def test_sample_is_seeded_and_reports_rows(capsys, work, fitted):
    first = call(capsys, work, "sample plain.pt -n 10 --seed 5 --out s1.csv")
    second = call(capsys, work, "sample plain.pt -n 10 --seed 5 --out -")
    assert_ok(first) and assert_ok(second)
    assert "wrote 10 rows to s1.csv" in first.stdout
    assert (work / "s1.csv").read_text() == second.stdout


# --------------------------------------------------------------------------- 3. "-"


def test_dash_refused_where_a_file_is_needed(capsys, work, fitted):
    for command, fragment in [
        ("fit xy.csv --out -", "binary"),
        ("demo --out -", "folder"),
        ("fit - --context - --out m.pt", "standard input"),
        ("logprob - - ", "standard input"),
    ]:
        assert_one_line_error(call(capsys, work, command), fragment, code=1)
    assert not (work / "-").exists()


def test_dash_reads_stdin(capsys, monkeypatch, work, fitted):
    monkeypatch.setattr(sys, "stdin", io.StringIO((work / "xy.csv").read_text()))
    result = call(capsys, work, "logprob plain.pt - --out -")
    assert_ok(result)
    assert len(pd.read_csv(io.StringIO(result.stdout))) == 300
    model = io.TextIOWrapper(io.BytesIO((work / "plain.pt").read_bytes()))
    monkeypatch.setattr(sys, "stdin", model)
    result = call(capsys, work, "info -")
    assert_ok(result)
    assert re.search(r"model:\s+<stdin>", result.stdout)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"not a model")))
    assert_one_line_error(call(capsys, work, "sample - -n 2"), "<stdin>", code=1)


def test_fit_from_stdin(capsys, monkeypatch, work):
    monkeypatch.setattr(sys, "stdin", io.StringIO((work / "xy.csv").read_text()))
    result = call(capsys, work, f"fit - --out stdin.pt {TINY}")
    assert_ok(result)
    from pyroflows.io import describe

    assert describe(work / "stdin.pt").metadata["settings"]["data"] == "<stdin>"


# --------------------------------------------------------------------------- 4. options


@pytest.mark.parametrize(
    "command, fragments, code",
    [
        ("fit xy.csv --out m.pt --device foo", ["--device", "cpu, cuda or cuda:N"], 2),
        ("fit xy.csv --out m.pt --device mps", ["--device", "'mps'"], 2),
        ("fit xy.csv --out m.pt --device meta", ["--device", "'meta'"], 2),
        ("fit xy.csv --out m.pt --device=", ["--device", "''"], 2),
        ("fit xy.csv --out m.pt --threads 100000", ["--threads", "CPUs"], 2),
        ("sample plain.pt -n 3 --threads 0", ["--threads"], 2),
        ("fit xy.csv --out m.pt --seed 1180591620717411303424", ["--seed", "2**63"], 2),
        ("sample plain.pt -n 3 --seed -1", ["--seed", "2**63"], 2),
        ("demo --seed 9223372036854775808", ["--seed"], 2),
        ("fit xy.csv --out m.pt --patience -1", ["--patience", "non-negative"], 2),
        ("fit xy.csv --out m.pt --epochs 0", ["--epochs", "positive"], 2),
        ("fit xy.csv --out m.pt --layers -2", ["--layers"], 2),
        ("fit xy.csv --out m.pt --bounds x=1:0", ["LOW < HIGH"], 2),
        ("fit xy.csv --out m.pt --bounds x=0: x=-1:", ["'x'", "more than once"], 1),
        (
            "fit data.csv --out m.pt --context data.csv",
            ["data table itself", "--context-columns"],
            1,
        ),
        ("fit xy.csv --out m.pt --sep ab", ["--sep"], 2),
        ("fit xy.csv --out m.pt --decimal ,", ["--sep and --decimal"], 1),
        ("fit xy.csv --out m.pt --columns x x", ["--columns", "'x'"], 1),
    ],
)
def test_bad_options_are_one_line(capsys, work, command, fragments, code):
    result = call(capsys, work, command)
    assert_one_line_error(result, *fragments, code=code)
    assert not (work / "m.pt").exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="CUDA is available")
def test_cuda_without_cuda_is_one_line(capsys, work):
    result = call(capsys, work, "fit xy.csv --out m.pt --device cuda:0")
    assert_one_line_error(result, "CUDA is not available", code=1)


def test_cuda_index_must_exist(monkeypatch):
    import torch

    from pyroflows.cli import CLIError
    from pyroflows.cli.fit import check_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert check_device("cuda:1") == "cuda:1" and check_device("cpu") == "cpu"
    with pytest.raises(CLIError, match="2 CUDA device"):
        check_device("cuda:2")


def test_patience_zero_and_largest_seed_work(capsys, work):
    seed = 2**63 - 1
    result = call(capsys, work, f"fit xy.csv --out p0.pt --patience 0 --seed {seed} {TINY}")
    assert_ok(result)
    assert_ok(call(capsys, work, f"sample p0.pt -n 2 --seed {seed}"))


def test_threads_are_restored(capsys, work, fitted):
    import torch

    before = torch.get_num_threads()
    assert_ok(call(capsys, work, f"sample plain.pt -n 2 --threads {os.cpu_count()}"))
    assert torch.get_num_threads() == before


# --------------------------------------------------------------------------- 5. dialects


@pytest.fixture(scope="module")
def dialects(work: Path) -> Path:
    table = pd.read_csv(work / "xy.csv")
    table.to_csv(work / "semi.csv", sep=";", decimal=",", index=False)
    table.to_csv(work / "tab.csv", sep="\t", index=False)
    table.to_csv(work / "pipe.csv", sep="|", index=False)
    (work / "extra.csv").write_text("x,y\n1,2,3\n4,5,6\n")
    return work


@pytest.mark.parametrize(
    "name, fragments",
    [
        ("semi.csv", ["--sep ';'", "--decimal ,", "one column"]),
        ("tab.csv", ["--sep tab"]),
        ("pipe.csv", ["--sep '|'"]),
        ("extra.csv", ["more fields than the header", "--sep"]),
    ],
)
def test_wrong_separator_is_refused_with_a_hint(capsys, dialects, name, fragments):
    for command in (f"fit {name} --out m.pt", f"logprob plain.pt {name}"):
        assert_one_line_error(call(capsys, dialects, command), name, *fragments, code=1)


def test_sep_and_decimal_options(capsys, dialects, fitted):
    reference = call(capsys, dialects, "logprob plain.pt xy.csv")
    semi = call(capsys, dialects, "logprob plain.pt semi.csv --sep ; --decimal ,")
    tab = call(capsys, dialects, "logprob plain.pt tab.csv --sep tab")
    for result in (reference, semi, tab):
        assert_ok(result)
    expected = pd.read_csv(io.StringIO(reference.stdout))["log_prob"]
    for result in (semi, tab):
        got = pd.read_csv(io.StringIO(result.stdout))["log_prob"]
        np.testing.assert_allclose(got, expected, rtol=1e-6)
    hint = call(capsys, dialects, "logprob plain.pt semi.csv --sep ;")
    assert_one_line_error(hint, "not numeric", "--decimal ,", code=1)


# --------------------------------------------------------------------------- 6. library checks


def test_nan_rows_use_the_library_check(capsys, monkeypatch, work):
    from pyroflows.cli import tables

    calls = []
    original = tables.find_bad_rows
    monkeypatch.setattr(tables, "find_bad_rows", lambda t: calls.append(t.shape) or original(t))
    assert_one_line_error(call(capsys, work, "fit nan.csv --out m.pt"), "3, 7", code=1)
    assert calls == [(300, 2)]


def test_bounds_are_checked_by_fit_after_drop_nan(capsys, work):
    result = call(capsys, work, "fit nan.csv --drop-nan --out m.pt --bounds y=0:")
    assert result.stderr.startswith("pyroflows: dropped 2 row(s)")
    result.stderr = result.stderr.split("\n", 1)[1]  # the note, then one line of error
    assert_one_line_error(result, "nan.csv", "outside", "after dropping", "y=0:", code=1)
    assert not (work / "m.pt").exists()


def test_context_bounds_reach_the_model(capsys, work):
    command = f"fit data.csv --context-columns z --bounds z=-1:1 x=-100: --out zb.pt {TINY}"
    assert_ok(call(capsys, work, command))
    result = call(capsys, work, "info zb.pt")
    assert_ok(result)
    assert "x > -100" in result.stdout and "-1 < z < 1" in result.stdout


# --------------------------------------------------------------------------- 7-8. info, metadata


def test_printable_escapes_control_characters():
    from pyroflows.cli.text import printable

    assert printable("a\x1b[31mb") == "a\\x1b[31mb"
    assert printable("1\n2\r3\t4") == "1\\n2\\r3\\t4"
    assert printable("rtl\u202eoverride") == "rtl\\u202eoverride"
    assert printable("naïve 中文 x") == "naïve 中文 x"


def _save(path: Path, metadata: object) -> None:
    from pyroflows import flows, save

    flow = flows.maf(2, num_layers=1, hidden_dims=(4,))
    flow.metadata = metadata
    save(flow, path)


def test_hostile_metadata_is_printed_escaped(capsys, work):
    _save(
        work / "evil.pt",
        {
            "columns": ["a\x1b[2Jb", "c\nd"],
            "created_by": "x\r\x1b]0;title\x07",
            "history": {"epochs_run": "many", "wall_time": [1], "heldout_log_likelihood": "?"},
            "settings": {"data": "d\u202eabc"},
        },
    )
    info = call(capsys, work, "info evil.pt")
    sample = call(capsys, work, "sample evil.pt -n 2")
    for result in (info, sample):
        assert_ok(result)
        assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f\u202e]", result.stdout + result.stderr)
    assert "a\\x1b[2Jb, c\\nd" in info.stdout and "x\\r\\x1b]0;title\\x07" in info.stdout
    assert sample.stdout.splitlines()[0] == "a\\x1b[2Jb,c\\nd"
    assert len(sample.stdout.splitlines()) == 3


@pytest.mark.parametrize(
    "metadata",
    [
        {"columns": [1, 2]},
        {"columns": ["a"]},
        {"columns": ["a", "a"]},
        {"columns": "ab"},
        {"columns": ["a", "b"], "context_columns": ["c"]},
    ],
)
def test_malformed_metadata_is_one_line(capsys, work, metadata):
    _save(work / "malformed.pt", metadata)
    for command in ("info malformed.pt", "sample malformed.pt -n 2", "logprob malformed.pt xy.csv"):
        assert_one_line_error(call(capsys, work, command), "malformed.pt", "metadata", code=1)


def test_info_groups_layers():
    from pyroflows.cli.info import group_layers

    assert group_layers(["A", "A", "A", "B", "A"]) == ["3 x A", "B", "A"]
    assert group_layers([]) == []


def test_info_uses_describe_not_load(capsys, monkeypatch, work, fitted):
    import pyroflows.io

    def no_load(*args, **kwargs):
        raise AssertionError("info must not build the flow")

    from pyroflows.cli import models

    monkeypatch.setattr(models, "load", no_load)
    result = call(capsys, work, "info plain.pt")
    assert_ok(result)
    assert re.search(r"layers:\s+2 x ", result.stdout)
    assert pyroflows.io.describe is models.describe


# --------------------------------------------------------------------------- 9. errors


def test_damaged_model_files_are_one_line(capsys, work, fitted):
    content = (work / "plain.pt").read_bytes()
    (work / "truncated.pt").write_bytes(content[: len(content) // 2])
    (work / "a_model_folder").mkdir(exist_ok=True)
    for command in ("info truncated.pt", "sample truncated.pt -n 2", "info a_model_folder"):
        assert_one_line_error(call(capsys, work, command), code=1)


# --------------------------------------------------------------------------- 10. demo


def test_plot_demo_returns_the_figures():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from pyroflows import datasets, flows
    from pyroflows.plot import plot_demo

    flow = flows.nsf(2, coupling=True, num_layers=1, hidden_dims=(8,))
    history = {"train_loss": [2.0, 1.5], "val_loss": [2.1, 1.6], "best_epoch": 1}
    with torch.no_grad():
        samples = flow().sample((100,))
    figures = plot_demo(datasets.two_moons(100), samples, flow, history, title="t", resolution=10)
    assert list(figures) == ["data", "samples", "density", "training", "overview"]
    assert all(isinstance(f, matplotlib.figure.Figure) for f in figures.values())
    plt.close("all")


def test_demo_refuses_a_file_as_folder(capsys, work):
    (work / "a_file").write_text("keep")
    assert_one_line_error(call(capsys, work, "demo --out a_file"), "a_file", code=1)
    assert (work / "a_file").read_text() == "keep"


def test_large_offset_column_is_scored_and_sampled_in_float64(tmp_path):
    """A column 1.7e9 +- 100 keeps its spread: float32 would round it to multiples of 128."""
    from pyroflows import load
    from pyroflows.cli import main

    rng = np.random.default_rng(0)
    a, b = 1.7e9 + 100 * rng.normal(size=400), rng.normal(size=400)
    data = tmp_path / "big.csv"
    data.write_text(
        "a,b\n" + "\n".join(f"{u:.3f},{v:.6f}" for u, v in zip(a, b, strict=True)) + "\n"
    )
    model, scores, samples = tmp_path / "m.pt", tmp_path / "s.csv", tmp_path / "x.csv"
    # A negligible learning rate keeps the flow at its start: the standard normal, scaled
    # by the Standardize map that `fit` stores (in float64).
    argv = ["fit", str(data), "--out", str(model), "--epochs", "1", "--lr", "1e-12", "-q"]
    assert main(argv) == 0
    assert main(["logprob", str(model), str(data), "--out", str(scores)]) == 0
    assert main(["sample", str(model), "-n", "2000", "--seed", "0", "--out", str(samples)]) == 0
    got = pd.read_csv(scores)["log_prob"].to_numpy()
    standardize = load(model).data_transforms[0]
    loc, scale = standardize.loc.numpy(), standardize.scale.numpy()
    z = (np.stack([a, b], axis=1) - loc) / scale
    truth = -0.5 * (z**2).sum(1) - math.log(2 * math.pi) - np.log(scale).sum()
    assert np.abs(got - truth).max() < 1e-3  # float32 rounding of 1.7e9 would cost ~0.5 nats
    drawn = pd.read_csv(samples)["a"].to_numpy()
    assert 80 < drawn.std() < 120 and len(np.unique(np.round(drawn) % 128)) > 100


def test_fit_refuses_a_flow_its_file_could_not_hold(tmp_path, capsys):
    from pyroflows.cli import main

    data = tmp_path / "d.csv"
    data.write_text("a,b\n" + "\n".join(f"{i},{i % 7}" for i in range(50)) + "\n")
    for option in (["--hidden", "100000"], ["--layers", "5000", "--hidden", "2"]):
        assert main(["fit", str(data), "--out", str(tmp_path / "m.pt"), *option, "-q"]) == 1
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "choose smaller --hidden, --layers or --bins" in err
    assert not (tmp_path / "m.pt").exists()


def test_main_restores_the_file_size_signal(tmp_path, capsys):
    import signal

    from pyroflows.cli import main

    before = signal.getsignal(signal.SIGXFSZ)
    assert main(["info", str(tmp_path / "missing.pt")]) == 1
    assert signal.getsignal(signal.SIGXFSZ) == before
