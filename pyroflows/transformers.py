"""Transformers: elementwise bijections built from raw parameter tensors.

A transformer is the elementwise half of a flow layer. It owns no learnable state: a
conditioner network produces the raw parameters and the transformer maps ``x`` elementwise
with them. Structures (`Coupling`, `Autoregressive`) accept any transformer, so a new
elementwise map written here works in every structure at once.

The calling convention (one for every transformer and every structure):

* ``params`` holds the parameters **first**: shape ``(num_params, *x.shape)`` (the trailing
  dimensions broadcast with ``x``), so ``params[k]`` is the ``k``-th parameter of every
  element. The structures hand over a view of their conditioner's output in this layout
  without a copy, and the spline kernel reads it as it is.
* ``forward(params, x)`` returns ``(y, log|dy/dx|)`` elementwise; ``inverse(params, y)``
  returns ``(x, log|dx/dy|)``; all outputs have the shape of the input.
* All-zero parameters give the identity, so a zero-initialised conditioner makes the layer
  start as the identity.

Example:
    >>> import torch
    >>> from pyroflows.transformers import Affine
    >>> t = Affine()
    >>> x = torch.randn(4, 3)
    >>> y, ladj = t.forward(torch.zeros(t.num_params, 4, 3), x)
    >>> bool(torch.equal(x, y)), bool((ladj == 0).all())
    (True, True)
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor

from .splines import (
    DEFAULT_MIN_BIN_HEIGHT,
    DEFAULT_MIN_BIN_WIDTH,
    DEFAULT_MIN_DERIVATIVE,
    check_spline_args,
    packed_spline,
    tanh_of_scaled,
)

__all__ = [
    "Transformer",
    "Affine",
    "Additive",
    "RationalQuadraticSpline",
    "BoundedRationalQuadraticSpline",
    "CircularRationalQuadraticSpline",
]


class Transformer(ABC):
    """An elementwise bijection parameterised by ``num_params`` numbers per element.

    Subclasses implement `forward` and `inverse`; both take ``params`` of shape
    ``(num_params, *x.shape)`` (see the module docstring) and may call `checked` first.
    """

    #: Number of raw parameters each element needs.
    num_params: int

    @abstractmethod
    def forward(self, params: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        """Map ``x`` with ``params`` (shape ``(num_params, *x.shape)``); return ``(y, ladj)``."""

    @abstractmethod
    def inverse(self, params: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Invert `forward`; return ``(x, log|dx/dy|)``."""

    def checked(self, params: Tensor) -> Tensor:
        """``params``, after checking that it holds ``num_params`` parameters first."""
        if params.dim() == 0 or params.shape[0] != self.num_params:
            raise ValueError(
                f"{type(self).__name__} needs its {self.num_params} parameters first, got "
                f"params of shape {tuple(params.shape)} (expected ({self.num_params}, *x.shape))"
            )
        return params

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and vars(self) == vars(other)

    def __hash__(self) -> int:
        return hash((type(self), tuple(sorted(vars(self).items()))))


