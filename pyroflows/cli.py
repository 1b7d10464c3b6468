"""The ``pyroflows`` command: fit, sample, score and inspect flows on CSV tables.

Subcommands:

* ``pyroflows fit DATA.csv --out MODEL``: fit a flow to the columns of a table;
* ``pyroflows sample MODEL -n N``: draw rows from a fitted flow (per context row if it is
  conditional);
* ``pyroflows logprob MODEL DATA.csv``: log-density of every row of a table;
* ``pyroflows info MODEL``: what a model file holds;
* ``pyroflows demo``: fit a small flow to a built-in 2-D toy density and plot it.

Expected problems (a missing file, a non-numeric column, NaN rows, a file that is not a
model, ...) are reported as one line ``pyroflows: error: ...`` on stderr with exit status 1
(2 for a bad command line); anything else is a bug and shows its traceback.

`main` is the entry point of the console script and of ``python -m pyroflows``; it can
also be called with an argument list, e.g. ``main(["info", "model.pt"])``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np
import torch

from . import __version__, flows
from .distribution import Flow
from .io import load, save
from .training import FitHistory, fit

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["main", "CLIError"]

PROG = "pyroflows"
#: Rows scored or sampled per call of the flow (bounds the memory of big tables).
CHUNK_ROWS = 65_536
#: Significant digits of the floats written to CSV (float32 models hold about 7).
FLOAT_FORMAT = "%.8g"
_FLOWS = ("nsf", "maf", "realnvp")


class CLIError(Exception):
    """A problem with the user's input: printed as one line, exit status 1."""


# --------------------------------------------------------------------------- output helpers


def _one_line(message: object) -> str:
    return " ".join(str(message).split()) or "unknown error"


def _note(message: str) -> None:
    """An informational message; on stderr so stdout stays clean for data."""
    print(f"{PROG}: {message}", file=sys.stderr)


def _rows_text(rows: Sequence[Any], limit: int = 10) -> str:
    shown = ", ".join(str(r) for r in list(rows)[:limit])
    return shown + (f", ... ({len(rows)} in all)" if len(rows) > limit else "")


