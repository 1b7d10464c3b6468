"""The argument parser of the ``pyroflows`` command and the types of its options.

Option values that are wrong on their face (a negative count, a seed that does not fit in
64 bits, an unknown device name) are usage errors: one line, exit status 2.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from collections.abc import Callable
from typing import NoReturn

from .. import __version__
from .text import PROG, printable

FLOWS = ("nsf", "maf", "realnvp")
TOY_DATASETS = ("two_moons", "eight_gaussians", "checkerboard", "spirals", "rings")
#: Seeds must fit torch's generator: 0 <= seed < 2**63.
SEED_LIMIT = 2**63
_SEPARATORS = {"tab": "\t", "\\t": "\t", "comma": ",", "semicolon": ";"}


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, like the command's other errors."""

    def error(self, message: str) -> NoReturn:
        print(f"{PROG}: error: {printable(message)} (see '{self.prog} --help')", file=sys.stderr)
        raise SystemExit(2)


def _integer(text: str, low: int, high: int | None, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < low or (high is not None and value > high):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
    return value


def int_range(low: int, high: int | None = None, what: str = "") -> Callable[[str], int]:
    """An option type for integers in ``[low, high]``."""
    what = what or (f"an integer from {low} to {high}" if high else f"an integer >= {low}")

    def parse(text: str) -> int:
        return _integer(text, low, high, what)

    parse.__name__ = "integer"
    return parse


positive_int = int_range(1, what="a positive integer")
seed = int_range(0, SEED_LIMIT - 1, "a seed from 0 to 2**63 - 1")
patience = int_range(0, what="a non-negative integer (0: never stop early)")


def threads(text: str) -> int:
    """``--threads``: from 1 to the number of CPUs (more only makes small networks slower)."""
    cpus = os.cpu_count() or 1
    return _integer(text, 1, cpus, f"a thread count from 1 to {cpus} (the CPUs of this machine)")


def positive_float(text: str) -> float:
    """A finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def fraction(text: str) -> float:
    """A number in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction, got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {text}")
    return value


def device(text: str) -> str:
    """``cpu``, ``cuda`` or ``cuda:N`` (whether it exists is checked when the command runs)."""
    if re.fullmatch(r"cpu|cuda(:(0|[1-9][0-9]{0,3}))?", text):
        return text
    raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")


def separator(text: str) -> str:
    """One character, or ``tab``/``\\t``, ``comma``, ``semicolon``."""
    value = _SEPARATORS.get(text, text)
    if len(value) != 1 or value in "\r\n\"'" or value.isalnum() or value in ".-+":
        raise argparse.ArgumentTypeError(
            f"expected one separator character such as ',' ';' '|' or 'tab', got {text!r}"
        )
    return value


def decimal(text: str) -> str:
    """The decimal mark: ``.`` or ``,``."""
    if text not in (".", ","):
        raise argparse.ArgumentTypeError(f"expected '.' or ',', got {text!r}")
    return text


def bounds_item(text: str) -> tuple[str, float | None, float | None]:
    """``COL=LOW:HIGH`` (either side may be empty) as ``(column, low, high)``."""
    name, eq, rest = text.rpartition("=")
    low_text, colon, high_text = rest.partition(":")
    if not eq or not name or not colon:
        raise argparse.ArgumentTypeError(f"{text!r} is not of the form COLUMN=LOW:HIGH (e.g. x=0:)")
    try:
        low = float(low_text) if low_text.strip() else -math.inf
        high = float(high_text) if high_text.strip() else math.inf
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: LOW and HIGH must be numbers or empty"
        ) from None
    if math.isnan(low) or math.isnan(high) or not low < high or low == math.inf:
        raise argparse.ArgumentTypeError(f"{text!r}: need LOW < HIGH (and no NaN)")
    return (
        name,
        None if low == -math.inf else low,
        None if high == math.inf else high,
    )


_EPILOG = """\
examples:
  pyroflows demo
  pyroflows fit data.csv --out model.pt
  pyroflows fit data.csv --out model.pt --context-columns z --bounds mass=0:
  pyroflows info model.pt
  pyroflows sample model.pt -n 1000 --out samples.csv
  pyroflows sample model.pt -n 100 --context contexts.csv
  pyroflows logprob model.pt data.csv --out scores.csv

'-' stands for standard input (tables, models) or standard output (tables).
Run 'pyroflows COMMAND --help' for the options of a command.
"""


