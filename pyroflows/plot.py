"""Plots for checking a flow against data: samples, densities, corner plots, loss curves.

The functions need matplotlib (the ``plot`` extra: ``pip install 'pyroflows[plot]'``),
imported when a function is first called, so importing this module costs nothing. They use
matplotlib's object-oriented API: each draws into the axes or figure it is given (a new figure
when none is), returns it, and never calls ``plt.show()``. Data and samples may be torch tensors
(on any device, with or without gradients) or anything `numpy.asarray` accepts.

Single-panel plots (`plot_density_2d`, `plot_training_curves`, `plot_coverage`) return their
`matplotlib.axes.Axes`; multi-panel plots (`plot_samples_2d`, `plot_corner`) return the
`matplotlib.figure.Figure`.

Example:
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> import matplotlib.pyplot as plt
    >>> from pyroflows import datasets, flows, plot
    >>> flow = flows.nsf(2, coupling=True, num_layers=2)
    >>> fig = plot.plot_samples_2d(datasets.two_moons(500), flow().sample((500,)))
    >>> ax = plot.plot_density_2d(flow, resolution=50)
    >>> plt.close("all")
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from ._optional import require
from .checks import check_int, is_int

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "plot_samples_2d",
    "plot_density_2d",
    "plot_corner",
    "plot_training_curves",
    "plot_coverage",
    "plot_demo",
]

_DATA_COLOR = "C0"
_SAMPLE_COLOR = "C1"


def _matplotlib(module: str = "pyplot") -> Any:
    """``matplotlib.<module>``, imported on first use (an `ImportError` names the extra)."""
    return require(f"matplotlib.{module}", "plot")


def _pyplot() -> Any:
    return _matplotlib("pyplot")


def _as_array(x: Any, name: str) -> np.ndarray:
    """``x`` as a float64 numpy array (tensors are detached and moved to the CPU)."""
    if isinstance(x, Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    try:
        return np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} must be a tensor or an array of numbers: {error}") from None


def _as_points(x: Any, name: str, dim: int | None = None) -> np.ndarray:
    """``x`` as an ``(N, D)`` float64 array, checking its shape (and ``D == dim`` if given)."""
    array = _as_array(x, name)
    if array.ndim != 2:
        raise ValueError(f"{name} must have shape (N, D), got shape {array.shape}")
    if dim is not None and array.shape[1] != dim:
        raise ValueError(f"{name} must have shape (N, {dim}), got shape {array.shape}")
    if array.shape[0] == 0:
        raise ValueError(f"{name} is empty (shape {array.shape})")
    return array


def _subsample(x: np.ndarray, max_points: int | None, rng: np.random.Generator) -> np.ndarray:
    if max_points is None or len(x) <= max_points:
        return x
    return x[rng.choice(len(x), size=max_points, replace=False)]


def _check_bounds(bounds: Any) -> tuple[tuple[float, float], tuple[float, float]]:
    try:
        array = np.asarray(bounds, dtype=np.float64)
    except (TypeError, ValueError):
        array = np.empty(0)
    if (
        array.shape != (2, 2)
        or not np.isfinite(array).all()
        or not (array[:, 0] < array[:, 1]).all()
    ):
        raise ValueError(
            "bounds must be ((xmin, xmax), (ymin, ymax)) with finite xmin < xmax and "
            f"ymin < ymax, got {bounds!r}"
        )
    (x0, x1), (y0, y1) = array.tolist()
    return (x0, x1), (y0, y1)


def _limits(*arrays: np.ndarray, pad: float = 0.05) -> tuple[float, float]:
    """A padded range covering the finite values of ``arrays``."""
    values = np.concatenate([a.ravel() for a in arrays])
    values = values[np.isfinite(values)]
    if values.size == 0:
        return -1.0, 1.0
    lo, hi = float(values.min()), float(values.max())
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    margin = pad * (hi - lo)
    return lo - margin, hi + margin


def plot_samples_2d(
    data: Any,
    samples: Any,
    *,
    ax: Axes | Sequence[Axes] | None = None,
    overlay: bool = False,
    max_points: int | None = 5000,
    bounds: Any = None,
    s: float = 2.0,
    alpha: float = 0.5,
    labels: tuple[str, str] = ("data", "flow samples"),
    seed: int = 0,
) -> Figure:
    """Scatter plots of 2-D data and flow samples, side by side or overlaid.

    Args:
        data: points of shape ``(N, 2)``.
        samples: flow samples of shape ``(M, 2)``.
        ax: where to draw: ``None`` for a new figure, one `Axes` to overlay both sets on
            it, or a pair of axes for the side-by-side panels.
        overlay: draw both sets on one axes (implied when ``ax`` is a single `Axes`).
        max_points: at most this many points of each set are drawn, a random subset chosen
            with ``seed`` (``None`` draws all).
        bounds: ``((xmin, xmax), (ymin, ymax))`` limits of the axes; by default a range
            covering both sets, the same on both panels.
        s: marker size.
        alpha: marker opacity.
        labels: titles (side by side) or legend entries (overlaid) of the two sets.
        seed: seed of the subsampling.

    Returns:
        The figure holding the plot.

    Raises:
        ValueError: if ``data`` or ``samples`` does not have shape ``(N, 2)``, or ``ax``
            is not one axes or a pair of them.

    Example:
        >>> import matplotlib
        >>> matplotlib.use("Agg")
        >>> import matplotlib.pyplot as plt
        >>> import torch
        >>> from pyroflows.plot import plot_samples_2d
        >>> fig = plot_samples_2d(torch.randn(100, 2), torch.randn(200, 2))
        >>> tuple(len(a.collections[0].get_offsets()) for a in fig.axes)
        (100, 200)
        >>> plt.close(fig)
    """
    x = _as_points(data, "data", 2)
    y = _as_points(samples, "samples", 2)
    max_points = check_int("max_points", max_points, optional=True)
    rng = np.random.default_rng(seed)
    x, y = _subsample(x, max_points, rng), _subsample(y, max_points, rng)
    if bounds is None:
        xlim, ylim = _limits(x[:, 0], y[:, 0]), _limits(x[:, 1], y[:, 1])
    else:
        xlim, ylim = _check_bounds(bounds)
    axes, overlay = _scatter_axes(ax, overlay)
    style = {"s": s, "alpha": alpha, "linewidths": 0, "rasterized": True}
    if overlay:
        _scatter_overlaid(axes[0], x, y, labels, style)
    else:
        _scatter_side_by_side(axes, x, y, labels, style)
    for a in axes:
        a.set_xlim(xlim)
        a.set_ylim(ylim)
        a.set_aspect("equal", adjustable="box")
    return axes[0].figure


def _scatter_axes(ax: Any, overlay: bool) -> tuple[list[Axes], bool]:
    """The axes `plot_samples_2d` draws on (new ones when ``ax`` is ``None``), and whether
    both sets go on one of them."""
    if ax is None:
        plt = _pyplot()
        if overlay:
            _, single = plt.subplots(figsize=(4.5, 4.5), layout="constrained")
            return [single], True
        _, pair = plt.subplots(1, 2, figsize=(9, 4.5), layout="constrained")
        return list(pair), False
    if hasattr(ax, "scatter"):
        return [ax], True
    axes = list(np.ravel(np.asarray(ax, dtype=object)))
    if len(axes) != 2 or not all(hasattr(a, "scatter") for a in axes):
        raise ValueError("ax must be None, one matplotlib Axes or a pair of Axes")
    if overlay:
        raise ValueError("overlay=True needs a single Axes, got a pair")
    return axes, False


def _scatter_overlaid(
    ax: Axes, x: np.ndarray, y: np.ndarray, labels: tuple[str, str], style: dict[str, Any]
) -> None:
    """Both sets on one axes, with a legend."""
    ax.scatter(x[:, 0], x[:, 1], color=_DATA_COLOR, label=labels[0], **style)
    ax.scatter(y[:, 0], y[:, 1], color=_SAMPLE_COLOR, label=labels[1], **style)
    ax.legend(loc="upper right", markerscale=(25 / max(style["s"], 1e-3)) ** 0.5)


def _scatter_side_by_side(
    axes: list[Axes], x: np.ndarray, y: np.ndarray, labels: tuple[str, str], style: dict[str, Any]
) -> None:
    """Each set on its own axes, titled with its label."""
    for a, points, color, title in zip(
        axes, (x, y), (_DATA_COLOR, _SAMPLE_COLOR), labels, strict=True
    ):
        a.scatter(points[:, 0], points[:, 1], color=color, **style)
        a.set_title(title)


def _distribution(flow_or_dist: Any, context: Any) -> Any:
    """The distribution to plot: ``flow.condition(context)`` or the distribution itself."""
    if hasattr(flow_or_dist, "log_prob"):
        if context is not None:
            raise ValueError(
                "context is only used with a flow (an object with .condition); this object "
                "is already a distribution"
            )
        return flow_or_dist
    if hasattr(flow_or_dist, "condition"):
        return flow_or_dist.condition(context)
    raise TypeError(
        "plot_density_2d needs a Flow (with .condition) or a distribution (with .log_prob), "
        f"got {type(flow_or_dist).__name__}"
    )


def _reference_tensor(flow_or_dist: Any, context: Tensor | None) -> Tensor | None:
    """A tensor whose dtype and device the evaluation grid should follow."""
    if isinstance(context, Tensor) and torch.is_floating_point(context):
        return context
    if isinstance(flow_or_dist, torch.nn.Module):
        for t in itertools.chain(flow_or_dist.parameters(), flow_or_dist.buffers()):
            if torch.is_floating_point(t):
                return t
    # A distribution: look through its attributes and those of its base distributions.
    d, seen = flow_or_dist, 0
    while d is not None and seen < 10:
        for value in getattr(d, "__dict__", {}).values():
            if isinstance(value, Tensor) and torch.is_floating_point(value):
                return value
        d, seen = getattr(d, "base_dist", None), seen + 1
    return None


def plot_density_2d(
    flow_or_dist: Any,
    *,
    bounds: Any = ((-4.0, 4.0), (-4.0, 4.0)),
    resolution: int = 200,
    context: Tensor | None = None,
    ax: Axes | None = None,
    log_density: bool = False,
    contours: int = 0,
    colorbar: bool = False,
    cmap: str = "viridis",
    chunk_size: int = 16384,
) -> Axes:
    """Heat map of a 2-D flow's density ``exp(log_prob(x))`` on a grid.

    The density is evaluated at the centres of a ``resolution x resolution`` grid of pixels
    covering ``bounds``, under `torch.no_grad` and in chunks of ``chunk_size`` points. A
    `torch.nn.Module` (a `Flow`) is put in eval mode for the evaluation and restored
    afterwards. The grid follows the dtype and device of ``context``, else of the flow's
    parameters, else of the distribution's tensors.

    Args:
        flow_or_dist: a `Flow` (anything with ``condition(context)``, called with
            ``context``) or a distribution with ``log_prob`` and event shape ``(2,)``.
        bounds: ``((xmin, xmax), (ymin, ymax))`` of the grid.
        resolution: pixels along each axis.
        context: context of a conditional flow, shape ``(context_dim,)`` (one context).
        ax: axes to draw on (a new figure when ``None``).
        log_density: plot ``log_prob`` instead of the density (values more than 20 nats
            below the maximum are clipped).
        contours: number of contour lines drawn over the heat map (0 for none).
        colorbar: add a colour bar.
        cmap: matplotlib colour map.
        chunk_size: grid points per ``log_prob`` call.

    Returns:
        The axes; the density is ``ax.images[-1].get_array()``, of shape
        ``(resolution, resolution)`` with rows along y (``origin="lower"``).

    Raises:
        ValueError: if ``bounds`` or ``resolution`` are invalid, the distribution's events
            are not 2-D, or ``log_prob`` does not return one value per grid point (for
            example when ``context`` holds a batch of contexts).

    Example:
        >>> import matplotlib
        >>> matplotlib.use("Agg")
        >>> import matplotlib.pyplot as plt
        >>> from pyroflows import flows
        >>> from pyroflows.plot import plot_density_2d
        >>> ax = plot_density_2d(flows.nsf(2), resolution=64)
        >>> ax.images[0].get_array().shape
        (64, 64)
        >>> plt.close(ax.figure)
    """
    (x0, x1), (y0, y1) = _check_bounds(bounds)
    resolution = check_int("resolution", resolution, 2)
    chunk_size = check_int("chunk_size", chunk_size)
    contours = check_int("contours", contours, 0)
    xs, ys = _pixel_centres((x0, x1), resolution), _pixel_centres((y0, y1), resolution)
    log_prob = _log_prob_on_grid(flow_or_dist, context, xs, ys, chunk_size)
    image = _density_image(log_prob, log_density)

    if ax is None:
        _, ax = _pyplot().subplots(figsize=(5, 4.5), layout="constrained")
    mappable = ax.imshow(
        image,
        origin="lower",
        extent=(x0, x1, y0, y1),
        aspect="equal",
        cmap=cmap,
        interpolation="nearest",
    )
    if contours:
        ax.contour(xs.numpy(), ys.numpy(), image, levels=contours, colors="white", linewidths=0.6)
    if colorbar:
        ax.figure.colorbar(mappable, ax=ax, label="log density" if log_density else "density")
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    return ax


def _pixel_centres(limits: tuple[float, float], resolution: int) -> Tensor:
    """Centres of ``resolution`` equal pixels covering ``limits``, in float64."""
    edges = torch.linspace(limits[0], limits[1], resolution + 1, dtype=torch.float64)
    return (edges[1:] + edges[:-1]) / 2


def _log_prob_on_grid(
    flow_or_dist: Any, context: Tensor | None, xs: Tensor, ys: Tensor, chunk_size: int
) -> np.ndarray:
    """``log_prob`` at every ``(x, y)`` of the grid, shape ``(len(ys), len(xs))`` (row i is
    ``ys[i]``), without gradients and with a module in eval mode (its mode is restored)."""
    reference = _reference_tensor(flow_or_dist, context)
    dtype = reference.dtype if reference is not None else torch.get_default_dtype()
    device = reference.device if reference is not None else torch.device("cpu")
    # Pixel centres, row-major with x varying fastest: row i is y_i.
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    grid = torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], dim=-1)
    grid = grid.to(device=device, dtype=dtype)

    module = flow_or_dist if isinstance(flow_or_dist, torch.nn.Module) else None
    was_training = module.training if module is not None else False
    try:
        if module is not None:
            module.eval()
        with torch.no_grad():
            d = _single_2d_distribution(flow_or_dist, context)
            log_prob = _chunked_log_prob(d, grid, chunk_size)
    finally:
        if module is not None:
            module.train(was_training)
    return log_prob.reshape(len(ys), len(xs)).numpy()


def _single_2d_distribution(flow_or_dist: Any, context: Tensor | None) -> Any:
    """The distribution to plot, checked to be one density over 2-D points."""
    if isinstance(context, Tensor) and context.dim() > 1 and context.shape[:-1].numel() > 1:
        raise ValueError(
            f"plot_density_2d draws one density: pass a single context of shape "
            f"(context_dim,), got a batch of shape {tuple(context.shape)}"
        )
    d = _distribution(flow_or_dist, context)
    batch_shape = tuple(getattr(d, "batch_shape", ()))
    if math.prod(batch_shape) > 1:
        raise ValueError(
            f"plot_density_2d draws one density, got a distribution of batch shape {batch_shape}"
        )
    event_shape = tuple(getattr(d, "event_shape", (2,)))
    if event_shape != (2,):
        raise ValueError(
            f"plot_density_2d needs a distribution over 2-D points, got event shape {event_shape}"
        )
    return d


def _chunked_log_prob(d: Any, grid: Tensor, chunk_size: int) -> Tensor:
    """``d.log_prob`` of the rows of ``grid``, ``chunk_size`` at a time, as float64 on the CPU."""
    chunks = []
    for chunk in grid.split(chunk_size):
        log_prob = d.log_prob(chunk)
        if log_prob.numel() != len(chunk):
            raise ValueError(
                f"log_prob returned shape {tuple(log_prob.shape)} for {len(chunk)} grid "
                "points; plot_density_2d needs one value per point (pass a single "
                "context of shape (context_dim,))"
            )
        chunks.append(log_prob.reshape(-1).to("cpu", torch.float64))
    return torch.cat(chunks)


def _density_image(log_prob: np.ndarray, log_density: bool) -> np.ndarray:
    """The density, or the log density clipped to 20 nats below its maximum."""
    if not log_density:
        return np.exp(log_prob)
    finite = log_prob[np.isfinite(log_prob)]
    top = float(finite.max()) if finite.size else 0.0
    return np.clip(np.nan_to_num(log_prob, nan=-np.inf), top - 20.0, top)


def plot_corner(
    data: Any,
    samples: Any,
    *,
    labels: Sequence[str] | None = None,
    max_points: int | None = 2000,
    bins: int = 40,
    fig: Figure | None = None,
    s: float = 1.0,
    alpha: float = 0.4,
    names: tuple[str, str] = ("data", "flow samples"),
    seed: int = 0,
) -> Figure:
    """Corner plot of flow samples against data, for any dimension ``D >= 2``.

    The ``D x D`` grid of panels shows, on the diagonal, histograms of each coordinate of
    both sets (normalised as densities, on shared bins) and, below it, scatter plots of
    every pair of coordinates with both sets overlaid. Panels above the diagonal are hidden.
    Axis ranges cover both sets, from their 0.1% to 99.9% quantiles.

    Args:
        data: points of shape ``(N, D)``.
        samples: flow samples of shape ``(M, D)``.
        labels: names of the ``D`` coordinates (default ``x_0, ..., x_{D-1}``).
        max_points: at most this many points of each set are scattered, a random subset
            chosen with ``seed`` (``None`` scatters all); histograms use every point.
        bins: number of histogram bins.
        fig: an empty figure to draw in (a new one, sized for ``D``, when ``None``).
        s: marker size.
        alpha: marker opacity.
        names: legend entries of the two sets.
        seed: seed of the subsampling.

    Returns:
        The figure; ``fig.axes`` holds the ``D * D`` panels in row-major order.

    Raises:
        ValueError: if ``data`` and ``samples`` are not ``(N, D)`` arrays with the same
            ``D >= 2``, ``labels`` does not have ``D`` entries, or ``fig`` already has axes.

    Example:
        >>> import matplotlib
        >>> matplotlib.use("Agg")
        >>> import matplotlib.pyplot as plt
        >>> import torch
        >>> from pyroflows.plot import plot_corner
        >>> fig = plot_corner(torch.randn(300, 3), torch.randn(300, 3))
        >>> len(fig.axes)
        9
        >>> plt.close(fig)
    """
    x, y, labels = _corner_inputs(data, samples, labels)
    max_points = check_int("max_points", max_points, optional=True)
    bins = check_int("bins", bins)
    dim = x.shape[1]
    ranges = _corner_ranges(np.concatenate([x, y]))
    fig, axes = _corner_axes(fig, dim)
    rng = np.random.default_rng(seed)
    xs, ys = _subsample(x, max_points, rng), _subsample(y, max_points, rng)
    style = {"s": s, "alpha": alpha, "linewidths": 0, "rasterized": True}
    for i, j in itertools.product(range(dim), range(dim)):
        a = axes[i, j]
        if j > i:
            a.set_visible(False)
            continue
        if i == j:
            edges = np.linspace(*ranges[j], bins + 1)
            for points, color in ((x, _DATA_COLOR), (y, _SAMPLE_COLOR)):
                a.hist(points[:, j], bins=edges, density=True, histtype="step", color=color)
        else:
            a.scatter(xs[:, j], xs[:, i], color=_DATA_COLOR, **style)
            a.scatter(ys[:, j], ys[:, i], color=_SAMPLE_COLOR, **style)
            a.set_ylim(ranges[i])
        a.set_xlim(ranges[j])
        _label_corner_panel(a, i, j, labels)
    _corner_ticks(axes)
    _corner_legend_and_margins(fig, names)
    return fig


def _corner_inputs(
    data: Any, samples: Any, labels: Sequence[str] | None
) -> tuple[np.ndarray, np.ndarray, Sequence[str]]:
    """``data`` and ``samples`` as ``(N, D)`` arrays of the same ``D >= 2``, and the labels."""
    x = _as_points(data, "data")
    y = _as_points(samples, "samples")
    dim = x.shape[1]
    if dim < 2:
        raise ValueError(f"plot_corner needs D >= 2 coordinates, got data of shape {x.shape}")
    if y.shape[1] != dim:
        raise ValueError(
            f"data and samples must have the same number of coordinates, got shapes "
            f"{x.shape} and {y.shape}"
        )
    if labels is None:
        labels = [f"$x_{{{i}}}$" for i in range(dim)]
    elif isinstance(labels, str) or len(labels) != dim:
        raise ValueError(f"labels must be a sequence of {dim} strings, got {labels!r}")
    return x, y, labels


def _corner_ranges(points: np.ndarray) -> list[tuple[float, float]]:
    """Robust per-coordinate ranges: the 0.1% to 99.9% quantiles of the finite values, padded."""
    ranges = []
    for j in range(points.shape[1]):
        column = points[:, j][np.isfinite(points[:, j])]
        if column.size == 0:
            ranges.append((-1.0, 1.0))
            continue
        lo, hi = np.quantile(column, [0.001, 0.999])
        ranges.append(_limits(np.array([lo, hi])))
    return ranges


def _corner_axes(fig: Figure | None, dim: int) -> tuple[Figure, np.ndarray]:
    """The figure and its ``dim x dim`` grid of axes: in ``fig`` (which must be empty), or in a
    new figure sized for ``dim``."""
    panel = 2.0 if dim <= 5 else max(1.2, 10.0 / dim)
    if fig is None:
        fig = _pyplot().figure(figsize=(panel * dim, panel * dim))
    elif fig.axes:
        raise ValueError("fig must be an empty figure (it already has axes)")
    return fig, fig.subplots(dim, dim, squeeze=False)


def _label_corner_panel(a: Axes, i: int, j: int, labels: Sequence[str]) -> None:
    """Axis labels on the outer panels only; inner panels lose their tick labels."""
    if i == len(labels) - 1:
        a.set_xlabel(labels[j])
    else:
        a.tick_params(labelbottom=False)
    if j == 0 and i > 0:
        a.set_ylabel(labels[i])
    elif j > 0:
        a.tick_params(labelleft=False)


def _corner_ticks(axes: np.ndarray) -> None:
    """A few ticks per axis (none on the histograms' density axes); small labels when crowded."""
    ticker = _matplotlib("ticker")
    dim = len(axes)
    ticks = 3 if dim > 4 else 4
    for i, j in itertools.product(range(dim), range(dim)):
        a = axes[i, j]
        a.xaxis.set_major_locator(ticker.MaxNLocator(ticks))
        if i == j:
            a.set_yticks([])
        else:
            a.yaxis.set_major_locator(ticker.MaxNLocator(ticks))
        if dim > 5:
            a.tick_params(labelsize="x-small")


def _corner_legend_and_margins(fig: Figure, names: tuple[str, str]) -> None:
    """The legend of the two sets, and margins of fixed size in inches."""
    lines = _matplotlib("lines")
    handles = [
        lines.Line2D([], [], color=c, label=n)
        for c, n in zip((_DATA_COLOR, _SAMPLE_COLOR), names, strict=True)
    ]
    fig.legend(handles=handles, loc="upper right", frameon=False)
    # Margins of fixed size in inches: room for the outer tick labels and axis labels.
    width, height = fig.get_size_inches()
    fig.subplots_adjust(
        left=min(0.8 / width, 0.3),
        right=1 - min(0.15 / width, 0.1),
        bottom=min(0.7 / height, 0.3),
        top=1 - min(0.15 / height, 0.1),
        wspace=0.08,
        hspace=0.08,
    )


def _history_field(history: Any, key: str) -> Any:
    if isinstance(history, Mapping):
        return history.get(key)
    return getattr(history, key, None)


def _losses(values: Any, name: str) -> np.ndarray:
    if values is None:
        return np.empty(0)
    try:
        return np.array([float(v) for v in values], dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"history.{name} must be a sequence of numbers") from None


def _best_epoch(best: Any, epochs: int) -> int | None:
    """``best`` checked to be an index into ``epochs`` losses (``None`` or negative: none)."""
    if best is None:
        return None
    if not is_int(best):
        raise ValueError(f"history.best_epoch must be an integer or None, got {best!r}")
    if best < 0:
        return None
    if best >= epochs:
        raise ValueError(f"history.best_epoch={best} is not an epoch index (0 to {epochs - 1})")
    return int(best)


def plot_training_curves(history: Any, *, ax: Axes | None = None, log_scale: bool = False) -> Axes:
    """Training and validation loss per epoch, with the best epoch marked.

    Epochs are numbered from 0, as indices into the loss lists: the loss of epoch ``k`` is
    ``train_loss[k]``, and ``best_epoch`` is such an index.

    Args:
        history: an object with attributes ``train_loss`` (list of floats), ``val_loss``
            (list of floats, may be empty) and ``best_epoch`` (index of the best epoch;
            ``None`` or negative for none), or a mapping with those keys, such as the
            `pyroflows.training.FitHistory` returned by `fit`. Only ``train_loss`` is
            required.
        ax: axes to draw on (a new figure when ``None``).
        log_scale: logarithmic loss axis (only sensible for positive losses).

    Returns:
        The axes. The lines are, in order: training loss, validation loss (if any), and the
        vertical line at the best epoch (if any).

    Raises:
        ValueError: if ``train_loss`` is missing or empty, or ``best_epoch`` is not an index
            into the validation (else training) losses.

    Example:
        >>> import matplotlib
        >>> matplotlib.use("Agg")
        >>> import matplotlib.pyplot as plt
        >>> from pyroflows.plot import plot_training_curves
        >>> history = {"train_loss": [3.0, 2.0, 1.5], "val_loss": [3.1, 2.2, 2.4],
        ...            "best_epoch": 1}
        >>> ax = plot_training_curves(history)
        >>> print(", ".join(line.get_label() for line in ax.get_lines()))
        train, validation, best epoch (1)
        >>> plt.close(ax.figure)
    """
    train = _losses(_history_field(history, "train_loss"), "train_loss")
    if train.size == 0:
        raise ValueError("history must have a non-empty train_loss")
    val = _losses(_history_field(history, "val_loss"), "val_loss")
    reference = val if val.size else train
    best = _best_epoch(_history_field(history, "best_epoch"), len(reference))
    if ax is None:
        _, ax = _pyplot().subplots(figsize=(6, 4), layout="constrained")
    ax.plot(np.arange(len(train)), train, color=_DATA_COLOR, label="train")
    if val.size:
        ax.plot(np.arange(len(val)), val, color=_SAMPLE_COLOR, label="validation")
    if best is not None:
        ax.axvline(best, color="0.4", linestyle="--", linewidth=1, label=f"best epoch ({best})")
        ax.scatter([best], [reference[best]], color="k", zorder=3, s=20)
    if log_scale:
        ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.xaxis.set_major_locator(_matplotlib("ticker").MaxNLocator(integer=True))
    ax.legend()
    return ax


def plot_coverage(coverage: Any, *, ax: Axes | None = None, label: str = "posterior") -> Axes:
    """Expected coverage against credibility level, with the diagonal and its sampling band.

    Args:
        coverage: a `pyroflows.workflow.Coverage` (from `expected_coverage`).
        ax: axes to draw on (a new figure when ``None``).
        label: legend label of the coverage curve.

    Returns:
        The axes. Below the diagonal: overconfident posteriors; above: underconfident. The
        shaded band is two standard errors of a calibrated posterior's coverage with this
        many pairs.

    Example:
        >>> import matplotlib
        >>> matplotlib.use("Agg")
        >>> import matplotlib.pyplot as plt, torch
        >>> from pyroflows import flows
        >>> from pyroflows.plot import plot_coverage
        >>> from pyroflows.workflow import expected_coverage
        >>> flow = flows.maf(1, 1, num_layers=1, hidden_dims=(8,))
        >>> ax = plot_coverage(expected_coverage(flow, torch.randn(50, 1), torch.randn(50, 1)))
        >>> print(", ".join(line.get_label() for line in ax.get_lines()))
        calibrated, posterior
        >>> plt.close(ax.figure)
    """
    levels = _as_array(coverage.levels, "levels")
    fraction = _as_array(coverage.coverage, "coverage")
    pairs = len(coverage.credibility)
    if ax is None:
        ax = _pyplot().subplots(figsize=(4.5, 4.5))[1]
    band = 2.0 * np.sqrt(levels * (1.0 - levels) / pairs)
    ax.fill_between(levels, levels - band, levels + band, color="0.85", lw=0)
    ax.plot([0, 1], [0, 1], color="0.4", ls="--", lw=1, label="calibrated")
    ax.plot(levels, fraction, color=_SAMPLE_COLOR, lw=2, label=label)
    ax.set(
        xlim=(0, 1),
        ylim=(0, 1),
        xlabel="credibility level",
        ylabel="expected coverage",
        title=f"coverage ({pairs} pairs)",
    )
    ax.legend(loc="upper left", frameon=False)
    return ax


def _demo_limits(data: np.ndarray) -> tuple[tuple[float, float], tuple[float, float]]:
    """Axis limits around the central 99.8% of 2-D ``data``, padded."""
    low, high = np.quantile(data, 0.001, axis=0), np.quantile(data, 0.999, axis=0)
    pad = 0.15 * (high - low) + 0.1
    (x0, y0), (x1, y1) = (low - pad).tolist(), (high + pad).tolist()
    return (x0, x1), (y0, y1)


def _demo_data_figure(plt: Any, x: np.ndarray, bounds: Any, panel: Any, title: str) -> Figure:
    fig, ax = plt.subplots(figsize=panel, layout="constrained")
    ax.scatter(x[:, 0], x[:, 1], s=2, alpha=0.5, linewidths=0, color=_DATA_COLOR, rasterized=True)
    ax.set(xlim=bounds[0], ylim=bounds[1], aspect="equal", title=f"data: {title} ({len(x)} points)")
    return fig


def _demo_overview(
    plt: Any, data: Any, samples: Any, flow: Any, history: Any, bounds: Any, resolution: int
) -> Figure:
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.4), layout="constrained")
    plot_samples_2d(data, samples, ax=axes[:2], bounds=bounds)
    plot_density_2d(flow, bounds=bounds, resolution=resolution, ax=axes[2], contours=6)
    axes[2].set_title("flow density")
    plot_training_curves(history, ax=axes[3])
    axes[3].set_title("training loss")
    return fig


