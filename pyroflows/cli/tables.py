"""Reading and writing CSV tables: one reader for every command, atomic or streamed output."""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TextIO

import numpy as np
import torch

from .._optional import require
from ..files import atomic_write
from ..training import find_bad_rows
from .paths import STDIO
from .text import CLIError, names_text, note, printable, rows_text

if TYPE_CHECKING:
    import pandas as pd

#: Format of floats computed in float32 (log-densities, samples of a flow without data maps).
FLOAT_FORMAT = "%.8g"
#: Format of values that went through a flow's float64 data maps: shortest exact decimal.
EXACT_FORMAT = None
#: Separators that, found inside a single column, mean the table was read with the wrong one.
_OTHER_SEPARATORS = {";": "';'", "\t": "tab", "|": "'|'", ",": "','"}


@dataclass(frozen=True)
class Dialect:
    """How the input tables are written: field separator and decimal mark."""

    sep: str = ","
    decimal: str = "."

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Dialect:
        """The ``--sep`` and ``--decimal`` options of a command."""
        if args.sep == args.decimal:
            raise CLIError(f"--sep and --decimal are both {args.sep!r}; they must differ")
        return cls(args.sep, args.decimal)


def input_name(path: str) -> str:
    """The name of an input in messages: ``<stdin>`` for ``-``."""
    return "<stdin>" if path == STDIO else printable(path)


def table_name(table: pd.DataFrame) -> str:
    """The name `read_table` attached to ``table``."""
    return table.attrs.get("name", "the table")


def read_table(path: str, dialect: Dialect) -> pd.DataFrame:
    """Read a CSV table with a header row (``-``: stdin); one-line errors for the usual problems."""
    pd = require("pandas", "cli")

    name = input_name(path)
    if path != STDIO and not os.path.exists(path):
        raise CLIError(f"no such file: {name}")
    source = io.StringIO(sys.stdin.read()) if path == STDIO else path
    try:
        header = pd.read_csv(source, sep=dialect.sep, header=None, nrows=1, dtype=str)
        if path == STDIO:
            source.seek(0)
        with warnings.catch_warnings(record=True) as caught:  # extra fields: a ParserWarning
            warnings.simplefilter("always", pd.errors.ParserWarning)
            table = pd.read_csv(source, sep=dialect.sep, decimal=dialect.decimal, index_col=False)
    except pd.errors.EmptyDataError:
        raise CLIError(f"{name} is empty (no header, no rows)") from None
    except pd.errors.ParserError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else "parse error"
        raise CLIError(f"cannot read {name} as CSV: {first}") from None
    except UnicodeDecodeError:
        raise CLIError(f"{name} is not a text CSV file") from None
    if len(table) == 0:
        raise CLIError(f"{name} has no rows (only a header)")
    extra = any(issubclass(w.category, pd.errors.ParserWarning) for w in caught)
    _check_dialect(table, name, dialect, extra)
    _check_header([str(v) for v in header.iloc[0].tolist()], name)
    table.attrs["name"] = name
    return table


def _check_dialect(table: pd.DataFrame, name: str, dialect: Dialect, extra: bool) -> None:
    """Refuse a table read with the wrong separator: one glued column, or ``extra`` fields."""
    if len(table.columns) == 1:
        guess = _separator_hint(table, dialect, extra)
        if guess:
            raise CLIError(
                f"{name} looks separated by {guess[0]}, not {dialect.sep!r}: it was read as "
                f"one column {names_text([table.columns[0]])}; pass {guess[1]}"
            )
    if extra:
        raise CLIError(
            f"{name}: the rows have more fields than the header ({len(table.columns)} columns); "
            "check the separator (--sep) and the decimal mark (--decimal)"
        )