def _names_text(names: Sequence[Any], limit: int = 12) -> str:
    shown = ", ".join(repr(str(n)) for n in list(names)[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _check_output_path(path: str | None, what: str = "output") -> None:
    """Fail before any work if ``path`` cannot be written (missing folder, a directory)."""
    if path is None or path == "-":
        return
    target = Path(path)
    if target.is_dir():
        raise CLIError(f"{what} path {path} is a directory; give a file name")
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise CLIError(f"cannot write {path}: folder {parent} does not exist")


# --------------------------------------------------------------------------- tables


def _read_csv(path: str) -> pd.DataFrame:
    """Read a CSV table (``-`` for stdin) with one-line errors for the usual problems."""
    import pandas as pd

    if path != "-":
        if not os.path.exists(path):
            raise CLIError(f"no such file: {path}")
        if os.path.isdir(path):
            raise CLIError(f"{path} is a directory, not a CSV file")
    name = "<stdin>" if path == "-" else path
    try:
        table = pd.read_csv(sys.stdin if path == "-" else path)
    except pd.errors.EmptyDataError:
        raise CLIError(f"{name} is empty (no header, no rows)") from None
    except pd.errors.ParserError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else "parse error"
        raise CLIError(f"cannot read {name} as CSV: {first}") from None
    except UnicodeDecodeError:
        raise CLIError(f"{name} is not a text CSV file") from None
    if len(table) == 0:
        raise CLIError(f"{name} has no rows (only a header)")
    table.attrs["name"] = name
    return table


def _table_name(table: pd.DataFrame) -> str:
    return table.attrs.get("name", "the table")


def _check_columns(table: pd.DataFrame, columns: Sequence[str], hint: str = "") -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise CLIError(
            f"{_table_name(table)} has no column {missing[0]!r}{hint} "
            f"(its columns: {_names_text(table.columns)})"
        )


def _numeric(table: pd.DataFrame, columns: Sequence[str]) -> np.ndarray:
    """The ``columns`` of ``table`` as a float64 array; names the first non-numeric column."""
    import pandas as pd
    from pandas.api.types import is_bool_dtype, is_numeric_dtype

    arrays = []
    for column in columns:
        series = table[column]
        if not (is_numeric_dtype(series) or is_bool_dtype(series)):
            converted = pd.to_numeric(series, errors="coerce")
            bad = converted.isna() & series.notna()
            if bad.any():
                position = int(np.flatnonzero(bad.to_numpy())[0])
                raise CLIError(
                    f"column {column!r} of {_table_name(table)} is not numeric "
                    f"(row {position}: {series.iloc[position]!r})"
                )
            series = converted
        arrays.append(series.to_numpy(dtype=np.float64, na_value=np.nan))
    return np.stack(arrays, axis=1) if arrays else np.empty((len(table), 0))


def _finite_rows(
    arrays: Sequence[np.ndarray | None], name: str, drop_nan: bool | None
) -> np.ndarray:
    """Boolean mask of the rows with no NaN/Inf in any of ``arrays``.

    ``drop_nan=None`` means the command has no ``--drop-nan`` option.
    """
    present = [a for a in arrays if a is not None and a.shape[1]]
    if not present:
        return np.ones(len(arrays[0]), dtype=bool)
    keep = np.isfinite(np.concatenate(present, axis=1)).all(axis=1)
    bad = np.flatnonzero(~keep)
    if len(bad) == 0:
        return keep
    where = f"row(s) {_rows_text(bad.tolist())} (counted from 0, header excluded)"
    if not drop_nan:
        hint = "; pass --drop-nan to drop them" if drop_nan is not None else ""
        raise CLIError(f"{name} has {len(bad)} row(s) with NaN or Inf: {where}{hint}")
    if len(bad) == len(keep):
        raise CLIError(f"every row of {name} has NaN or Inf: nothing left after --drop-nan")
    _note(f"dropped {len(bad)} row(s) with NaN or Inf from {name}: {where}")
    return keep


def _write_csv(table: pd.DataFrame, path: str | None) -> None:
    if path is None or path == "-":
        table.to_csv(sys.stdout, index=False, float_format=FLOAT_FORMAT)
        sys.stdout.flush()
    else:
        table.to_csv(path, index=False, float_format=FLOAT_FORMAT)


# --------------------------------------------------------------------------- models


def _load_model(path: str) -> Flow:
    if os.path.isdir(path):
        raise CLIError(f"{path} is a directory, not a model file")
    flow = load(path)  # FileNotFoundError / ValueError with clear messages
    flow.eval()
    return flow


def _model_columns(flow: Flow, path: str) -> tuple[list[str], list[str]]:
    """Data and context column names saved with the model.

    A model saved from Python without column names gets ``x0, x1, ...`` (and ``c0, ...``).
    """
    meta = flow.metadata if isinstance(flow.metadata, dict) else {}
    columns = meta.get("columns") or [f"x{i}" for i in range(flow.input_dim)]
    context = meta.get("context_columns") or [f"c{i}" for i in range(flow.context_dim)]
    columns, context = [str(c) for c in columns], [str(c) for c in context]
    if len(columns) != flow.input_dim or len(context) != flow.context_dim:
        raise CLIError(
            f"{path}: the saved column names ({len(columns)} data, {len(context)} context) do "
            f"not match the flow ({flow.input_dim} data, {flow.context_dim} context)"
        )
    return columns, context


def _model_dtype(flow: Flow) -> torch.dtype:
    return next(iter(flow.parameters())).dtype


def _build_flow(args: argparse.Namespace, input_dim: int, context_dim: int) -> Flow:
    hidden_dims = (args.hidden, args.hidden)
    common = {"num_layers": args.layers, "hidden_dims": hidden_dims}
    if args.flow != "nsf":
        if args.bins is not None:
            raise CLIError(f"--bins only applies to --flow nsf, not {args.flow}")
        if args.coupling:
            raise CLIError(f"--coupling only applies to --flow nsf, not {args.flow}")
    if args.flow == "nsf":
        bins = 8 if args.bins is None else args.bins
        return flows.nsf(input_dim, context_dim, coupling=args.coupling, count_bins=bins, **common)
    if args.flow == "maf":
        return flows.maf(input_dim, context_dim, **common)
    return flows.realnvp(input_dim, context_dim, **common)


def _parse_bounds(
    specs: Sequence[str], columns: Sequence[str], context_columns: Sequence[str]
) -> tuple[dict[int, tuple[float | None, float | None]], dict[int, tuple]]:
    """``COL=LOW:HIGH`` items (either side may be empty) as data and context bounds."""
    data_bounds: dict[int, tuple[float | None, float | None]] = {}
    context_bounds: dict[int, tuple[float | None, float | None]] = {}
    for spec in specs:
        name, eq, rest = spec.rpartition("=")
        low_text, colon, high_text = rest.partition(":")
        if not eq or not name or not colon:
            raise CLIError(f"--bounds {spec!r} is not of the form COLUMN=LOW:HIGH (e.g. x=0:)")
        try:
            low = float(low_text) if low_text.strip() else None
            high = float(high_text) if high_text.strip() else None
        except ValueError:
            raise CLIError(f"--bounds {spec!r}: LOW and HIGH must be numbers or empty") from None
        low = None if low is not None and low == -math.inf else low
        high = None if high is not None and high == math.inf else high
        if (low is not None and math.isnan(low)) or (high is not None and math.isnan(high)):
            raise CLIError(f"--bounds {spec!r}: bounds must not be NaN")
        if low is not None and high is not None and not low < high:
            raise CLIError(f"--bounds {spec!r}: need LOW < HIGH")
        if name in columns:
            data_bounds[list(columns).index(name)] = (low, high)
        elif name in context_columns:
            context_bounds[list(context_columns).index(name)] = (low, high)
        else:
            raise CLIError(
                f"--bounds names column {name!r}, which is not a data or context column "
                f"(data: {_names_text(columns)})"
            )
    return data_bounds, context_bounds


def _check_inside(values: np.ndarray, bounds: dict, names: Sequence[str], source: str) -> None:
    for index, (low, high) in bounds.items():
        column = values[:, index]
        outside = np.zeros(len(column), dtype=bool)
        if low is not None:
            outside |= ~(column > low)
        if high is not None:
            outside |= ~(column < high)
        rows = np.flatnonzero(outside)
        if len(rows):
            low_s = "-inf" if low is None else f"{low:g}"
            high_s = "inf" if high is None else f"{high:g}"
            interval = f"({low_s}, {high_s})"
            raise CLIError(
                f"column {names[index]!r} of {source} has {len(rows)} value(s) outside its "
                f"--bounds {interval} (bounds are strict): row(s) {_rows_text(rows.tolist())}"
            )


def _bounds_metadata(bounds: dict, names: Sequence[str]) -> dict[str, list[float | None]]:
    return {names[i]: [low, high] for i, (low, high) in sorted(bounds.items())}


def _clean(value: float) -> float | None:
    """A float for JSON: ``None`` for NaN/Inf."""
    return float(value) if value is not None and math.isfinite(value) else None


def _history_summary(history: FitHistory, heldout: float | None) -> dict[str, Any]:
    return {
        "epochs_run": history.epochs_run,
        "best_epoch": history.best_epoch,
        "stopped_early": history.stopped_early,
        "best_val_loss": _clean(history.best_val_loss),
        "heldout_log_likelihood": _clean(heldout) if heldout is not None else None,
        "final_train_loss": _clean(history.train_loss[-1]) if history.train_loss else None,
        "num_train": history.num_train,
        "num_val": history.num_val,
        "rejected_steps": len(history.rejected_steps),
        "wall_time": round(history.wall_time, 3),
    }


@torch.no_grad()
def _log_prob(flow: Flow, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
    out = []
    for start in range(0, len(x), CHUNK_ROWS):
        c = None if context is None else context[start : start + CHUNK_ROWS]
        out.append(flow.condition(c).log_prob(x[start : start + CHUNK_ROWS]))
    return torch.cat(out)


def _progress_available() -> bool:
    try:
        import tqdm  # noqa: F401
    except ImportError:
        return False
    return True


def _device(name: str | None) -> str | None:
    if name is not None and name.startswith("cuda") and not torch.cuda.is_available():
        raise CLIError("--device cuda was requested but CUDA is not available")
    return name


# --------------------------------------------------------------------------- commands


def _cmd_fit(args: argparse.Namespace) -> int:
    _check_output_path(args.out, "--out")
    table = _read_csv(args.data)
    context_table = table if args.context is None else _read_csv(args.context)
    separate = args.context is not None

    if args.context_columns is not None:
        context_columns = list(args.context_columns)
        _check_columns(context_table, context_columns, ", named by --context-columns")
    else:
        context_columns = list(map(str, context_table.columns)) if separate else []
    if args.columns is not None:
        columns = list(args.columns)
        _check_columns(table, columns, ", named by --columns")
    else:
        used = set(context_columns) if not separate else set()
        columns = [str(c) for c in table.columns if str(c) not in used]
    for names, option in ((columns, "--columns"), (context_columns, "--context-columns")):
        repeated = sorted({c for c in names if names.count(c) > 1})
        if repeated:
            raise CLIError(f"{option} names {repeated[0]!r} more than once")
    if not separate:
        both = [c for c in columns if c in context_columns]
        if both:
            raise CLIError(f"column {both[0]!r} is both a data and a context column")
    if not columns:
        raise CLIError(f"no data columns left in {_table_name(table)} to model")

    x = _numeric(table, columns)
    c = _numeric(context_table, context_columns) if context_columns else None
    if c is not None and len(c) != len(x):
        raise CLIError(
            f"context file {_table_name(context_table)} has {len(c)} rows but "
            f"{_table_name(table)} has {len(x)}; they must match row for row"
        )
    keep = _finite_rows([x, c], _table_name(table), args.drop_nan)
    x = x[keep]
    c = None if c is None else c[keep]
    data_bounds, context_bounds = _parse_bounds(args.bounds or [], columns, context_columns)
    _check_inside(x, data_bounds, columns, _table_name(table))
    if c is not None:
        _check_inside(c, context_bounds, context_columns, _table_name(context_table))
    device = _device(args.device)

    torch.manual_seed(args.seed)
    flow = _build_flow(args, len(columns), len(context_columns))
    x_t = torch.from_numpy(x)
    c_t = None if c is None else torch.from_numpy(c)
    history = fit(
        flow,
        x_t,
        context=c_t,
        validation=args.validation,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        patience=args.patience if args.patience > 0 else None,
        bounds=data_bounds or None,
        context_bounds=context_bounds or None,
        seed=args.seed,
        device=device,
        progress=not args.quiet and _progress_available(),
    )
    flow.cpu()
    if history.num_val:
        heldout = -history.best_val_loss
        result = (
            f"held-out log-likelihood: {heldout:.4f} nats per row "
            f"(mean over {history.num_val} validation rows)"
        )
    else:
        dtype = _model_dtype(flow)
        heldout = None
        train_ll = float(
            _log_prob(flow, x_t.to(dtype), None if c_t is None else c_t.to(dtype)).mean()
        )
        result = (
            f"training log-likelihood: {train_ll:.4f} nats per row "
            "(no held-out rows with --validation 0)"
        )
    metadata = {
        "columns": columns,
        "context_columns": context_columns,
        "bounds": _bounds_metadata(data_bounds, columns),
        "context_bounds": _bounds_metadata(context_bounds, context_columns),
        "history": _history_summary(history, heldout),
        "settings": {
            "data": _table_name(table),
            "context": None if not separate else _table_name(context_table),
            "rows": int(len(x)),
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "validation": args.validation,
            "patience": args.patience,
            "seed": args.seed,
        },
        "created_by": f"pyroflows {__version__} fit",
    }
    flow.metadata = metadata
    save(flow, args.out)
    stop = " (stopped early)" if history.stopped_early else ""
    print(
        f"fitted {args.flow} to {len(x)} rows x {len(columns)} column(s)"
        + (f" given {len(context_columns)} context column(s)" if context_columns else "")
        + f" in {history.wall_time:.1f} s: {history.epochs_run} epochs{stop}, "
        f"best epoch {history.best_epoch}"
    )
    print(result)
    print(f"saved model to {args.out}")
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    import pandas as pd

    _check_output_path(args.out, "--out")
    flow = _load_model(args.model)
    columns, context_columns = _model_columns(flow, args.model)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    dtype = _model_dtype(flow)
    if flow.context_dim:
        if args.context is None:
            raise CLIError(
                f"{args.model} is conditional on {_names_text(context_columns)}: "
                "pass --context CSV with those columns"
            )
        table = _read_csv(args.context)
        _check_columns(table, context_columns, ", a context column of the model")
        c = _numeric(table, context_columns)
        _finite_rows([c], _table_name(table), None)
        context = torch.from_numpy(c).to(dtype)
        per_chunk = max(1, CHUNK_ROWS // len(context))
        parts = []
        with torch.no_grad():
            d = flow.condition(context)
            for start in range(0, args.num_samples, per_chunk):
                n = min(per_chunk, args.num_samples - start)
                parts.append(d.sample((n,)))  # (n, B, D)
        samples = torch.cat(parts).transpose(0, 1).reshape(-1, flow.input_dim)
        rows = np.repeat(np.arange(len(context)), args.num_samples)
        out = pd.DataFrame(samples.double().numpy(), columns=columns)
        out.insert(0, "row", rows)
    else:
        if args.context is not None:
            raise CLIError(f"{args.model} is unconditional; leave out --context")
        with torch.no_grad():
            d = flow.condition(None)
            parts = [
                d.sample((min(CHUNK_ROWS, args.num_samples - start),))
                for start in range(0, args.num_samples, CHUNK_ROWS)
            ]
        out = pd.DataFrame(torch.cat(parts).double().numpy(), columns=columns)
    _write_csv(out, args.out)
    if args.out not in (None, "-"):
        print(f"wrote {len(out)} rows to {args.out}")
    return 0


def _cmd_logprob(args: argparse.Namespace) -> int:
    import pandas as pd

    _check_output_path(args.out, "--out")
    flow = _load_model(args.model)
    columns, context_columns = _model_columns(flow, args.model)
    table = _read_csv(args.data)
    context_table = table if args.context is None else _read_csv(args.context)
    if args.context is not None and not flow.context_dim:
        raise CLIError(f"{args.model} is unconditional; leave out --context")
    _check_columns(table, columns, ", a data column of the model")
    x = _numeric(table, columns)
    c = None
    if flow.context_dim:
        _check_columns(context_table, context_columns, ", a context column of the model")
        c = _numeric(context_table, context_columns)
        if len(c) != len(x):
            raise CLIError(
                f"context file {_table_name(context_table)} has {len(c)} rows but "
                f"{_table_name(table)} has {len(x)}; they must match row for row"
            )
    keep = _finite_rows([x, c], _table_name(table), args.drop_nan)
    dtype = _model_dtype(flow)
    x_t = torch.from_numpy(x[keep]).to(dtype)
    c_t = None if c is None else torch.from_numpy(c[keep]).to(dtype)
    log_prob = _log_prob(flow, x_t, c_t).double().numpy()
    out = pd.DataFrame({"row": np.flatnonzero(keep), "log_prob": log_prob})
    _write_csv(out, args.out)
    mean = float(np.mean(log_prob))
    message = f"mean log_prob: {mean:.6f} nats per row over {len(log_prob)} rows"
    zero = int(np.sum(np.isneginf(log_prob)))
    if zero:
        message += f" ({zero} row(s) outside the model's support have log_prob -inf)"
    if args.out in (None, "-"):
        _note(message)
    else:
        print(message)
        print(f"wrote {len(out)} rows to {args.out}")
    return 0


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, dict) and "activation" in value:
        return str(value["activation"])
    if isinstance(value, dict) and "transformer" in value:
        inner = ", ".join(f"{k}={_format_value(v)}" for k, v in value.get("args", {}).items())
        return f"{value['transformer']}({inner})"
    if isinstance(value, list):
        return "(" + ", ".join(_format_value(v) for v in value) + ")"
    return str(value)


def _describe_bounds(names: Sequence[str], transforms: Any) -> list[str]:
    described = []
    for module in transforms:
        lower, upper = getattr(module, "lower", None), getattr(module, "upper", None)
        if lower is None or upper is None:
            continue
        for name, low, high in zip(names, lower.tolist(), upper.tolist(), strict=True):
            if math.isfinite(low) and math.isfinite(high):
                described.append(f"{low:g} < {name} < {high:g}")
            elif math.isfinite(low):
                described.append(f"{name} > {low:g}")
            elif math.isfinite(high):
                described.append(f"{name} < {high:g}")
    return described


def _cmd_info(args: argparse.Namespace) -> int:
    flow = _load_model(args.model)
    columns, context_columns = _model_columns(flow, args.model)
    meta = flow.metadata if isinstance(flow.metadata, dict) else {}
    config = flow.config or {}
    kwargs = dict(config.get("kwargs", {}))
    kwargs.pop("input_dim", None)
    kwargs.pop("context_dim", None)
    settings = ", ".join(f"{k}={_format_value(v)}" for k, v in kwargs.items())
    n_params = sum(p.numel() for p in flow.parameters())
    lines = [
        ("model", args.model),
        ("builder", f"{config.get('builder', '?')}({settings})"),
        ("layers", f"{len(flow.layers)} x {type(flow.layers[0]).__name__}" if flow.layers else "0"),
        ("dims", f"{flow.input_dim} data, {flow.context_dim} context"),
        ("columns", ", ".join(columns)),
        ("context columns", ", ".join(context_columns) if context_columns else "(unconditional)"),
        ("parameters", f"{n_params:,}"),
        ("dtype", str(_model_dtype(flow)).removeprefix("torch.")),
    ]
    scaling = [type(m).__name__ for m in flow.data_transforms]
    lines.append(("data transforms", ", ".join(scaling) if scaling else "(none)"))
    bounds = _describe_bounds(columns, flow.data_transforms)
    bounds += _describe_bounds(context_columns, flow.context_transforms)
    lines.append(("bounds", "; ".join(bounds) if bounds else "(none)"))
    history = meta.get("history")
    if isinstance(history, dict):
        parts = [f"{history.get('epochs_run', '?')} epochs"]
        if history.get("stopped_early"):
            parts[0] += " (stopped early)"
        parts.append(f"best epoch {history.get('best_epoch', '?')}")
        parts.append(
            f"{history.get('num_train', '?')} train / {history.get('num_val', '?')} val rows"
        )
        if history.get("wall_time") is not None:
            parts.append(f"{history['wall_time']:.1f} s")
        lines.append(("training", ", ".join(parts)))
        heldout = history.get("heldout_log_likelihood")
        if heldout is not None:
            lines.append(("held-out log-likelihood", f"{heldout:.4f} nats per row"))
    else:
        lines.append(("training", "(no training summary saved)"))
    settings_meta = meta.get("settings")
    if isinstance(settings_meta, dict) and settings_meta.get("data"):
        lines.append(("fitted on", str(settings_meta["data"])))
    if meta.get("created_by"):
        lines.append(("created by", str(meta["created_by"])))
    width = max(len(key) for key, _ in lines)
    for key, value in lines:
        print(f"{key + ':':<{width + 1}} {value}")
    return 0


def _demo_bounds(data: np.ndarray) -> tuple[tuple[float, float], tuple[float, float]]:
    low, high = np.quantile(data, 0.001, axis=0), np.quantile(data, 0.999, axis=0)
    pad = 0.15 * (high - low) + 0.1
    (x0, y0), (x1, y1) = (low - pad).tolist(), (high + pad).tolist()
    return (x0, x1), (y0, y1)


def _cmd_demo(args: argparse.Namespace) -> int:
    try:
        import matplotlib
    except ImportError:
        raise CLIError("demo draws plots with matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from . import datasets, plot

    out_dir = Path(args.out)
    if out_dir.exists() and not out_dir.is_dir():
        raise CLIError(f"--out {args.out} exists and is not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)

    data = datasets.load_toy(args.dataset, args.num_points, seed=args.seed)
    torch.manual_seed(args.seed)
    # Coupling layers: one pass to score and one to sample, the fastest on a CPU.
    flow = flows.nsf(2, coupling=True, num_layers=6, hidden_dims=(64, 64), count_bins=10)
    if not args.quiet:
        _note(
            f"fitting a neural spline flow to {args.num_points} points of {args.dataset!r} "
            f"({args.epochs} epochs)"
        )
    history = fit(
        flow,
        data,
        validation=0.2,
        epochs=args.epochs,
        batch_size=512,
        lr=5e-3,
        patience=None,
        seed=args.seed,
        progress=not args.quiet and _progress_available(),
    )
    heldout = -history.best_val_loss
    with torch.no_grad():
        samples = flow().sample((args.num_points,))
    xlim, ylim = _demo_bounds(data.numpy())
    bounds = (xlim, ylim)
    title = args.dataset.replace("_", " ")

    written = []

    def save_figure(fig: Any, name: str) -> None:
        path = out_dir / name
        fig.savefig(path, dpi=args.dpi)
        plt.close(fig)
        written.append(path)

    # Panel sizes follow the data's aspect ratio, so the plots have no empty bands.
    aspect = (ylim[1] - ylim[0]) / (xlim[1] - xlim[0])
    panel = (4.5, min(max(4.5 * aspect, 2.0), 6.0) + 0.6)

    # 1. the data
    fig, ax = plt.subplots(figsize=panel, layout="constrained")
    x = data.numpy()
    ax.scatter(x[:, 0], x[:, 1], s=2, alpha=0.5, linewidths=0, color="C0", rasterized=True)
    ax.set(xlim=xlim, ylim=ylim, aspect="equal", title=f"data: {title} ({len(x)} points)")
    save_figure(fig, "data.png")

    # 2. data next to flow samples
    fig, axes = plt.subplots(1, 2, figsize=(2 * panel[0], panel[1]), layout="constrained")
    plot.plot_samples_2d(data, samples, ax=axes, bounds=bounds)
    save_figure(fig, "samples.png")

    # 3. the fitted density with contours
    fig, ax = plt.subplots(figsize=(panel[0] + 0.3, panel[1] + 0.2), layout="constrained")
    plot.plot_density_2d(flow, bounds=bounds, resolution=args.resolution, ax=ax, contours=6)
    ax.set_title(f"flow density (held-out log-likelihood {heldout:.3f})")
    save_figure(fig, "density.png")

    # 4. training curve (negative log-likelihood per point)
    fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
    plot.plot_training_curves(history, ax=ax)
    ax.set_ylabel("negative log-likelihood (nats per point)")
    ax.set_title("training")
    save_figure(fig, "training.png")

    # 5. everything on one page
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.4), layout="constrained")
    plot.plot_samples_2d(data, samples, ax=axes[:2], bounds=bounds)
    plot.plot_density_2d(flow, bounds=bounds, resolution=args.resolution, ax=axes[2], contours=6)
    axes[2].set_title("flow density")
    plot.plot_training_curves(history, ax=axes[3])
    axes[3].set_title("training loss")
    fig.suptitle(
        f"pyroflows demo: neural spline flow on {title} "
        f"(held-out log-likelihood {heldout:.3f} nats per point)"
    )
    save_figure(fig, "overview.png")

    flow_meta = {"columns": ["x", "y"], "context_columns": [], "created_by": "pyroflows demo"}
    flow.metadata = flow_meta | {"history": _history_summary(history, heldout)}
    save(flow, out_dir / "model.pt")
    import pandas as pd

    pd.DataFrame(x.astype(np.float64), columns=["x", "y"]).to_csv(
        out_dir / "data.csv", index=False, float_format=FLOAT_FORMAT
    )

    print(
        f"fitted in {history.wall_time:.1f} s ({history.epochs_run} epochs, "
        f"{history.num_train} training / {history.num_val} held-out points)"
    )
    print(f"held-out log-likelihood: {heldout:.4f} nats per point")
    print(f"wrote {', '.join(p.name for p in written)} to {out_dir}/")
    print(f"also model.pt and data.csv: try `pyroflows info {out_dir / 'model.pt'}`")
    return 0


# --------------------------------------------------------------------------- parser


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, like the command's other errors."""

    def error(self, message: str) -> NoReturn:
        print(f"{PROG}: error: {message} (see '{self.prog} --help')", file=sys.stderr)
        raise SystemExit(2)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction, got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {text}")
    return value


_EPILOG = """\
examples:
  pyroflows demo
  pyroflows fit data.csv --out model.pt
  pyroflows fit data.csv --out model.pt --context-columns z --bounds mass=0:
  pyroflows info model.pt
  pyroflows sample model.pt -n 1000 --out samples.csv
  pyroflows sample model.pt -n 100 --context contexts.csv
  pyroflows logprob model.pt data.csv --out scores.csv

Run 'pyroflows COMMAND --help' for the options of a command.
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``pyroflows`` command."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        metavar="N",
        help="CPU threads for torch (default 1: small networks run fastest on one)",
    )

    parser = _Parser(
        prog=PROG,
        description="Normalizing flows from the command line: fit a flow to the columns of a "
        "CSV table, sample from it, score rows, or run a demo.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"pyroflows {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    # fit
    p = sub.add_parser(
        "fit",
        parents=[common],
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
    p.add_argument(
        "--context-columns",
        nargs="+",
        metavar="COL",
        help="columns to condition on (a conditional flow)",
    )
    p.add_argument(
        "--context",
        metavar="CSV",
        help="read the context columns from this table instead (same rows as DATA.csv)",
    )
    p.add_argument("--flow", choices=_FLOWS, default="nsf", help="flow type (default nsf)")
    p.add_argument(
        "--coupling",
        action="store_true",
        help="nsf only: coupling layers instead of autoregressive ones (faster sampling)",
    )
    p.add_argument("--layers", type=_positive_int, default=5, metavar="N", help="default 5")
    p.add_argument(
        "--hidden", type=_positive_int, default=64, metavar="W", help="hidden width (default 64)"
    )
    p.add_argument(
        "--bins", type=_positive_int, default=None, metavar="K", help="nsf spline bins (default 8)"
    )
    p.add_argument("--epochs", type=_positive_int, default=100, metavar="N", help="default 100")
    p.add_argument("--batch-size", type=_positive_int, default=512, metavar="B", help="default 512")
    p.add_argument("--lr", type=_positive_float, default=1e-3, help="learning rate (default 1e-3)")
    p.add_argument(
        "--validation",
        type=_fraction,
        default=0.1,
        metavar="FRAC",
        help="fraction of rows held out for validation and early stopping (default 0.1)",
    )
    p.add_argument(
        "--patience",
        type=int,
        default=20,
        metavar="N",
        help="stop after N epochs without improvement (default 20; 0 never stops early)",
    )
    p.add_argument(
        "--bounds",
        nargs="+",
        metavar="COL=LOW:HIGH",
        help="declared support of a column, e.g. mass=0: or p=0:1 (either side may be empty)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of weights and split (default 0)")
    p.add_argument("--device", default=None, help="cpu or cuda (default cpu)")
    p.add_argument("--drop-nan", action="store_true", help="drop rows with NaN or Inf")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(handler=_cmd_fit)

    # sample
    p = sub.add_parser(
        "sample",
        parents=[common],
        help="draw rows from a fitted flow",
        description="Draw samples from a model. For a conditional model, draws N samples for "
        "every row of the --context table; the column 'row' gives the context row (from 0).",
    )
    p.add_argument("model", metavar="MODEL", help="model file written by 'pyroflows fit'")
    p.add_argument(
        "-n",
        "--num-samples",
        type=_positive_int,
        required=True,
        metavar="N",
        help="samples (per context row for a conditional model)",
    )
    p.add_argument("--context", metavar="CSV", help="context rows for a conditional model")
    p.add_argument("--out", "-o", metavar="CSV", help="file to write (default stdout)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: not fixed)")
    p.set_defaults(handler=_cmd_sample)

    # logprob
    p = sub.add_parser(
        "logprob",
        parents=[common],
        help="log-density of every row of a table",
        description="Log-density (nats) of every row of a table under a model: writes the "
        "columns 'row' (from 0) and 'log_prob', and prints their mean. Columns are picked by "
        "the names saved with the model.",
    )
    p.add_argument("model", metavar="MODEL", help="model file written by 'pyroflows fit'")
    p.add_argument("data", metavar="DATA.csv", help="table with the model's columns")
    p.add_argument("--context", metavar="CSV", help="read the context columns from this table")
    p.add_argument("--out", "-o", metavar="CSV", help="file to write (default stdout)")
    p.add_argument("--drop-nan", action="store_true", help="skip rows with NaN or Inf")
    p.set_defaults(handler=_cmd_logprob)

    # info
    p = sub.add_parser(
        "info",
        parents=[common],
        help="describe a model file",
        description="Print how a model was built, its columns, size and training summary.",
    )
    p.add_argument("model", metavar="MODEL", help="model file")
    p.set_defaults(handler=_cmd_info)

    # demo
    p = sub.add_parser(
        "demo",
        parents=[common],
        help="fit a flow to a 2-D toy density and plot it",
        description="Fit a small neural spline flow to a built-in 2-D toy density and write "
        "PNG plots (data, samples, density, training curve, overview), the model and the data "
        "into a folder.",
    )
    p.add_argument("--out", "-o", default="pyroflows-demo", metavar="DIR", help="output folder")
    p.add_argument(
        "--dataset",
        default="two_moons",
        choices=["two_moons", "eight_gaussians", "checkerboard", "spirals", "rings"],
        help="toy density (default two_moons)",
    )
    p.add_argument("--epochs", type=_positive_int, default=40, metavar="N", help="default 40")
    p.add_argument(
        "--num-points", type=_positive_int, default=10_000, metavar="N", help="default 10000"
    )
    p.add_argument("--resolution", type=_positive_int, default=200, help=argparse.SUPPRESS)
    p.add_argument("--dpi", type=_positive_int, default=110, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help="seed of data and weights (default 0)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(handler=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``pyroflows`` command with ``argv`` (default ``sys.argv[1:]``).

    Returns:
        The exit status: 0 on success, 1 for bad input, 2 for a bad command line.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version or a usage error
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    if args.command is None:
        print(
            f"{PROG}: error: choose a command: fit, sample, logprob, info or demo "
            f"(see '{PROG} --help')",
            file=sys.stderr,
        )
        return 2

    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or 1)
    try:
        return args.handler(args)
    except BrokenPipeError:  # e.g. `pyroflows sample ... | head`
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except torch.cuda.OutOfMemoryError:
        print(f"{PROG}: error: out of GPU memory; try a smaller --batch-size", file=sys.stderr)
        return 1
    except (CLIError, ValueError) as error:
        print(f"{PROG}: error: {_one_line(error)}", file=sys.stderr)
        return 1
    except OSError as error:
        message = f"{error.strerror}: {error.filename}" if error.filename else str(error)
        print(f"{PROG}: error: {_one_line(message)}", file=sys.stderr)
        return 1
    except KeyError as error:
        key = error.args[0] if error.args else ""
        print(f"{PROG}: error: missing entry {key!r}", file=sys.stderr)
        return 1
    finally:
        torch.set_num_threads(threads)