def plot_demo(
    data: Any, samples: Any, flow: Any, history: Any, *, title: str = "", resolution: int = 200
) -> dict[str, Figure]:
    """The figures of ``pyroflows demo``: a 2-D flow fitted to toy data, from every side.

    Panel sizes follow the data's aspect ratio, so the plots have no empty bands. The caller
    saves the figures (and closes them).

    Args:
        data: the training points, shape ``(N, 2)``.
        samples: samples from the fitted flow, shape ``(M, 2)``.
        flow: the fitted 2-D flow (or its distribution), drawn by `plot_density_2d`.
        history: the training history (see `plot_training_curves`); its ``best_val_loss``,
            if finite, is shown as the held-out log-likelihood.
        title: name of the dataset, for the titles.
        resolution: grid points per axis of the density plots.

    Returns:
        The figures by name: ``data``, ``samples``, ``density``, ``training`` and
        ``overview`` (the other four panels in one figure).

    Example:
        >>> import matplotlib
        >>> matplotlib.use("Agg")
        >>> import matplotlib.pyplot as plt
        >>> from pyroflows import datasets, flows
        >>> flow = flows.nsf(2, coupling=True, num_layers=1)
        >>> history = {"train_loss": [2.5, 2.2], "val_loss": [2.6, 2.3], "best_epoch": 1}
        >>> figures = plot_demo(datasets.two_moons(200), flow().sample((200,)), flow, history,
        ...                     title="two moons", resolution=20)
        >>> sorted(figures)
        ['data', 'density', 'overview', 'samples', 'training']
        >>> plt.close("all")
    """
    plt = _pyplot()
    x = _as_points(data, "data", 2)
    xlim, ylim = _demo_limits(x)
    bounds = (xlim, ylim)
    aspect = (ylim[1] - ylim[0]) / (xlim[1] - xlim[0])
    panel = (4.5, min(max(4.5 * aspect, 2.0), 6.0) + 0.6)
    best = _history_field(history, "best_val_loss")
    heldout = f" (held-out log-likelihood {-best:.3f})" if _finite(best) else ""
    figures = {"data": _demo_data_figure(plt, x, bounds, panel, title)}
    figures["samples"], axes = plt.subplots(
        1, 2, figsize=(2 * panel[0], panel[1]), layout="constrained"
    )
    plot_samples_2d(data, samples, ax=axes, bounds=bounds)
    figures["density"], ax = plt.subplots(
        figsize=(panel[0] + 0.3, panel[1] + 0.2), layout="constrained"
    )
    plot_density_2d(flow, bounds=bounds, resolution=resolution, ax=ax, contours=6)
    ax.set_title(f"flow density{heldout}")
    figures["training"], ax = plt.subplots(figsize=(6, 4), layout="constrained")
    plot_training_curves(history, ax=ax)
    ax.set(ylabel="negative log-likelihood (nats per point)", title="training")
    figures["overview"] = _demo_overview(plt, data, samples, flow, history, bounds, resolution)
    figures["overview"].suptitle(f"pyroflows demo: {title}{heldout}")
    return figures


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)
