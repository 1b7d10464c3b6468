"""Model files as the commands see them: loading, describing, and their column names."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch

from ..distribution import Flow
from ..io import ModelDescription, ModelFileError, describe, load
from .paths import STDIO
from .text import CLIError, printable

#: Rows scored or sampled per call of the flow (bounds the memory of big tables).
CHUNK_ROWS = 65_536

T = TypeVar("T")


def _read(path: str, reader: Callable[[str], T]) -> T:
    """``reader(path)``, with ``-`` read from stdin through a temporary file."""
    if path != STDIO:
        if os.path.isdir(path):
            raise CLIError(f"{printable(path)} is a directory, not a model file")
        return reader(path)
    with tempfile.TemporaryDirectory(prefix="pyroflows-") as folder:
        spooled = os.path.join(folder, "model.pt")
        with open(spooled, "wb") as handle:
            shutil.copyfileobj(sys.stdin.buffer, handle)
        try:
            return reader(spooled)
        except (ValueError, OSError) as error:  # name stdin, not the temporary file
            raise ModelFileError(str(error).replace(spooled, "<stdin>")) from None


def load_model(path: str) -> Flow:
    """The flow in ``path`` (``-``: stdin), in eval mode."""
    flow = _read(path, load)
    flow.eval()
    return flow


def describe_model(path: str) -> ModelDescription:
    """`pyroflows.io.describe` of ``path`` (``-``: stdin)."""
    return _read(path, describe)


def model_columns(
    metadata: Any, input_dim: int, context_dim: int, name: str
) -> tuple[list[str], list[str]]:
    """Data and context column names saved in a model's metadata, checked.

    A model saved without names gets ``x0, x1, ...`` (and ``c0, ...``); names that are not
    a list of distinct strings of the right length are an error.
    """
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise CLIError(f"{name}: malformed metadata (a {type(metadata).__name__}, not a mapping)")
    return (
        _names(metadata.get("columns"), input_dim, "x", "columns", name),
        _names(metadata.get("context_columns"), context_dim, "c", "context_columns", name),
    )


def _names(value: Any, count: int, prefix: str, key: str, name: str) -> list[str]:
    if value is None or (isinstance(value, list) and not value):
        return [f"{prefix}{i}" for i in range(count)]
    ok = (
        isinstance(value, list)
        and all(isinstance(v, str) for v in value)
        and len(value) == count
        and len(set(value)) == count
    )
    if not ok:
        got = type(value).__name__
        if isinstance(value, list):
            strings = all(isinstance(v, str) for v in value)
            got = f"{len(value)} item(s)" + ("" if strings else ", not all strings")
        raise CLIError(
            f"{name}: malformed metadata: {key!r} must be a list of {count} distinct "
            f"strings (one per column of the flow), got {got}"
        )
    return list(value)


def input_dtype(flow: Flow, context: bool = False) -> torch.dtype:
    """The dtype to give the flow the table's values in: float64 where the flow has fixed
    data (or context) maps, which then standardise without rounding (a column such as
    ``1.7e9 +- 100`` would lose its spread in float32); else the flow's own dtype."""
    maps = flow.context_transforms if context else flow.data_transforms
    return torch.float64 if len(maps) else next(iter(flow.parameters())).dtype


@torch.no_grad()
def log_prob(flow: Flow, x: torch.Tensor, context: torch.Tensor | None) -> Iterator[torch.Tensor]:
    """Log-densities of the rows of ``x``, ``CHUNK_ROWS`` at a time."""
    for start in range(0, len(x), CHUNK_ROWS):
        c = None if context is None else context[start : start + CHUNK_ROWS]
        yield flow.condition(c).log_prob(x[start : start + CHUNK_ROWS])
