"""``pyroflows sample``: draw rows from a fitted flow, streamed to CSV in chunks."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from typing import Any, TextIO

import numpy as np
import torch

from .._optional import require
from ..distribution import Flow
from .models import CHUNK_ROWS, input_dtype, load_model, model_columns
from .paths import STDIO, check_inputs, check_output
from .tables import (
    EXACT_FORMAT,
    FLOAT_FORMAT,
    Dialect,
    check_columns,
    finite_rows,
    numeric,
    open_output,
    read_table,
    table_name,
    write_rows,
)
from .text import CLIError, names_text, printable, say

#: Show a progress bar (on a terminal) from this many rows on.
PROGRESS_ROWS = 4 * CHUNK_ROWS

Chunk = tuple[np.ndarray | None, torch.Tensor]


def _context(
    args: argparse.Namespace, flow: Flow, context_columns: list[str]
) -> torch.Tensor | None:
    """The ``--context`` rows of a conditional model (``None`` for an unconditional one)."""
    if not flow.context_dim:
        if args.context is not None:
            raise CLIError(f"{printable(args.model)} is unconditional; leave out --context")
        return None
    if args.context is None:
        raise CLIError(
            f"{printable(args.model)} is conditional on {names_text(context_columns)}: "
            "pass --context CSV with those columns"
        )
    table = read_table(args.context, Dialect.from_args(args))
    check_columns(table, context_columns, ", a context column of the model")
    c = numeric(table, context_columns)
    finite_rows([c], table_name(table), None)
    return torch.from_numpy(c).to(input_dtype(flow, True))


@torch.no_grad()
def sample_chunks(flow: Flow, n: int, context: torch.Tensor | None) -> Iterator[Chunk]:
    """``n`` samples (per context row), at most about ``CHUNK_ROWS`` rows at a time.

    Yields (context row of each sample or ``None``, samples), in the order of the output:
    all samples of context row 0, then of row 1, ...
    """
    dtype = input_dtype(flow)  # float64 through the data maps: no rounding of their output
    if context is None:
        d = flow.condition(None)
        for start in range(0, n, CHUNK_ROWS):
            yield None, d.sample((min(CHUNK_ROWS, n - start),), dtype=dtype)
        return
    block = max(1, CHUNK_ROWS // n)  # context rows per chunk
    per_draw = min(n, CHUNK_ROWS)  # samples per context row per draw
    for first in range(0, len(context), block):
        d = flow.condition(context[first : first + block])
        for start in range(0, n, per_draw):
            m = min(per_draw, n - start)
            x = d.sample((m,), dtype=dtype).transpose(0, 1)  # (rows of the block, m, D)
            rows = np.repeat(np.arange(first, first + x.shape[0]), m)
            yield rows, x.reshape(-1, flow.input_dim)


def _row_column(columns: list[str]) -> str:
    """``row``, or ``row_``, ``row__``, ... if a data column is called that."""
    name = "row"
    while name in columns:
        name += "_"
    return name


def _write(handle: TextIO, chunks: Iterator[Chunk], columns: list[str], bar: Any) -> int:
    """Write the chunks as CSV rows (header first); returns the number of rows."""
    pd = require("pandas", "cli")

    written = 0
    for rows, x in chunks:
        exact = x.dtype == torch.float64  # through float64 data maps: write every digit
        frame = pd.DataFrame(x.double().numpy(), columns=columns)
        if rows is not None:
            frame.insert(0, _row_column(columns), rows)
        write_rows(handle, frame, written == 0, EXACT_FORMAT if exact else FLOAT_FORMAT)
        written += len(frame)
        bar.update(len(frame))
    return written


def run(args: argparse.Namespace) -> int:
    """Run ``pyroflows sample``."""
    check_inputs([("MODEL", args.model), ("--context", args.context)])
    check_output(args.out, [args.model, args.context])
    flow = load_model(args.model)
    columns, context_columns = model_columns(
        flow.metadata, flow.input_dim, flow.context_dim, printable(args.model)
    )
    context = _context(args, flow, context_columns)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    total = args.num_samples * (1 if context is None else len(context))
    show = not args.quiet and total >= PROGRESS_ROWS and sys.stderr.isatty()
    from tqdm.auto import tqdm

    chunks = sample_chunks(flow, args.num_samples, context)
    with tqdm(total=total, unit="row", disable=not show, file=sys.stderr, leave=False) as bar:
        with open_output(args.out) as handle:
            written = _write(handle, chunks, columns, bar)
    if args.out not in (None, STDIO):
        say(f"wrote {written} rows to {args.out}")
    return 0
