"""``pyroflows logprob``: the log-density of every row of a table under a model."""

from __future__ import annotations

import argparse

import numpy as np
import torch

from .._optional import require
from .models import input_dtype, load_model, log_prob, model_columns
from .paths import STDIO, check_distinct, check_inputs, check_output
from .tables import (
    Dialect,
    check_columns,
    finite_rows,
    numeric,
    open_output,
    read_table,
    table_name,
    write_rows,
)
from .text import CLIError, note, printable, say


def _rows(
    args: argparse.Namespace, columns: list[str], context_columns: list[str]
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """The data (and context) rows to score, and the mask of the rows kept."""
    dialect = Dialect.from_args(args)
    table = read_table(args.data, dialect)
    context_table = table if args.context is None else read_table(args.context, dialect)
    check_columns(table, columns, ", a data column of the model")
    x = numeric(table, columns)
    c = None
    if context_columns:
        check_columns(context_table, context_columns, ", a context column of the model")
        c = numeric(context_table, context_columns)
        if len(c) != len(x):
            raise CLIError(
                f"context file {table_name(context_table)} has {len(c)} rows but "
                f"{table_name(table)} has {len(x)}; they must match row for row"
            )
    keep = finite_rows([x, c], table_name(table), args.drop_nan)
    return x[keep], None if c is None else c[keep], keep


def _report(args: argparse.Namespace, values: np.ndarray) -> None:
    message = f"mean log_prob: {float(np.mean(values)):.6f} nats per row over {len(values)} rows"
    outside = int(np.sum(np.isneginf(values)))
    if outside:
        message += f" ({outside} row(s) outside the model's support have log_prob -inf)"
    if args.out in (None, STDIO):
        note(message)
    else:
        say(message)
        say(f"wrote {len(values)} rows to {args.out}")


def run(args: argparse.Namespace) -> int:
    """Run ``pyroflows logprob``."""
    pd = require("pandas", "cli")

    check_inputs([("MODEL", args.model), ("DATA.csv", args.data), ("--context", args.context)])
    check_distinct(args.data, args.context, "leave out --context: DATA.csv is read for them")
    check_output(args.out, [args.model, args.data, args.context])
    flow = load_model(args.model)
    name = printable(args.model)
    columns, context_columns = model_columns(flow.metadata, flow.input_dim, flow.context_dim, name)
    if args.context is not None and not flow.context_dim:
        raise CLIError(f"{name} is unconditional; leave out --context")
    x, c, keep = _rows(args, columns, context_columns)
    x_t = torch.from_numpy(x).to(input_dtype(flow))
    c_t = None if c is None else torch.from_numpy(c).to(input_dtype(flow, True))
    values = torch.cat(list(log_prob(flow, x_t, c_t))).double().numpy()
    table = pd.DataFrame({"row": np.flatnonzero(keep), "log_prob": values})
    with open_output(args.out) as handle:
        write_rows(handle, table, header=True)
    _report(args, values)
    return 0
