"""``pyroflows info``: what a model file holds, read with `pyroflows.io.describe`."""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from typing import Any

from ..io import ModelDescription
from .models import describe_model, model_columns
from .text import printable, say


def group_layers(layers: Sequence[str]) -> list[str]:
    """Identical consecutive layer lines as one ``N x LINE``.

    >>> group_layers(["A(1)", "A(1)", "B", "A(1)"])
    ['2 x A(1)', 'B', 'A(1)']
    """
    groups: list[list[Any]] = []
    for line in layers:
        if groups and groups[-1][1] == line:
            groups[-1][0] += 1
        else:
            groups.append([1, line])
    return [line if count == 1 else f"{count} x {line}" for count, line in groups]


def _bound_text(name: str, low: float, high: float) -> str | None:
    if math.isfinite(low) and math.isfinite(high):
        return f"{low:g} < {name} < {high:g}"
    if math.isfinite(low):
        return f"{name} > {low:g}"
    return f"{name} < {high:g}" if math.isfinite(high) else None


def _bounds(names: Sequence[str], bounds: Sequence[tuple[float, float]]) -> list[str]:
    pairs = zip(names, bounds, strict=False)
    return [t for name, (low, high) in pairs if (t := _bound_text(name, low, high))]


def _number(value: Any, spec: str = "") -> str:
    """``value`` formatted with ``spec`` if it is a real number, else ``?``."""
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    return format(value, spec) if ok else "?"


def _training(history: Any) -> list[tuple[str, str]]:
    """The training summary saved by ``pyroflows fit``, as report lines."""
    if not isinstance(history, dict):
        return [("training", "(no training summary saved)")]
    early = " (stopped early)" if history.get("stopped_early") is True else ""
    parts = [
        f"{_number(history.get('epochs_run'))} epochs{early}",
        f"best epoch {_number(history.get('best_epoch'))}",
        f"{_number(history.get('num_train'))} train / {_number(history.get('num_val'))} val rows",
    ]
    if history.get("wall_time") is not None:
        parts.append(f"{_number(history.get('wall_time'), '.1f')} s")
    lines = [("training", ", ".join(parts))]
    heldout = history.get("heldout_log_likelihood")
    if heldout is not None:
        lines.append(("held-out log-likelihood", f"{_number(heldout, '.4f')} nats per row"))
    return lines


def _lines(path: str, d: ModelDescription) -> list[tuple[str, str]]:
    columns, context = model_columns(d.metadata, d.input_dim, d.context_dim, printable(path))
    layers = group_layers(d.layers) or ["(none)"]
    bounds = _bounds(columns, d.data_bounds) + _bounds(context, d.context_bounds)
    lines = [
        ("model", path),
        ("builder", d.builder or "(unknown)"),
        *[("layers" if i == 0 else "", line) for i, line in enumerate(layers)],
        ("dims", f"{d.input_dim} data, {d.context_dim} context"),
        ("columns", ", ".join(columns)),
        ("context columns", ", ".join(context) if context else "(unconditional)"),
        ("parameters", f"{d.num_parameters:,}"),
        ("dtype", d.dtype),
        ("data transforms", ", ".join(d.data_transforms) or "(none)"),
        ("bounds", "; ".join(bounds) or "(none)"),
        *_training(d.metadata.get("history")),
    ]
    settings = d.metadata.get("settings")
    if isinstance(settings, dict) and settings.get("data"):
        lines.append(("fitted on", str(settings["data"])))
    if d.metadata.get("created_by"):
        lines.append(("created by", str(d.metadata["created_by"])))
    return lines


def run(args: argparse.Namespace) -> int:
    """Run ``pyroflows info``."""
    description = describe_model(args.model)
    path = "<stdin>" if args.model == "-" else args.model
    lines = _lines(path, description)
    width = max(len(key) for key, _ in lines)
    for key, value in lines:
        say(f"{key + ':' if key else '':<{width + 1}} {value}")
    return 0
