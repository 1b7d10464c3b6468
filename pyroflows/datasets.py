"""Two-dimensional toy densities for trying out and testing flows.

Every dataset is a function ``name(n, *, seed, noise, dtype)`` returning a tensor of shape
``(n, 2)``. Each call draws from its own `torch.Generator` seeded with ``seed``, so the same
arguments always give the same tensor and the global random state is never touched. The
points lie roughly within ``[-4, 4]`` on both axes, the range of a standard normal flow's
base, so a flow with spline ``bound`` 4 or 5 covers them.

| name | shape |
| --- | --- |
| `two_moons` | two interleaved half circles |
| `eight_gaussians` | eight Gaussian blobs on a circle |
| `checkerboard` | uniform on the dark squares of a 4 x 4 board |
| `spirals` | two interleaved spiral arms |
| `rings` | four concentric rings |

`TOY_DATASETS` maps the names to the functions and `load_toy` looks one up by name.

Example:
    >>> from pyroflows import datasets
    >>> x = datasets.load_toy("two_moons", 1000, seed=1)
    >>> x.shape, x.dtype
    (torch.Size([1000, 2]), torch.float32)
"""

from __future__ import annotations

import contextlib
import functools
import math
import numbers
import operator
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .checks import check_int

__all__ = [
    "two_moons",
    "eight_gaussians",
    "checkerboard",
    "spirals",
    "rings",
    "TOY_DATASETS",
    "load_toy",
]


def _check_n(n: Any) -> int:
    """``n`` as an int ``>= 1``; integer tensors and other objects with ``__index__`` count."""
    if not isinstance(n, bool | numbers.Integral) and hasattr(n, "__index__"):
        with contextlib.suppress(TypeError):
            n = operator.index(n)  # a 0-d integer tensor or array, say
    return check_int("n", n)


def _setup(
    n: int, seed: int, noise: float, dtype: torch.dtype
) -> tuple[int, float, torch.Generator]:
    """Check the common arguments; return ``n``, ``noise`` and a generator seeded with ``seed``."""
    n = _check_n(n)
    try:
        noise = float(noise)
    except (TypeError, ValueError):
        raise ValueError(f"noise must be a finite number >= 0, got {noise!r}") from None
    if not (math.isfinite(noise) and noise >= 0):
        raise ValueError(f"noise must be a finite number >= 0, got {noise!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating point torch.dtype, got {dtype!r}")
    try:
        seed = operator.index(seed)
    except TypeError:
        raise ValueError(f"seed must be an integer, got {seed!r}") from None
    return n, noise, torch.Generator().manual_seed(seed)


def _finish(x: Tensor, noise: float, generator: torch.Generator, dtype: torch.dtype) -> Tensor:
    """Add isotropic Gaussian noise of standard deviation ``noise`` and cast to ``dtype``."""
    if noise > 0:
        x = x + noise * torch.randn(x.shape, generator=generator, dtype=x.dtype)
    return x.to(dtype)


def _uniform(n: int, generator: torch.Generator) -> Tensor:
    return torch.rand(n, generator=generator, dtype=torch.float64)


def _halves(n: int, generator: torch.Generator) -> Tensor:
    """Boolean labels, half of them (rounded down) true, in random order."""
    return torch.randperm(n, generator=generator) % 2 == 1


