"""Import the repository's scripts (examples, benchmarks) by path, for the tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def load_script(relative: str, *, siblings: bool = False) -> ModuleType:
    """Import ``ROOT / relative`` once per session, as the module ``_script_<path>``.

    The module is registered in ``sys.modules`` before it runs (dataclasses look their module
    up there) and unregistered again if it fails. ``siblings=True`` puts the script's folder on
    ``sys.path``, for scripts that import their neighbours by name.
    """
    path = ROOT / relative
    name = "_script_" + "_".join(Path(relative).with_suffix("").parts)
    if name in sys.modules:
        return sys.modules[name]
    if siblings and str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module