def _parents() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """Options every command has, and those of commands reading CSV tables."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--threads",
        type=threads,
        default=None,
        metavar="N",
        help="CPU threads for torch, at most the number of CPUs (default 1: small networks "
        "run fastest on one)",
    )
    tables = argparse.ArgumentParser(add_help=False)
    tables.add_argument(
        "--sep",
        type=separator,
        metavar="C",
        default=",",
        help="field separator of the input tables (default ','; e.g. ';' or tab)",
    )
    tables.add_argument(
        "--decimal",
        type=decimal,
        metavar="C",
        default=".",
        help="decimal mark of the input tables (default '.'; ',' for 1,5)",
    )
    return common, tables


def _add_fit(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "fit",
        parents=parents,
        help="fit a flow to the columns of a CSV table",
        description="Fit a normalizing flow to the numeric columns of a CSV table by maximum "
        "likelihood and save it. Prints the mean log-likelihood per row of the held-out "
        "(validation) rows.",
    )
    p.add_argument("data", metavar="DATA.csv", help="table with a header row ('-' for stdin)")
    p.add_argument("--out", "-o", required=True, metavar="MODEL", help="model file to write")
    p.add_argument(
        "--columns", nargs="+", metavar="COL", help="columns to model (default: all the others)"
    )
    p.add_argument("--context-columns", nargs="+", metavar="COL", help="columns to condition on")
    p.add_argument(
        "--context",
        metavar="CSV",
        help="read the context columns from this other table (same rows as DATA.csv)",
    )
    _add_training_options(p)
    p.add_argument("--device", type=device, help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--drop-nan", action="store_true", help="drop rows with NaN or Inf")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")


def _add_training_options(p: argparse.ArgumentParser) -> None:
    """The flow's architecture and its training settings (``fit``)."""
    p.add_argument("--flow", choices=FLOWS, default="nsf", help="flow type (default nsf)")
    p.add_argument(
        "--coupling", action="store_true", help="nsf only: coupling layers (faster sampling)"
    )
    rule = "default: from the number of rows (see the density guide)"
    p.add_argument("--layers", type=positive_int, metavar="N", help=f"flow layers ({rule})")
    p.add_argument("--hidden", type=positive_int, metavar="W", help=f"hidden width ({rule})")
    p.add_argument("--bins", type=positive_int, metavar="K", help=f"nsf spline bins ({rule})")
    p.add_argument("--epochs", type=positive_int, metavar="N", help=f"most epochs ({rule})")
    p.add_argument("--batch-size", type=positive_int, metavar="B", help=f"rows per step ({rule})")
    p.add_argument("--lr", type=positive_float, default=1e-3, help="learning rate (default 1e-3)")
    p.add_argument(
        "--validation",
        type=fraction,
        default=0.1,
        metavar="FRAC",
        help="fraction of rows held out for validation and early stopping (default 0.1)",
    )
    p.add_argument(
        "--patience",
        type=patience,
        default=20,
        metavar="N",
        help="stop after N epochs without improvement (default 20; 0 never stops early)",
    )
    p.add_argument(
        "--bounds",
        nargs="+",
        type=bounds_item,
        metavar="COL=LOW:HIGH",
        help="declared support of a column, e.g. mass=0: or p=0:1 (either side may be empty)",
    )
    p.add_argument("--seed", type=seed, default=0, help="seed of weights and split (default 0)")


def _add_sample(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "sample",
        parents=parents,
        help="draw rows from a fitted flow",
        description="Draw samples from a model. For a conditional model, draws N samples for "
        "every row of the --context table; the column 'row' gives the context row (from 0). "
        "Rows are written as they are drawn, so N may exceed the memory.",
    )
    p.add_argument("model", metavar="MODEL", help="model file ('-' for stdin)")
    p.add_argument(
        "-n",
        "--num-samples",
        type=positive_int,
        required=True,
        metavar="N",
        help="samples (per context row for a conditional model)",
    )
    p.add_argument("--context", metavar="CSV", help="context rows for a conditional model")
    p.add_argument("--out", "-o", metavar="CSV", help="file to write (default '-': stdout)")
    p.add_argument("--seed", type=seed, default=None, help="random seed (default: not fixed)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")


def _add_logprob(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "logprob",
        parents=parents,
        help="log-density of every row of a table",
        description="Log-density (nats) of every row of a table under a model: writes the "
        "columns 'row' (from 0) and 'log_prob', and prints their mean. Columns are picked by "
        "the names saved with the model.",
    )
    p.add_argument("model", metavar="MODEL", help="model file ('-' for stdin)")
    p.add_argument("data", metavar="DATA.csv", help="table with the model's columns ('-': stdin)")
    p.add_argument("--context", metavar="CSV", help="read the context columns from this table")
    p.add_argument("--out", "-o", metavar="CSV", help="file to write (default '-': stdout)")
    p.add_argument("--drop-nan", action="store_true", help="skip rows with NaN or Inf")


def _add_info_and_demo(
    sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]
) -> None:
    p = sub.add_parser(
        "info",
        parents=parents,
        help="describe a model file",
        description="Print how a model was built, its columns, size and training summary.",
    )
    p.add_argument("model", metavar="MODEL", help="model file ('-' for stdin)")
    p = sub.add_parser(
        "demo",
        parents=parents,
        help="fit a flow to a 2-D toy density and plot it",
        description="Fit a small neural spline flow to a built-in 2-D toy density and write "
        "PNG plots (data, samples, density, training curve, overview), the model and the data "
        "into a folder.",
    )
    p.add_argument("--out", "-o", default="pyroflows-demo", metavar="DIR", help="output folder")
    p.add_argument("--dataset", default="two_moons", choices=TOY_DATASETS, help="default two_moons")
    p.add_argument("--epochs", type=positive_int, default=40, metavar="N", help="default 40")
    p.add_argument(
        "--num-points", type=int_range(10), default=10_000, metavar="N", help="default 10000"
    )
    p.add_argument("--resolution", type=int_range(2, 2000), default=200, help=argparse.SUPPRESS)
    p.add_argument("--dpi", type=int_range(10, 1200), default=110, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=seed, default=0, help="seed of data and weights (default 0)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``pyroflows`` command."""
    common, tables = _parents()
    parser = _Parser(
        prog=PROG,
        description="Normalizing flows from the command line: fit a flow to the columns of a "
        "CSV table, sample from it, score rows, or run a demo.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"pyroflows {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    _add_fit(sub, [common, tables])
    _add_sample(sub, [common, tables])
    _add_logprob(sub, [common, tables])
    _add_info_and_demo(sub, [common])
    return parser
