"""Malformed and unusual CSV tables through the command line: a result or one line.

Every table below is given to ``pyroflows fit`` and ``pyroflows logprob``. The command must
either succeed on a table that means what it seems to mean, or exit with status 1 or 2 and
one line ``pyroflows: error: ...`` on stderr; never a traceback, and never a fit of a table
it misread (a semicolon file read as one text column, a header-less file whose first row
became the header).
"""

from __future__ import annotations

import numpy as np
import pytest

from pyroflows.cli import main

rng = np.random.default_rng(0)
_ROWS = rng.normal(size=(40, 2))
_GOOD = "a,b\n" + "\n".join(f"{u:.5f},{v:.5f}" for u, v in _ROWS) + "\n"

# name -> (bytes of the file, whether it is a valid two-column numeric table)
TABLES: dict[str, tuple[bytes, bool]] = {
    "plain": (_GOOD.encode(), True),
    "crlf": (_GOOD.replace("\n", "\r\n").encode(), True),
    "utf8_bom": (b"\xef\xbb\xbf" + _GOOD.encode(), True),
    "quoted_numbers": (
        ('"a","b"\n' + "\n".join(f'"{u:.5f}","{v:.5f}"' for u, v in _ROWS) + "\n").encode(),
        True,
    ),
    "semicolon_decimal_comma": (
        _GOOD.replace(",", ";").replace(".", ",").encode(),
        False,
    ),
    "tab_separated": (_GOOD.replace(",", "\t").encode(), False),
    "pipe_separated": (_GOOD.replace(",", "|").encode(), False),
    "utf16": (_GOOD.encode("utf-16"), False),
    "binary": (bytes(range(256)) * 8, False),
    "null_bytes": (_GOOD.replace("\n1", "\n\x001").encode(), False),
    "empty": (b"", False),
    "header_only": (b"a,b\n", False),
    "one_row": (b"a,b\n1.0,2.0\n", False),
    "ragged_rows": (_GOOD.replace("\n0.", "\n0.1,9,").encode(), False),
    "empty_cells": (_GOOD.replace("\n-", "\n,").encode(), False),
    "text_column": (_GOOD.replace("\n0.", "\nabc,", 1).encode(), False),
    "duplicate_columns": (_GOOD.replace("a,b", "a,a", 1).encode(), False),
    "no_header": (_GOOD.split("\n", 1)[1].encode(), False),
    "inf_text": (_GOOD.replace("\n-", "\ninf,", 1).encode(), False),
    "nan_text": (_GOOD.replace("\n0.", "\nnan,", 1).encode(), False),
    "beyond_float64": ((_GOOD + "1e400,1.0\n").encode(), False),
    "long_field": (("a,b\n" + "1" * 100_000 + ",2\n" + _GOOD.split("\n", 1)[1]).encode(), False),
}


def _run(argv: list[str], capsys) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


def _check(code: int, err: str, valid: bool, name: str) -> None:
    assert "Traceback" not in err, f"{name}: {err}"
    if valid:
        assert code == 0, f"{name}: {err}"
        return
    lines = [line for line in err.splitlines() if line.strip()]
    assert code in (1, 2), f"{name}: a table that cannot be right was accepted"
    assert len(lines) == 1 and lines[0].startswith("pyroflows: error:"), f"{name}: {err}"


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("model")
    (folder / "good.csv").write_text(_GOOD)
    path = str(folder / "m.pt")
    assert main(["fit", str(folder / "good.csv"), "--out", path, "--epochs", "1", "-q"]) == 0
    return path


@pytest.mark.parametrize("name", sorted(TABLES))
def test_fit_reads_a_table_or_refuses_it_in_one_line(name, tmp_path, capsys):
    content, valid = TABLES[name]
    path = tmp_path / "table.csv"
    path.write_bytes(content)
    argv = ["fit", str(path), "--out", str(tmp_path / "m.pt"), "--epochs", "1", "-q"]
    code, err = _run(argv, capsys)
    _check(code, err, valid, name)
    assert (tmp_path / "m.pt").exists() == (code == 0)


@pytest.mark.parametrize("name", sorted(TABLES))
def test_logprob_reads_a_table_or_refuses_it_in_one_line(name, model, tmp_path, capsys):
    content, valid = TABLES[name]
    path = tmp_path / "table.csv"
    path.write_bytes(content)
    out = tmp_path / "scores.csv"
    code, err = _run(["logprob", model, str(path), "--out", str(out)], capsys)
    _check(code, err, valid or name == "one_row", name)
    assert out.exists() == (code == 0)
