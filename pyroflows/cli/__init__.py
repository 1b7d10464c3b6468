"""The ``pyroflows`` command: fit, sample, score and inspect flows on CSV tables.

Subcommands (one module each):

* ``pyroflows fit DATA.csv --out MODEL``: fit a flow to the columns of a table;
* ``pyroflows sample MODEL -n N``: draw rows from a fitted flow (per context row if it is
  conditional), streamed to CSV;
* ``pyroflows logprob MODEL DATA.csv``: log-density of every row of a table;
* ``pyroflows info MODEL``: what a model file holds;
* ``pyroflows demo``: fit a small flow to a built-in 2-D toy density and plot it.

``-`` is standard input for every input and standard output for every table written.
Files are written atomically (`pyroflows.files.atomic_write`), and an output that is also
an input is refused before any work. Expected problems (a missing file, a non-numeric
column, NaN rows, a file that is not a model, a folder that cannot be written, ...) are
reported as one line ``pyroflows: error: ...`` on stderr with exit status 1 (2 for a bad
command line); anything else is a bug and shows its traceback.

`main` is the entry point of the console script and of ``python -m pyroflows``; it can
also be called with an argument list, e.g. ``main(["info", "model.pt"])``.
"""

from __future__ import annotations

from .app import main
from .parser import build_parser
from .text import CLIError

__all__ = ["main", "CLIError", "build_parser"]
