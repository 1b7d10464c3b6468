"""``benchmarks/reproduce.py``: the quick versions of the published tables still give the
stored numbers (slow), and the comparison flags a number that moved (fast, no training)."""

from __future__ import annotations

import json

import pytest
from _scripts import load_script


@pytest.fixture(scope="module")
def reproduce():
    return load_script("benchmarks/reproduce.py")


@pytest.mark.slow
def test_published_tables_reproduce(reproduce):
    """Every check reruns its quick command and matches ``benchmarks/reproduce.json``."""
    stored = reproduce.load_store(reproduce.STORE)
    results = reproduce.run_checks(list(reproduce.CHECKS), stored)
    bad = [r.line() for r in results if r.status not in ("ok", "skipped")]
    assert not bad, "\n".join(bad)


def _fake_registry(reproduce, monkeypatch, **numbers: float) -> None:
    check = reproduce.Check("fake", "docs/none.md", "python fake.py", lambda: dict(numbers))
    absent = reproduce.Check(
        "absent", "docs/none.md", "python absent.py", lambda: {}, needs=("no/such/file.csv",)
    )
    monkeypatch.setattr(reproduce, "CHECKS", {"fake": check, "absent": absent})


def test_a_moved_number_differs(reproduce, monkeypatch, tmp_path, capsys):
    _fake_registry(reproduce, monkeypatch, loglik=-2.61, khat=0.30)
    store = tmp_path / "stored.json"
    store.write_text(json.dumps({"fake": {"loglik": 5.0, "khat": 0.34}}))
    assert reproduce.main(["--store", str(store)]) == 1
    out = capsys.readouterr().out
    assert "fake: DIFFERS: loglik stored 5 now -2.61 (tolerance 0.02)" in out
    assert "khat" not in out  # 0.04 apart: within k-hat's tolerance of 0.05
    assert "absent: skipped (missing no/such/file.csv)" in out


def test_record_then_compare_is_ok(reproduce, monkeypatch, tmp_path, capsys):
    _fake_registry(reproduce, monkeypatch, loglik=-2.61, khat=float("nan"))
    store = tmp_path / "stored.json"
    assert reproduce.main(["--record", "--store", str(store)]) == 0
    saved = json.loads(store.read_text())
    assert saved["_meta"]["threads"] == 1 and "absent" not in saved
    assert reproduce.main(["--store", str(store), "--only", "fake"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("fake: ok")