def _on_host(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """Draw on the CPU whatever the default device: the points come from a seeded CPU
    generator, and are the same on every machine."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Tensor:
        with torch.device("cpu"):
            return fn(*args, **kwargs)

    return wrapper


@_on_host
def two_moons(
    n: int = 10_000, *, seed: int = 0, noise: float = 0.15, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Two interleaved half circles ("moons").

    The moons have radius 2 and are centred so the points span about ``[-3, 3]``
    horizontally and ``[-1.5, 1.5]`` vertically before noise. Each moon holds half the
    points, spread uniformly along its arc.

    Args:
        n: number of points.
        seed: seed of the generator the points are drawn from.
        noise: standard deviation of the Gaussian noise added to each coordinate.
        dtype: floating dtype of the result.

    Returns:
        Tensor of shape ``(n, 2)``.

    Raises:
        ValueError: if ``n < 1``, ``noise < 0`` or ``dtype`` is not a floating dtype.

    Example:
        >>> from pyroflows.datasets import two_moons
        >>> x = two_moons(500, seed=3)
        >>> x.shape
        torch.Size([500, 2])
        >>> bool((two_moons(500, seed=3) == x).all())
        True
    """
    n, noise, g = _setup(n, seed, noise, dtype)
    lower = _halves(n, g)
    t = math.pi * _uniform(n, g)
    x = torch.where(lower, 1.0 - torch.cos(t), torch.cos(t))
    y = torch.where(lower, 0.5 - torch.sin(t), torch.sin(t))
    points = 2.0 * torch.stack([x - 0.5, y - 0.25], dim=-1)
    return _finish(points, noise, g, dtype)


@_on_host
def eight_gaussians(
    n: int = 10_000,
    *,
    seed: int = 0,
    noise: float = 0.25,
    dtype: torch.dtype = torch.float32,
    radius: float = 2.5,
) -> Tensor:
    """A mixture of eight equally weighted Gaussians on a circle.

    The means sit at angles ``0, 45, ..., 315`` degrees on a circle of radius ``radius``;
    every component is isotropic with standard deviation ``noise``.

    Args:
        n: number of points.
        seed: seed of the generator the points are drawn from.
        noise: standard deviation of each Gaussian.
        dtype: floating dtype of the result.
        radius: radius of the circle of means.

    Returns:
        Tensor of shape ``(n, 2)``.

    Raises:
        ValueError: if ``n < 1``, ``noise < 0`` or ``dtype`` is not a floating dtype.

    Example:
        >>> import torch
        >>> from pyroflows.datasets import eight_gaussians
        >>> eight_gaussians(100, noise=0.0).norm(dim=-1).allclose(torch.tensor(2.5))
        True
    """
    n, noise, g = _setup(n, seed, noise, dtype)
    component = torch.randint(8, (n,), generator=g, dtype=torch.int64)
    angle = component.to(torch.float64) * (math.pi / 4)
    points = radius * torch.stack([torch.cos(angle), torch.sin(angle)], dim=-1)
    return _finish(points, noise, g, dtype)


@_on_host
def checkerboard(
    n: int = 10_000, *, seed: int = 0, noise: float = 0.0, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Uniform density on the eight dark squares of a 4 x 4 checkerboard on ``[-3, 3]^2``.

    The squares have side 1.5; the square in the bottom-left corner is dark. With the
    default ``noise=0`` the density has sharp edges, a hard case for smooth flows.

    Args:
        n: number of points.
        seed: seed of the generator the points are drawn from.
        noise: standard deviation of Gaussian noise added to each coordinate (none by
            default).
        dtype: floating dtype of the result.

    Returns:
        Tensor of shape ``(n, 2)``.

    Raises:
        ValueError: if ``n < 1``, ``noise < 0`` or ``dtype`` is not a floating dtype.

    Example:
        >>> from pyroflows.datasets import checkerboard
        >>> x = checkerboard(1000)
        >>> bool((x.abs() <= 3).all())
        True
        >>> cells = ((x + 3) // 1.5).long()
        >>> bool((cells.sum(-1) % 2 == 0).all())
        True
    """
    n, noise, g = _setup(n, seed, noise, dtype)
    column = torch.randint(4, (n,), generator=g, dtype=torch.int64)
    row = 2 * torch.randint(2, (n,), generator=g, dtype=torch.int64) + column % 2
    cell = torch.stack([column, row], dim=-1).to(torch.float64)
    offset = torch.rand((n, 2), generator=g, dtype=torch.float64)
    points = 1.5 * (cell + offset) - 3.0
    return _finish(points, noise, g, dtype)


@_on_host
def spirals(
    n: int = 10_000,
    *,
    seed: int = 0,
    noise: float = 0.1,
    dtype: torch.dtype = torch.float32,
    turns: float = 1.5,
) -> Tensor:
    """Two interleaved spiral arms, each the other rotated by 180 degrees.

    Each arm is the Archimedean spiral ``r = 3 t / T`` for angles ``t`` in ``[0, T]``,
    ``T = 2 pi turns``, so it reaches radius 3. Points are spread about uniformly along the
    arm (the angle is drawn with density proportional to ``t``), half of them on each arm.

    Args:
        n: number of points.
        seed: seed of the generator the points are drawn from.
        noise: standard deviation of the Gaussian noise added to each coordinate.
        dtype: floating dtype of the result.
        turns: number of turns of each arm.

    Returns:
        Tensor of shape ``(n, 2)``.

    Raises:
        ValueError: if ``n < 1``, ``noise < 0``, ``turns <= 0`` or ``dtype`` is not a
            floating dtype.

    Example:
        >>> from pyroflows.datasets import spirals
        >>> bool((spirals(1000, noise=0.0).norm(dim=-1) <= 3.0 + 1e-6).all())
        True
    """
    n, noise, g = _setup(n, seed, noise, dtype)
    if not turns > 0:
        raise ValueError(f"turns must be positive, got {turns!r}")
    total = 2 * math.pi * turns
    second = _halves(n, g)
    t = total * _uniform(n, g).sqrt()
    r = 3.0 * t / total
    points = r[:, None] * torch.stack([torch.cos(t), torch.sin(t)], dim=-1)
    points = torch.where(second[:, None], -points, points)
    return _finish(points, noise, g, dtype)


@_on_host
def rings(
    n: int = 10_000,
    *,
    seed: int = 0,
    noise: float = 0.08,
    dtype: torch.dtype = torch.float32,
    num_rings: int = 4,
) -> Tensor:
    """Concentric circles with radii ``0.75, 1.5, ..., 0.75 * num_rings``.

    Points are spread uniformly along the rings, so each ring's share of the points is
    proportional to its radius.

    Args:
        n: number of points.
        seed: seed of the generator the points are drawn from.
        noise: standard deviation of the Gaussian noise added to each coordinate.
        dtype: floating dtype of the result.
        num_rings: number of rings (at most 5 keeps the points within ``[-4, 4]``).

    Returns:
        Tensor of shape ``(n, 2)``.

    Raises:
        ValueError: if ``n < 1``, ``noise < 0``, ``num_rings < 1`` or ``dtype`` is not a
            floating dtype.

    Example:
        >>> from pyroflows.datasets import rings
        >>> r = rings(1000, noise=0.0).norm(dim=-1)
        >>> sorted({round(v, 2) for v in r.tolist()})
        [0.75, 1.5, 2.25, 3.0]
    """
    n, noise, g = _setup(n, seed, noise, dtype)
    num_rings = check_int("num_rings", num_rings)
    radii = 0.75 * torch.arange(1, num_rings + 1, dtype=torch.float64)
    ring = torch.multinomial(radii, n, replacement=True, generator=g)
    angle = 2 * math.pi * _uniform(n, g)
    points = radii[ring, None] * torch.stack([torch.cos(angle), torch.sin(angle)], dim=-1)
    return _finish(points, noise, g, dtype)


TOY_DATASETS: dict[str, Callable[..., Tensor]] = {
    "two_moons": two_moons,
    "eight_gaussians": eight_gaussians,
    "checkerboard": checkerboard,
    "spirals": spirals,
    "rings": rings,
}
"""The toy datasets by name."""


def load_toy(name: str, n: int = 10_000, seed: int = 0, **kwargs: Any) -> Tensor:
    """The toy dataset ``name``: ``TOY_DATASETS[name](n, seed=seed, **kwargs)``.

    Args:
        name: a key of `TOY_DATASETS`.
        n: number of points.
        seed: seed of the generator the points are drawn from.
        **kwargs: further keywords of the dataset function (``noise``, ``dtype``, ...).

    Returns:
        Tensor of shape ``(n, 2)``.

    Raises:
        ValueError: if ``name`` is not a known dataset, or the arguments are invalid.

    Example:
        >>> import torch
        >>> from pyroflows.datasets import load_toy
        >>> load_toy("rings", 10, seed=2, dtype=torch.float64).dtype
        torch.float64
    """
    try:
        function = TOY_DATASETS[name]
    except (KeyError, TypeError):
        valid = ", ".join(TOY_DATASETS)
        raise ValueError(f"unknown toy dataset {name!r}; valid names are: {valid}") from None
    return function(n, seed=seed, **kwargs)