class Affine(Transformer):
    """``y = shift + exp(log_scale) * x`` with a smoothly bounded log-scale.

    The raw log-scale ``r`` is soft-clipped to ``bound * tanh(r / bound)``, which is the
    identity near zero and keeps the per-layer scale within ``[exp(-bound), exp(bound)]``.
    Parameters per element: ``(shift, raw_log_scale)``.

    Args:
        log_scale_bound: largest absolute log-scale a single layer can apply.
    """

    num_params = 2

    def __init__(self, log_scale_bound: float = 3.0):
        if not (log_scale_bound > 0 and math.isfinite(log_scale_bound)):
            raise ValueError(
                f"log_scale_bound must be positive and finite, got {log_scale_bound!r}"
            )
        self.log_scale_bound = float(log_scale_bound)

    def _map(self, shift: Tensor, raw: Tensor, v: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        bound = self.log_scale_bound
        soft = tanh_of_scaled(raw, bound)
        if inverse:
            neg_log_scale = soft * -bound
            return (v - shift) * torch.exp(neg_log_scale), _shaped_as(neg_log_scale, v)
        log_scale = soft * bound
        return torch.addcmul(shift, torch.exp(log_scale), v), _shaped_as(log_scale, v)

    def forward(self, params: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        shift, raw = self.checked(params).unbind(0)
        return self._map(shift, raw, x, inverse=False)

    def inverse(self, params: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        shift, raw = self.checked(params).unbind(0)
        return self._map(shift, raw, y, inverse=True)


def _shaped_as(t: Tensor, v: Tensor) -> Tensor:
    """``t`` broadcast to the shape of ``v`` (the structures pass equal shapes: no call)."""
    return t if t.shape == v.shape else t.expand_as(v)


class Additive(Transformer):
    """``y = x + shift``: volume preserving (NICE). Parameters per element: ``(shift,)``."""

    num_params = 1

    def forward(self, params: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        y = x + self.checked(params)[0]
        return y, torch.zeros_like(y)

    def inverse(self, params: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        x = y - self.checked(params)[0]
        return x, torch.zeros_like(x)


#: Default soft bound on the raw spline parameters (see `pyroflows.splines`).
DEFAULT_RAW_BOUND = 2.0


class _SplineBase(Transformer):
    """Shared argument handling of the rational-quadratic transformers."""

    _extra_derivatives: int  # number of derivative parameters minus count_bins

    def __init__(
        self,
        count_bins: int = 8,
        min_bin_width: float = DEFAULT_MIN_BIN_WIDTH,
        min_bin_height: float = DEFAULT_MIN_BIN_HEIGHT,
        min_derivative: float = DEFAULT_MIN_DERIVATIVE,
        raw_bound: float = DEFAULT_RAW_BOUND,
    ):
        check_spline_args(count_bins, min_bin_width, min_bin_height, min_derivative)
        if isinstance(raw_bound, bool) or not (
            isinstance(raw_bound, int | float) and raw_bound > 0
        ):
            raise ValueError(f"raw_bound must be a number > 0 (inf: no bound), got {raw_bound!r}")
        self.count_bins = int(count_bins)
        self.min_bin_width = min_bin_width
        self.min_bin_height = min_bin_height
        self.min_derivative = min_derivative
        self.raw_bound = float(raw_bound)

    @property
    def num_params(self) -> int:  # type: ignore[override]
        return 3 * self.count_bins + self._extra_derivatives

    _variant: str  # the variant of `pyroflows.splines.packed_spline`

    def _interval(self) -> tuple[float, float]:
        raise NotImplementedError

    def _map(self, params: Tensor, v: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        low, high = self._interval()
        return packed_spline(
            v,
            self.checked(params),
            count_bins=self.count_bins,
            variant=self._variant,
            low=low,
            high=high,
            inverse=inverse,
            min_bin_width=self.min_bin_width,
            min_bin_height=self.min_bin_height,
            min_derivative=self.min_derivative,
            raw_bound=self.raw_bound,
        )

    def forward(self, params: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        return self._map(params, x, inverse=False)

    def inverse(self, params: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        return self._map(params, y, inverse=True)


class RationalQuadraticSpline(_SplineBase):
    """Monotone rational-quadratic spline on ``[-bound, bound]``, identity outside.

    Parameters per element: ``3 * count_bins - 1`` (widths, heights, interior derivatives).

    Args:
        count_bins: number of spline bins.
        bound: half-width of the interval the spline acts on.
        min_bin_width: minimum bin width (fraction of the interval).
        min_bin_height: minimum bin height (fraction of the interval).
        min_derivative: minimum knot derivative.
        raw_bound: soft bound on the raw parameters: each raw value ``r`` becomes
            ``raw_bound * tanh(r / raw_bound)``, which keeps the float32 round trip accurate
            (see `pyroflows.splines`). ``math.inf`` turns it off.
    """

    _extra_derivatives = -1
    _variant = "identity"

    def _interval(self) -> tuple[float, float]:
        return -self.bound, self.bound

    def __init__(
        self,
        count_bins: int = 8,
        bound: float = 5.0,
        min_bin_width: float = DEFAULT_MIN_BIN_WIDTH,
        min_bin_height: float = DEFAULT_MIN_BIN_HEIGHT,
        min_derivative: float = DEFAULT_MIN_DERIVATIVE,
        raw_bound: float = DEFAULT_RAW_BOUND,
    ):
        super().__init__(count_bins, min_bin_width, min_bin_height, min_derivative, raw_bound)
        check_spline_args(count_bins, bound=bound)
        self.bound = float(bound)


class BoundedRationalQuadraticSpline(_SplineBase):
    """Monotone rational-quadratic bijection of ``[low, high]`` onto itself (no tails).

    For variables that live on an interval. Parameters per element: ``3 * count_bins + 1``.

    Args:
        count_bins: number of spline bins.
        low: lower end of the interval.
        high: upper end of the interval.
        min_bin_width: minimum bin width (fraction of the interval).
        min_bin_height: minimum bin height (fraction of the interval).
        min_derivative: minimum knot derivative.
        raw_bound: soft bound on the raw parameters: each raw value ``r`` becomes
            ``raw_bound * tanh(r / raw_bound)``, which keeps the float32 round trip accurate
            (see `pyroflows.splines`). ``math.inf`` turns it off.
    """

    _extra_derivatives = 1
    _variant = "free"

    def _interval(self) -> tuple[float, float]:
        return self.low, self.high

    def __init__(
        self,
        count_bins: int = 8,
        low: float = 0.0,
        high: float = 1.0,
        min_bin_width: float = DEFAULT_MIN_BIN_WIDTH,
        min_bin_height: float = DEFAULT_MIN_BIN_HEIGHT,
        min_derivative: float = DEFAULT_MIN_DERIVATIVE,
        raw_bound: float = DEFAULT_RAW_BOUND,
    ):
        super().__init__(count_bins, min_bin_width, min_bin_height, min_derivative, raw_bound)
        if not high > low:
            raise ValueError(f"need low < high, got low={low!r}, high={high!r}")
        self.low = float(low)
        self.high = float(high)


class CircularRationalQuadraticSpline(_SplineBase):
    """Rational-quadratic diffeomorphism of the circle ``[-bound, bound)``, for angles.

    Parameters per element: ``3 * count_bins``.

    Args:
        count_bins: number of spline bins.
        bound: half the period (``pi`` for angles in radians).
        min_bin_width: minimum bin width (fraction of the period).
        min_bin_height: minimum bin height (fraction of the period).
        min_derivative: minimum knot derivative.
        raw_bound: soft bound on the raw parameters: each raw value ``r`` becomes
            ``raw_bound * tanh(r / raw_bound)``, which keeps the float32 round trip accurate
            (see `pyroflows.splines`). ``math.inf`` turns it off.
    """

    _extra_derivatives = 0
    _variant = "circular"

    def _interval(self) -> tuple[float, float]:
        return -self.bound, self.bound

    def __init__(
        self,
        count_bins: int = 8,
        bound: float = math.pi,
        min_bin_width: float = DEFAULT_MIN_BIN_WIDTH,
        min_bin_height: float = DEFAULT_MIN_BIN_HEIGHT,
        min_derivative: float = DEFAULT_MIN_DERIVATIVE,
        raw_bound: float = DEFAULT_RAW_BOUND,
    ):
        super().__init__(count_bins, min_bin_width, min_bin_height, min_derivative, raw_bound)
        check_spline_args(count_bins, bound=bound)
        self.bound = float(bound)
