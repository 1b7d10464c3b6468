"""``pyroflows fit``: fit a flow to the columns of a CSV table and save it."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .. import __version__, flows
from ..distribution import Flow
from ..io import MAX_LAYERS, MAX_PARAMETERS, builder_size, save
from ..training import FitHistory, fit
from ..training.sizing import flow_size
from .models import input_dtype, log_prob
from .paths import check_distinct, check_inputs, check_output
from .tables import Dialect, check_columns, finite_rows, numeric, read_table, table_name
from .text import CLIError, names_text, say

Bound = tuple[float | None, float | None]


@dataclass
class Inputs:
    """The columns to fit, read and checked."""

    columns: list[str]
    context_columns: list[str]
    x: np.ndarray
    c: np.ndarray | None
    data_name: str
    context_name: str | None
    dropped: int


def check_device(name: str | None) -> str | None:
    """``name`` if this machine has that device; ``cpu``/``cuda``/``cuda:N`` was checked."""
    if name is None or name == "cpu":
        return name
    if not torch.cuda.is_available():
        raise CLIError(f"--device {name}: CUDA is not available on this machine; use cpu")
    index = int(name.partition(":")[2] or 0)
    count = torch.cuda.device_count()
    if index >= count:
        raise CLIError(
            f"--device {name}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}"
        )
    return name


def _check_options(args: argparse.Namespace) -> None:
    """Everything about the command line that needs no file read."""
    check_inputs([("DATA.csv", args.data), ("--context", args.context)])
    check_distinct(args.data, args.context, "use --context-columns to take context columns from it")
    check_output(
        args.out, [args.data, args.context], stdout="a model is a binary file; give a file name"
    )
    if args.flow != "nsf" and (args.bins is not None or args.coupling):
        option = "--bins" if args.bins is not None else "--coupling"
        raise CLIError(f"{option} only applies to --flow nsf, not {args.flow}")
    names = [name for name, _, _ in args.bounds or []]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise CLIError(f"--bounds names column {names_text(repeated[:1])} more than once")
    for option in ("columns", "context_columns"):
        names = getattr(args, option) or []
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            flag = "--" + option.replace("_", "-")
            raise CLIError(f"{flag} names {names_text(repeated[:1])} more than once")


def _choose_columns(args: argparse.Namespace, table: Any, context_table: Any) -> tuple[list, list]:
    """The data and context columns: named by options, else all (but the context) columns."""
    separate = args.context is not None
    if args.context_columns is not None:
        context_columns = list(args.context_columns)
        check_columns(context_table, context_columns, ", named by --context-columns")
    else:
        context_columns = [str(c) for c in context_table.columns] if separate else []
    if args.columns is not None:
        columns = list(args.columns)
        check_columns(table, columns, ", named by --columns")
    else:
        used = set() if separate else set(context_columns)
        columns = [str(c) for c in table.columns if str(c) not in used]
    both = [] if separate else [c for c in columns if c in context_columns]
    if both:
        raise CLIError(f"column {names_text(both[:1])} is both a data and a context column")
    if not columns:
        raise CLIError(f"no data columns left in {table_name(table)} to model")
    return columns, context_columns


def _read_inputs(args: argparse.Namespace) -> Inputs:
    """Read the table(s), pick the columns, and drop (or refuse) rows with NaN/Inf."""
    dialect = Dialect.from_args(args)
    table = read_table(args.data, dialect)
    context_table = table if args.context is None else read_table(args.context, dialect)
    columns, context_columns = _choose_columns(args, table, context_table)
    x = numeric(table, columns)
    c = numeric(context_table, context_columns) if context_columns else None
    if c is not None and len(c) != len(x):
        raise CLIError(
            f"context file {table_name(context_table)} has {len(c)} rows but "
            f"{table_name(table)} has {len(x)}; they must match row for row"
        )
    keep = finite_rows([x, c], table_name(table), args.drop_nan)
    return Inputs(
        columns,
        context_columns,
        x[keep],
        None if c is None else c[keep],
        table_name(table),
        table_name(context_table) if args.context is not None else None,
        int((~keep).sum()),
    )


def _bounds(args: argparse.Namespace, inputs: Inputs) -> tuple[dict[int, Bound], dict[int, Bound]]:
    """``--bounds`` as column index -> (low, high), for data and for context columns."""
    data: dict[int, Bound] = {}
    context: dict[int, Bound] = {}
    for name, low, high in args.bounds or []:
        if name in inputs.columns:
            data[inputs.columns.index(name)] = (low, high)
        elif name in inputs.context_columns:
            context[inputs.context_columns.index(name)] = (low, high)
        else:
            raise CLIError(
                f"--bounds names column {names_text([name])}, which is not a data or context "
                f"column (data: {names_text(inputs.columns)})"
            )
    return data, context


def _build_flow(args: argparse.Namespace, inputs: Inputs) -> Flow:
    """The flow the options describe, sized for the rows where they are silent
    (`pyroflows.training.sizing`); refused before building if its file could not load."""
    input_dim, context_dim = len(inputs.columns), len(inputs.context_columns)
    size = flow_size(len(inputs.x), input_dim)
    layers = size.num_layers if args.layers is None else args.layers
    hidden = size.hidden_dims if args.hidden is None else (args.hidden, args.hidden)
    kwargs = {"input_dim": input_dim, "context_dim": context_dim, "num_layers": layers}
    kwargs["hidden_dims"] = hidden
    builder = {"nsf": flows.nsf, "maf": flows.maf, "realnvp": flows.realnvp}[args.flow]
    if args.flow == "nsf":
        bins = size.count_bins if args.bins is None else args.bins
        kwargs |= {"coupling": args.coupling, "count_bins": bins}
    values = builder_size(builder, kwargs)
    if layers > MAX_LAYERS or values > MAX_PARAMETERS:
        raise CLIError(
            f"this flow would hold up to {values:,} values in {layers} layers, beyond what a "
            f"model file may hold ({MAX_PARAMETERS:,} values, {MAX_LAYERS} layers); choose "
            "smaller --hidden, --layers or --bins"
        )
    return builder(**kwargs)


def _train(args: argparse.Namespace, flow: Flow, inputs: Inputs, device: str | None) -> FitHistory:
    """`pyroflows.fit`, which checks the rows against the bounds (its errors name the rows)."""
    data_bounds, context_bounds = _bounds(args, inputs)
    try:
        return fit(
            flow,
            torch.from_numpy(inputs.x),
            context=None if inputs.c is None else torch.from_numpy(inputs.c),
            validation=args.validation,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            patience=args.patience if args.patience > 0 else None,
            bounds=data_bounds or None,
            context_bounds=context_bounds or None,
            seed=args.seed,
            device=device,
            progress=not args.quiet,
        )
    except ValueError as error:
        after = " (rows counted after dropping the NaN/Inf rows)" if inputs.dropped else ""
        declared = [f"{n}={_g(low)}:{_g(high)}" for n, low, high in args.bounds or []]
        given = f"; declared --bounds {' '.join(declared)}" if declared else ""
        raise CLIError(f"cannot fit {inputs.data_name}: {error}{after}{given}") from None


def _size_text(flow: Flow) -> str:
    """E.g. ``"5 layers, hidden 128x128, 8 bins"``: the size the options or the rule chose."""
    kwargs = flow.config["kwargs"]
    text = f"{kwargs['num_layers']} layers, hidden " + "x".join(map(str, kwargs["hidden_dims"]))
    return text + (f", {kwargs['count_bins']} bins" if "count_bins" in kwargs else "")


def _g(value: float | None) -> str:
    return "" if value is None else f"{value:g}"


def _clean(value: float | None) -> float | None:
    """A float for JSON: ``None`` for NaN/Inf."""
    return float(value) if value is not None and math.isfinite(value) else None


def history_summary(history: FitHistory, heldout: float | None) -> dict[str, Any]:
    """The training summary stored in a model's metadata."""
    return {
        "epochs_run": history.epochs_run,
        "best_epoch": history.best_epoch,
        "stopped_early": history.stopped_early,
        "best_val_loss": _clean(history.best_val_loss),
        "heldout_log_likelihood": _clean(heldout),
        "final_train_loss": _clean(history.train_loss[-1]) if history.train_loss else None,
        "num_train": history.num_train,
        "num_val": history.num_val,
        "batch_size": history.batch_size,
        "max_epochs": history.max_epochs,
        "rejected_steps": len(history.rejected_steps),
        "wall_time": round(history.wall_time, 3),
    }


