"""Lazy imports of optional packages, with an error that names the extra to install.

The core library needs torch, Pyro, NumPy and ArviZ only. Plotting needs matplotlib (the
``plot`` extra) and the command line needs pandas and matplotlib (the ``cli`` extra); those
modules import them on first use through `require`, so ``import pyroflows`` works without them.

Example:
    >>> from pyroflows._optional import require
    >>> require("math", "plot").sqrt(4.0)
    2.0
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["require", "EXTRAS"]

#: What each extra of ``pyproject.toml`` serves, for the error message.
EXTRAS = {
    "plot": "plotting",
    "cli": "the command line",
    "all": "this feature",
}


def require(module: str, extra: str, purpose: str | None = None) -> ModuleType:
    """Import ``module`` (e.g. ``"matplotlib.pyplot"``), or say which extra provides it.

    Args:
        module: the dotted name to import.
        extra: the extra of ``pyroflows`` that installs its package, such as ``"plot"``.
        purpose: what needs it, for the message (default: what ``extra`` serves).

    Returns:
        The imported module.

    Raises:
        ImportError: if the import fails; the message reads, for example, "plotting needs
            matplotlib: pip install 'pyroflows[plot]'", and the original error is chained.
    """
    try:
        return importlib.import_module(module)
    except ImportError as error:
        package = module.partition(".")[0]
        what = purpose or EXTRAS.get(extra, "this feature")
        raise ImportError(
            f"{what} needs {package}: pip install 'pyroflows[{extra}]'", name=package
        ) from error