def _check_header(names: list[str], name: str) -> None:
    """Refuse a header with a repeated name, or a first row of numbers (no header at all)."""
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise CLIError(f"{name}: column {names_text(repeated[:1])} appears twice in the header")
    if all(_is_number(n) for n in names):
        raise CLIError(
            f"{name}: the first row holds only numbers; the first row must name the columns "
            "(add a header row)"
        )


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _separator_hint(table: pd.DataFrame, dialect: Dialect, extra: bool) -> tuple[str, str] | None:
    """(separator, ``--sep X [--decimal ,]``) if the one column holds another separator."""
    header = str(table.columns[0])
    values = [] if extra else [str(v) for v in table.iloc[:5, 0].tolist()]
    for sep, shown in _OTHER_SEPARATORS.items():
        in_values = sep != "," and any(sep in v for v in values)
        if sep == dialect.sep or not (sep in header or in_values):
            continue
        commas = (extra and dialect.sep == ",") or any("," in v for v in values)
        decimal = sep != "," and dialect.decimal != "," and commas
        return shown, f"--sep {shown}" + (" --decimal ," if decimal else "")
    return None


def check_columns(table: pd.DataFrame, columns: Sequence[str], hint: str = "") -> None:
    """Raise naming the first of ``columns`` missing from ``table``."""
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise CLIError(
            f"{table_name(table)} has no column {names_text(missing[:1])}{hint} "
            f"(its columns: {names_text(table.columns)})"
        )


def numeric(table: pd.DataFrame, columns: Sequence[str]) -> np.ndarray:
    """The ``columns`` of ``table`` as a float64 array; names the first non-numeric value."""
    pd = require("pandas", "cli")
    from pandas.api.types import is_bool_dtype, is_numeric_dtype

    arrays = []
    for column in columns:
        series = table[column]
        if not (is_numeric_dtype(series) or is_bool_dtype(series)):
            converted = pd.to_numeric(series, errors="coerce")
            bad = np.flatnonzero((converted.isna() & series.notna()).to_numpy())
            if len(bad):
                value = series.iloc[bad[0]]
                comma = "; pass --decimal , for decimal commas" if "," in str(value) else ""
                raise CLIError(
                    f"column {names_text([column])} of {table_name(table)} is not numeric "
                    f"(row {bad[0]}: {printable(repr(value))}){comma}"
                )
            series = converted
        arrays.append(series.to_numpy(dtype=np.float64, na_value=np.nan))
    return np.stack(arrays, axis=1) if arrays else np.empty((len(table), 0))


def finite_rows(arrays: Sequence[np.ndarray | None], name: str, drop: bool | None) -> np.ndarray:
    """Mask of the rows without NaN/Inf (`pyroflows.training.find_bad_rows`) in ``arrays``.

    Rows with NaN/Inf are an error unless ``drop`` (then they are dropped with a note);
    ``drop=None`` means the command has no ``--drop-nan`` option.
    """
    present = [a for a in arrays if a is not None and a.shape[1]]
    keep = np.ones(len(arrays[0]), dtype=bool)
    if not present:
        return keep
    bad = find_bad_rows(torch.from_numpy(np.concatenate(present, axis=1))).numpy()
    if len(bad) == 0:
        return keep
    keep[bad] = False
    where = f"row(s) {rows_text(bad.tolist())} (counted from 0, header excluded)"
    if not drop:
        hint = "; pass --drop-nan to drop them" if drop is not None else ""
        raise CLIError(f"{name} has {len(bad)} row(s) with NaN or Inf: {where}{hint}")
    if not keep.any():
        raise CLIError(f"every row of {name} has NaN or Inf: nothing left after --drop-nan")
    note(f"dropped {len(bad)} row(s) with NaN or Inf from {name}: {where}")
    return keep


@contextlib.contextmanager
def open_output(path: str | None) -> Iterator[TextIO]:
    """Standard output for ``None``/``-``; otherwise an atomic text file (see `atomic_write`)."""
    if path is None or path == STDIO:
        yield sys.stdout
        sys.stdout.flush()
        return
    with atomic_write(path, "w") as handle:
        yield handle


def write_rows(
    handle: TextIO, frame: pd.DataFrame, header: bool, float_format: str | None = FLOAT_FORMAT
) -> None:
    """Append ``frame`` to a CSV being written (its header, made printable, when ``header``)."""
    names = [printable(c) for c in frame.columns] if header else False
    frame.to_csv(handle, index=False, header=names, float_format=float_format)
