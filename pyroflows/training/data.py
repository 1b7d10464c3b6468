"""Data preparation: the rows checked once, split, and the data maps fitted to them.

`prepare_data` turns the user's table(s) into float64 tensors on the host, checks every row
once (shapes, NaN/Inf, context rows matching data rows, declared bounds, the flow's dtype),
splits off the validation rows and fits the `Standardize` / `SupportMap` data maps to the
training rows. It does not change the flow; `PreparedData.attach_maps` does, when asked.

Example:
    >>> import torch
    >>> from pyroflows import flows
    >>> from pyroflows.training import prepare_data
    >>> flow = flows.maf(2, num_layers=1)
    >>> data = torch.randn(100, 2) * 5.0 + 3.0
    >>> prepared = prepare_data(flow, data, validation=0.2)
    >>> prepared.num_train, prepared.num_val, prepared.standardized
    (80, 20, 'fitted')
    >>> len(flow.data_transforms)  # unchanged until the maps are attached
    0
    >>> prepared.attach_maps(flow)
    >>> len(flow.data_transforms), type(flow.data_transforms[0]).__name__
    (1, 'Standardize')
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..checks import check_int, check_real, is_int
from ..distribution import Flow
from ..transforms.preprocessing import Standardize, SupportMap

__all__ = ["Bounds", "PreparedData", "prepare_data", "as_data_tensor", "find_bad_rows"]

#: Declared support of columns: ``{column: (low, high)}`` (name or index) or one pair per
#: column; ``None`` for no bound on that side.
Bounds = (
    Mapping[Any, tuple[float | None, float | None]] | Sequence[tuple[float | None, float | None]]
)


@dataclass(frozen=True, eq=False)
class PreparedData:
    """Rows ready for `pyroflows.training.train`: checked, split, float64, on the host.

    The rows are on the user's scale; the fitted maps are not applied to them (the flow
    applies them once they are attached).

    Attributes:
        x_train: training rows, shape ``(N_train, D)``.
        x_val: validation rows, shape ``(N_val, D)`` (``N_val`` may be 0).
        c_train: context of the training rows (``None`` for an unconditional flow).
        c_val: context of the validation rows.
        data_maps: `Standardize` (then `SupportMap` for declared bounds) fitted to
            ``x_train``, base-to-data order, to append to ``flow.data_transforms``; empty
            unless ``standardized == "fitted"``.
        context_maps: the same for the context.
        standardized: ``"fitted"``, ``"kept"`` (the flow already had data maps) or ``"off"``.
    """

    x_train: Tensor
    x_val: Tensor
    c_train: Tensor | None = None
    c_val: Tensor | None = None
    data_maps: tuple[nn.Module, ...] = ()
    context_maps: tuple[nn.Module, ...] = ()
    standardized: str = "off"

    @property
    def num_train(self) -> int:
        """Number of training rows."""
        return len(self.x_train)

    @property
    def num_val(self) -> int:
        """Number of validation rows."""
        return len(self.x_val)

    def attach_maps(self, flow: Flow) -> None:
        """Append copies of the fitted maps to ``flow.data_transforms`` / ``context_transforms``.

        The copies move to the flow's device and keep their float64 statistics; the flow
        then trains on standardised values and scores rows on the user's scale. Does
        nothing when no maps were fitted.

        Raises:
            ValueError: if the flow already has data or context maps, or models another
                number of columns.
        """
        if not (self.data_maps or self.context_maps):
            return
        if len(flow.data_transforms) or len(flow.context_transforms):
            raise ValueError("the flow already has data/context transforms; attach the maps once")
        if flow.input_dim != self.x_train.shape[1]:
            columns = self.x_train.shape[1]
            raise ValueError(
                f"the maps are for {columns} columns, the flow models {flow.input_dim}"
            )
        device = _first_parameter(flow).device
        flow.data_transforms.extend(copy.deepcopy(m).to(device) for m in self.data_maps)
        flow.context_transforms.extend(copy.deepcopy(m).to(device) for m in self.context_maps)


def prepare_data(
    flow: Flow,
    data: Any,
    *,
    context: Any = None,
    validation: float = 0.1,
    validation_data: Any = None,
    validation_context: Any = None,
    standardize: bool = True,
    bounds: Bounds | None = None,
    context_bounds: Bounds | None = None,
    seed: int = 0,
) -> PreparedData:
    """Check and split the rows for ``flow`` and fit its data maps; the flow is not changed.

    Args:
        flow: the flow the rows are for (its sizes, dtype and existing data maps are read).
        data: rows to model, shape ``(N, D)``: tensor, NumPy array or pandas DataFrame.
        context: conditioning rows, shape ``(N, C)``, for a conditional flow.
        validation: fraction of rows held out (0 for none); ignored with ``validation_data``.
        validation_data: an explicit validation set, checked like ``data``.
        validation_context: its context.
        standardize: fit `Standardize` maps to the training rows, unless the flow already
            has data or context maps (then ``standardized="kept"``).
        bounds: declared support of data columns, e.g. ``{"redshift": (0, None)}`` or one
            ``(low, high)`` pair per column; needs ``standardize`` and a flow without maps.
        context_bounds: the same for context columns.
        seed: seed of the split (a private generator; the global RNG is not used).

    Returns:
        A `PreparedData`.

    Raises:
        TypeError: if ``flow`` is not a `pyroflows.Flow`.
        ValueError: for mismatched shapes, non-numeric data, NaN/Inf rows or rows outside
            the bounds (named by their 0-based row), values beyond the flow's dtype, or
            invalid settings.
    """
    dtype = _first_parameter(flow).dtype
    validation = check_real("validation", validation)
    if not 0 <= validation < 1:
        raise ValueError(f"validation must be a fraction in [0, 1), got {validation!r}")
    seed = check_int("seed", seed, 0)
    supports = _supports(flow, standardize, bounds, context_bounds, data, context)
    x, c = _checked_rows(flow, data, context, ("data", "context"), supports)
    if validation_data is not None:
        names = ("validation_data", "validation_context")
        x_val, c_val = _checked_rows(flow, validation_data, validation_context, names, supports)
        x_train, c_train = x, c
    else:
        (x_train, c_train), (x_val, c_val) = _split(x, c, validation, seed)
    standardized, data_maps, context_maps = "off", (), ()
    if standardize and (len(flow.data_transforms) or len(flow.context_transforms)):
        standardized = "kept"
    elif standardize:
        standardized, data_maps = "fitted", _fit_maps(x_train, supports[0])
        context_maps = () if c_train is None else _fit_maps(c_train, supports[1])
    _check_range(list(flow.data_transforms) or data_maps, (x_train, x_val), dtype, "data")
    _check_range(list(flow.context_transforms) or context_maps, (c_train, c_val), dtype, "context")
    return PreparedData(x_train, x_val, c_train, c_val, data_maps, context_maps, standardized)


def as_data_tensor(data: Any, name: str = "data", dtype: torch.dtype = torch.float32) -> Tensor:
    """Convert a tensor, NumPy array or pandas DataFrame/Series to a 2-D float tensor.

    A 1-D input becomes one column. Raises a `ValueError` naming ``name`` for
    non-numeric or empty input.
    """
    if hasattr(data, "to_numpy"):  # pandas DataFrame / Series
        try:
            data = data.to_numpy(dtype=np.float64, copy=True)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{name} has non-numeric columns: {error}") from None
    if isinstance(data, Tensor):
        tensor = data.detach()
        if not (tensor.is_floating_point() or tensor.dtype in (torch.int32, torch.int64)):
            raise ValueError(f"{name} must be numeric, got dtype {tensor.dtype}")
    else:
        try:
            array = np.array(data, dtype=np.float64)  # a writable copy
        except (TypeError, ValueError) as error:
            raise ValueError(f"{name} must be numeric: {error}") from None
        tensor = torch.from_numpy(array)
    if tensor.dim() == 1:
        tensor = tensor[:, None]
    if tensor.dim() != 2:
        raise ValueError(f"{name} must be 2-D (rows, columns), got shape {tuple(tensor.shape)}")
    if tensor.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    return tensor.to(dtype)


def find_bad_rows(data: Tensor) -> Tensor:
    """Indices of the rows of ``data`` holding NaN or Inf."""
    return (~torch.isfinite(data)).any(dim=1).nonzero().flatten()


def _first_parameter(flow: Flow) -> Tensor:
    """The flow's first parameter (its device and dtype are the flow's)."""
    if not isinstance(flow, Flow):
        raise TypeError(f"expected a pyroflows.Flow, got {type(flow).__name__}")
    reference = next(iter(flow.parameters()), None)
    if reference is None:
        raise ValueError("the flow has no parameters to fit")
    return reference


def _checked_rows(
    flow: Flow,
    data: Any,
    context: Any,
    names: tuple[str, str],
    supports: tuple[SupportMap | None, SupportMap | None],
) -> tuple[Tensor, Tensor | None]:
    """The row checks, for training and validation rows alike: float64 host tensors."""
    name, context_name = names
    x = as_data_tensor(data, name, torch.float64).cpu()  # the loop places the rows itself
    if x.shape[1] != flow.input_dim:
        raise ValueError(f"{name} has {x.shape[1]} columns, the flow models {flow.input_dim}")
    _refuse_rows(find_bad_rows(x), name, "with NaN or Inf")
    _check_support(supports[0], x, name)
    if flow.context_dim == 0:
        if context is not None:
            raise ValueError(f"{context_name} given, but the flow is unconditional")
        return x, None
    if context is None:
        raise ValueError(
            f"the flow is conditional: pass {context_name} with {flow.context_dim} columns"
        )
    c = as_data_tensor(context, context_name, torch.float64).cpu()
    if c.shape[1] != flow.context_dim:
        raise ValueError(
            f"{context_name} has {c.shape[1]} columns, the flow expects {flow.context_dim}"
        )
    if len(c) != len(x):
        raise ValueError(f"{context_name} has {len(c)} rows but {name} has {len(x)}")
    _refuse_rows(find_bad_rows(c), context_name, "with NaN or Inf")
    _check_support(supports[1], c, context_name)
    return x, c


def _refuse_rows(rows: Tensor, name: str, what: str) -> None:
    """A `ValueError` naming up to ten of ``rows`` (0-based) of ``name``, if there are any."""
    if len(rows):
        listed = ", ".join(str(int(i)) for i in rows[:10]) + (" ..." if len(rows) > 10 else "")
        raise ValueError(f"{name} has {len(rows)} row(s) {what} (0-based rows {listed})")


def _check_support(support: SupportMap | None, x: Tensor, name: str) -> None:
    """Refuse the rows of ``x`` outside ``support``."""
    if support is not None:
        _, ladj = support.inv_and_ladj(x.to(support.lower.dtype))
        _refuse_rows(
            (~torch.isfinite(ladj)).nonzero().flatten(), name, "outside the declared bounds"
        )


def _split(
    x: Tensor, c: Tensor | None, validation: float, seed: int
) -> tuple[tuple[Tensor, Tensor | None], tuple[Tensor, Tensor | None]]:
    """``(train, validation)`` pairs of rows and context, drawn with a private generator."""
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed), device="cpu")
    n_val = int(round(validation * len(x))) if validation > 0 else 0
    if validation > 0 and (n_val < 1 or n_val >= len(x)):
        raise ValueError(
            f"validation={validation} leaves no rows for training or validation ({len(x)} rows)"
        )
    val, train = order[:n_val], order[n_val:]
    return (x[train], None if c is None else c[train]), (x[val], None if c is None else c[val])


def _supports(
    flow: Flow,
    standardize: bool,
    bounds: Bounds | None,
    context_bounds: Bounds | None,
    data: Any,
    context: Any,
) -> tuple[SupportMap | None, SupportMap | None]:
    """The declared supports of data and context columns, after checking they can be used."""
    if bounds is None and context_bounds is None:
        return None, None
    if not standardize:
        raise ValueError("bounds need standardize=True (they are stored with the scaling)")
    if len(flow.data_transforms) or len(flow.context_transforms):
        raise ValueError(
            "the flow already has data/context transforms (e.g. from an earlier fit); "
            "bounds can only be declared on a flow without them"
        )
    if context_bounds is not None and flow.context_dim == 0:
        raise ValueError("context_bounds given, but the flow is unconditional")
    return (
        _support_map(bounds, flow.input_dim, _columns(data)),
        _support_map(context_bounds, flow.context_dim, _columns(context)),
    )


def _support_map(
    bounds: Bounds | None, dim: int, columns: Sequence[str] | None
) -> SupportMap | None:
    """The `SupportMap` of ``bounds`` over ``dim`` columns (named by ``columns``)."""
    if bounds is None:
        return None
    lower, upper = [-math.inf] * dim, [math.inf] * dim
    seen: dict[int, Any] = {}
    items = bounds.items() if isinstance(bounds, Mapping) else enumerate(bounds)
    if not isinstance(bounds, Mapping) and len(bounds) != dim:
        raise ValueError(
            f"bounds must have one (low, high) pair per column ({dim}), got {len(bounds)}"
        )
    for key, pair in items:
        name = key
        if isinstance(key, str):
            if columns is None or key not in columns:
                raise ValueError(f"bounds name column {key!r}, which is not among {columns}")
            key = list(columns).index(key)
        if not (is_int(key) and 0 <= key < dim):
            raise ValueError(f"bounds column {key!r} is out of range for {dim} columns")
        if key in seen:
            raise ValueError(f"bounds name column {key} twice (as {seen[key]!r} and {name!r})")
        seen[key] = name
        low, high = pair
        lower[key] = -math.inf if low is None else float(low)
        upper[key] = math.inf if high is None else float(high)
    return SupportMap(lower, upper)


def _columns(data: Any) -> list[str] | None:
    """The column names of a DataFrame, else ``None``."""
    columns = getattr(data, "columns", None)
    return None if columns is None else [str(c) for c in columns]


def _fit_maps(train: Tensor, support: SupportMap | None) -> tuple[nn.Module, ...]:
    """`Standardize` (then ``support``) fitted to ``train`` in float64, base-to-data order."""
    train = train.to(torch.float64)
    if support is not None:
        support = support.fitted(train)
        train = support.inv_and_ladj(train)[0]
    return (Standardize.from_data(train),) + ((support,) if support is not None else ())


def _check_range(
    maps: Sequence[nn.Module], parts: Sequence[Tensor | None], dtype: torch.dtype, name: str
) -> None:
    """A `ValueError` naming the first column whose values (after the float64 data maps, if
    any) do not fit the flow's dtype, e.g. 1e39 for a float32 flow."""
    limit = torch.finfo(dtype).max
    maps = [copy.deepcopy(t).cpu() for t in maps]  # the rows are still on the host
    for x in parts:
        if x is None or not len(x):
            continue
        u = x.to(torch.float64)
        with torch.no_grad():
            for t in reversed(maps):
                u = t.inv_and_ladj(u)[0]
        big = (u.abs() > limit).any(0).nonzero().flatten()
        if len(big):
            column = int(big[0])
            raise ValueError(
                f"{name} column {column} has values up to {float(x[:, column].abs().max()):.3g}, "
                f"beyond the range of the flow's {dtype} (max {limit:.3g}) even after its "
                "data maps; rescale the column, use standardize=True or a float64 flow"
            )