def _metadata(args: argparse.Namespace, inputs: Inputs, summary: dict) -> dict[str, Any]:
    data_bounds, context_bounds = _bounds(args, inputs)

    def named(bounds: dict[int, Bound], names: list[str]) -> dict[str, list]:
        return {names[i]: list(pair) for i, pair in sorted(bounds.items())}

    return {
        "columns": inputs.columns,
        "context_columns": inputs.context_columns,
        "bounds": named(data_bounds, inputs.columns),
        "context_bounds": named(context_bounds, inputs.context_columns),
        "history": summary,
        "settings": {
            "data": inputs.data_name,
            "context": inputs.context_name,
            "rows": int(len(inputs.x)),
            **{k: getattr(args, k) for k in ("epochs", "batch_size", "lr", "validation")},
            **{k: getattr(args, k) for k in ("patience", "seed")},
        },
        "created_by": f"pyroflows {__version__} fit",
    }


def _result(flow: Flow, history: FitHistory, inputs: Inputs) -> tuple[float | None, str]:
    """The held-out log-likelihood (``None`` without validation rows) and its report line."""
    if history.num_val:
        heldout = -history.best_val_loss
        rows = f"mean over {history.num_val} validation rows"
        return heldout, f"held-out log-likelihood: {heldout:.4f} nats per row ({rows})"
    x = torch.from_numpy(inputs.x).to(input_dtype(flow))
    c = None if inputs.c is None else torch.from_numpy(inputs.c).to(input_dtype(flow, True))
    train = float(torch.cat(list(log_prob(flow, x, c))).mean())
    return None, (
        f"training log-likelihood: {train:.4f} nats per row (no held-out rows with --validation 0)"
    )


def run(args: argparse.Namespace) -> int:
    """Run ``pyroflows fit``."""
    _check_options(args)
    device = check_device(args.device)
    inputs = _read_inputs(args)
    torch.manual_seed(args.seed)
    flow = _build_flow(args, inputs)
    history = _train(args, flow, inputs, device)
    flow.cpu()
    heldout, result = _result(flow, history, inputs)
    flow.metadata = _metadata(args, inputs, history_summary(history, heldout))
    save(flow, args.out)
    context = len(inputs.context_columns)
    say(
        f"fitted {args.flow} ({_size_text(flow)}) to {len(inputs.x)} rows x "
        f"{len(inputs.columns)} column(s)"
        + (f" given {context} context column(s)" if context else "")
        + f" in {history.wall_time:.1f} s: {history.epochs_run} of {history.max_epochs} epochs"
        + f" of batches of {history.batch_size}"
        + (" (stopped early)" if history.stopped_early else "")
        + f", best epoch {history.best_epoch}"
    )
    say(result)
    say(f"saved model to {args.out}")
    return 0
