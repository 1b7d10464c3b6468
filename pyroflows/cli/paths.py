"""Checks on the files a command reads and writes, done before any work starts."""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence

from ..files import check_not_an_input, same_file
from .text import CLIError, printable

STDIO = "-"


def check_inputs(named: Sequence[tuple[str, str | None]]) -> None:
    """Refuse standard input used twice and a directory given as an input file.

    ``named`` holds (option, path) pairs, e.g. ``[("DATA.csv", "d.csv"), ("--context", None)]``.
    """
    stdin = [option for option, path in named if path == STDIO]
    if len(stdin) > 1:
        raise CLIError(f"only one input can be read from standard input ('-'): {', '.join(stdin)}")
    for option, path in named:
        if path not in (None, STDIO) and os.path.isdir(path):
            raise CLIError(f"{option} {printable(path)} is a directory, not a file")


def check_distinct(data: str, context: str | None, hint: str) -> None:
    """Refuse ``--context`` naming the same table as the data (``hint`` says what to do)."""
    if context is not None and (context == data != STDIO or same_file(data, context)):
        raise CLIError(f"--context {printable(context)} is the data table itself; {hint}")


def check_output(
    path: str | None,
    inputs: Sequence[str | None],
    *,
    option: str = "--out",
    stdout: str | None = "",
) -> None:
    """Fail early if ``path`` cannot be written, or is one of ``inputs``.

    ``None`` and ``-`` mean standard output, refused when ``stdout`` is a reason why not
    (e.g. "a model is a binary file"). Existing non-regular files (devices, FIFOs) are
    refused too: the atomic replacement would swap them for a plain file.
    """
    if path is None or path == STDIO:
        if stdout:
            raise CLIError(f"{option} -: cannot write to standard output: {stdout}")
        return
    try:
        check_not_an_input(path, inputs, option)
    except ValueError as error:
        raise CLIError(printable(error)) from None
    shown = printable(path)
    if path.endswith(("/", os.sep)) or os.path.isdir(path):
        raise CLIError(f"{option} {shown} is a directory; give a file name")
    if os.path.exists(path) and not stat.S_ISREG(os.stat(path).st_mode):
        raise CLIError(f"{option} {shown} is not a regular file; use '-' for standard output")
    check_folder(os.path.dirname(path) or ".", f"cannot write {shown}")


def check_folder(folder: str, context: str) -> None:
    """Fail if ``folder`` does not exist or cannot be written into."""
    shown = printable(folder)
    if not os.path.isdir(folder):
        raise CLIError(f"{context}: folder {shown} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise CLIError(f"{context}: folder {shown} is not writable")
