"""Argument checks: the one place for the rules "a positive integer", "a finite number".

Every public function that takes a count, a size or a tolerance validates it here, so the
rule and its error message are written once.

Example:
    >>> from pyroflows.checks import check_int
    >>> check_int("num_layers", 4)
    4
    >>> check_int("num_layers", 0)
    Traceback (most recent call last):
    ...
    ValueError: num_layers must be an integer >= 1, got 0
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

__all__ = ["is_int", "is_real", "check_int", "check_real"]


def is_int(value: Any) -> bool:
    """Whether ``value`` is an integer (Python or NumPy), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool | np.bool_)


def is_real(value: Any) -> bool:
    """Whether ``value`` is a finite real number (Python or NumPy), not a bool."""
    return (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool | np.bool_)
        and math.isfinite(value)
    )


def check_int(name: str, value: Any, low: int = 1, *, optional: bool = False) -> Any:
    """Return ``value`` if it is an integer ``>= low`` (or ``None`` when ``optional``).

    Raises:
        ValueError: naming ``name`` and the value given.
    """
    if optional and value is None:
        return None
    if not (is_int(value) and value >= low):
        extra = " or None" if optional else ""
        raise ValueError(f"{name} must be an integer >= {low}{extra}, got {value!r}")
    return int(value)


def check_real(name: str, value: Any, *, positive: bool = False, optional: bool = False) -> Any:
    """Return ``value`` as a float if it is a finite number (``> 0`` when ``positive``).

    Raises:
        ValueError: naming ``name`` and the value given.
    """
    if optional and value is None:
        return None
    if not (is_real(value) and (value > 0 or not positive)):
        what = "a positive finite number" if positive else "a finite number"
        extra = " or None" if optional else ""
        raise ValueError(f"{name} must be {what}{extra}, got {value!r}")
    return float(value)
