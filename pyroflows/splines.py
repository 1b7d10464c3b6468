"""Rational-quadratic spline math (Durkan et al., 2019) as pure functions.

Every function here is stateless: it takes the input tensor and the *raw* (unconstrained)
spline parameters that a conditioner network produces, and returns ``(y, log_abs_det)``
where ``log_abs_det = log|dy/dx|`` elementwise, with the same shape as ``y``.

Three variants share one core:

* `rational_quadratic_spline`: a monotone spline on ``[-bound, bound]`` with identity
  tails outside, whose boundary derivatives are exactly 1 so the map is C1 on the real line.
  Parameters per element: ``3 * count_bins - 1``.
* `bounded_rational_quadratic_spline`: a monotone bijection of an interval
  ``[low, high]`` onto itself, without tails (for data on an interval). Parameters per
  element: ``3 * count_bins + 1``.
* `circular_rational_quadratic_spline`: a diffeomorphism of the circle
  ``[-bound, bound)`` (endpoints identified, equal end derivatives), for angles.
  Parameters per element: ``3 * count_bins``.

Bin selection uses comparisons and `torch.gather`, branch selection uses
`torch.where`: there is no boolean-mask indexing, so a compiled graph has no data
dependent shapes and a GPU never waits for the host. The inverse solves the per-bin
quadratic with a cancellation-free root whose discriminant is clamped at zero and whose
result is clipped to its bin.

Example:
    >>> import torch
    >>> from pyroflows.splines import rational_quadratic_spline
    >>> x = torch.randn(10, 3)
    >>> raw = torch.randn(10, 3, 3 * 8 - 1)
    >>> w, h, d = raw.split([8, 8, 7], dim=-1)
    >>> y, ladj = rational_quadratic_spline(x, w, h, d, bound=5.0)
    >>> x2, ladj_inv = rational_quadratic_spline(y, w, h, d, bound=5.0, inverse=True)
    >>> bool(torch.allclose(x, x2, atol=1e-4)), bool(torch.allclose(ladj, -ladj_inv, atol=1e-4))
    (True, True)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "DEFAULT_MIN_BIN_WIDTH",
    "DEFAULT_MIN_BIN_HEIGHT",
    "DEFAULT_MIN_DERIVATIVE",
    "check_spline_args",
    "rational_quadratic_spline",
    "bounded_rational_quadratic_spline",
    "circular_rational_quadratic_spline",
]

DEFAULT_MIN_BIN_WIDTH = 1e-3
DEFAULT_MIN_BIN_HEIGHT = 1e-3
DEFAULT_MIN_DERIVATIVE = 1e-3


def check_spline_args(
    count_bins: int,
    min_bin_width: float = DEFAULT_MIN_BIN_WIDTH,
    min_bin_height: float = DEFAULT_MIN_BIN_HEIGHT,
    min_derivative: float = DEFAULT_MIN_DERIVATIVE,
    bound: float | None = None,
) -> None:
    """Raise a `ValueError` if spline hyper-parameters are inconsistent.

    Args:
        count_bins: number of bins, at least 1.
        min_bin_width: minimum bin width as a fraction of the interval; ``count_bins`` of them
            must fit, i.e. ``min_bin_width * count_bins < 1``.
        min_bin_height: the same for bin heights.
        min_derivative: minimum knot derivative, in ``(0, 1)`` so that zero raw parameters
            give derivative 1 (the identity).
        bound: half-width of the spline interval, if given must be positive.
    """
    if not isinstance(count_bins, int) or isinstance(count_bins, bool) or count_bins < 1:
        raise ValueError(f"count_bins must be an integer >= 1, got {count_bins!r}")
    for name, value in (("min_bin_width", min_bin_width), ("min_bin_height", min_bin_height)):
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value!r}")
        if value * count_bins >= 1:
            raise ValueError(
                f"{name}={value} does not fit {count_bins} bins: "
                f"{name} * count_bins must be < 1, got {value * count_bins:g}"
            )
    if not 0 < min_derivative < 1:
        raise ValueError(f"min_derivative must lie in (0, 1), got {min_derivative!r}")
    if bound is not None and not (bound > 0 and math.isfinite(bound)):
        raise ValueError(f"bound must be a positive finite number, got {bound!r}")


def _knots(raw: Tensor, low: float, high: float, min_size: float) -> tuple[Tensor, Tensor]:
    """Bin sizes and knot positions ``low = k_0 < ... < k_K = high`` from raw logits."""
    num_bins = raw.shape[-1]
    sizes = min_size + (1.0 - min_size * num_bins) * torch.softmax(raw, dim=-1)
    # Knots at 0, cumulative sizes, and exactly 1 at the end (a cumsum need not end at 1).
    cum = F.pad(F.pad(torch.cumsum(sizes[..., :-1], dim=-1), (1, 0), value=0.0), (0, 1), value=1.0)
    knots = low + (high - low) * cum
    return knots[..., 1:] - knots[..., :-1], knots


def _derivatives(raw: Tensor, min_derivative: float) -> Tensor:
    """Positive knot derivatives; a raw value of 0 gives exactly 1."""
    shift = math.log(math.expm1(1.0 - min_derivative))
    return min_derivative + F.softplus(raw + shift)


def _gather(t: Tensor, idx: Tensor) -> Tensor:
    return torch.gather(t, -1, idx).squeeze(-1)


def _bin_index(knots: Tensor, v: Tensor) -> Tensor:
    """Index of the bin holding ``v`` (clamped to the valid range), shape ``v.shape + (1,)``."""
    # Counting interior knots below v: no searchsorted contiguity rules, broadcasts freely.
    return (v.unsqueeze(-1) >= knots[..., 1:-1]).sum(dim=-1, keepdim=True)


def _rqs(
    x: Tensor,
    widths: Tensor,
    heights: Tensor,
    derivatives: Tensor,
    xk: Tensor,
    yk: Tensor,
    inverse: bool,
) -> tuple[Tensor, Tensor]:
    """Evaluate a monotone rational-quadratic spline inside its interval.

    ``x`` must already lie in ``[xk[..., 0], xk[..., -1]]`` (or the y-range when ``inverse``).
    ``derivatives`` holds the ``K + 1`` knot derivatives. Returns ``(y, log|dy/dx|)`` of the
    requested direction.
    """
    shape = torch.broadcast_shapes(x.shape, widths.shape[:-1])
    x = x.expand(shape)
    widths, heights, derivatives, xk, yk = (
        t.expand(shape + t.shape[-1:]) for t in (widths, heights, derivatives, xk, yk)
    )
    idx = _bin_index(yk if inverse else xk, x)
    x_k, w_k = _gather(xk, idx), _gather(widths, idx)
    y_k, h_k = _gather(yk, idx), _gather(heights, idx)
    d_k = _gather(derivatives, idx)
    d_k1 = _gather(derivatives, idx + 1)
    s_k = h_k / w_k
    two_s = d_k1 + d_k - 2.0 * s_k

    if inverse:
        dy = x - y_k
        a = h_k * (s_k - d_k) + dy * two_s
        b = h_k * d_k - dy * two_s
        c = -s_k * dy
        # Guard the discriminant (rounding can make it <= 0) and keep sqrt's gradient finite.
        disc = b * b - 4.0 * a * c
        positive = disc > 0
        sqrt_disc = torch.where(positive, torch.sqrt(torch.where(positive, disc, 1.0)), 0.0)
        # Root in [0, 1] without cancellation: a + b = h_k * s_k > 0, so a > 0 whenever b < 0.
        neg_b = b < 0
        num = torch.where(neg_b, sqrt_disc - b, 2.0 * c)
        den = torch.where(neg_b, 2.0 * a, -b - sqrt_disc)
        tiny = torch.finfo(x.dtype).tiny
        den = torch.where(den.abs() > tiny, den, torch.where(neg_b, tiny, -tiny))
        xi = torch.clamp(num / den, 0.0, 1.0)
        out = x_k + xi * w_k
    else:
        xi = torch.clamp((x - x_k) / w_k, 0.0, 1.0)
        out = None

    xi_1m = xi * (1.0 - xi)
    denom = s_k + two_s * xi_1m
    numer_d = d_k1 * xi * xi + 2.0 * s_k * xi_1m + d_k * (1.0 - xi) * (1.0 - xi)
    log_dydx = 2.0 * torch.log(s_k) + torch.log(numer_d) - 2.0 * torch.log(denom)
    if inverse:
        return out, -log_dydx
    y = y_k + h_k * (s_k * xi * xi + d_k * xi_1m) / denom
    return y, log_dydx


def _check_raw(raw_w: Tensor, raw_h: Tensor, raw_d: Tensor, num_derivatives: int) -> None:
    if raw_w.shape[-1] != raw_h.shape[-1]:
        raise ValueError(
            f"widths and heights need the same number of bins, got {raw_w.shape[-1]} "
            f"and {raw_h.shape[-1]}"
        )
    if raw_d.shape[-1] != num_derivatives:
        raise ValueError(
            f"expected {num_derivatives} derivative parameters for {raw_w.shape[-1]} bins, "
            f"got {raw_d.shape[-1]}"
        )


def rational_quadratic_spline(
    x: Tensor,
    unnormalized_widths: Tensor,
    unnormalized_heights: Tensor,
    unnormalized_derivatives: Tensor,
    *,
    bound: float = 5.0,
    inverse: bool = False,
    min_bin_width: float = DEFAULT_MIN_BIN_WIDTH,
    min_bin_height: float = DEFAULT_MIN_BIN_HEIGHT,
    min_derivative: float = DEFAULT_MIN_DERIVATIVE,
) -> tuple[Tensor, Tensor]:
    """Monotone rational-quadratic spline on ``[-bound, bound]`` with identity tails.

    Args:
        x: input, any shape ``S``.
        unnormalized_widths: raw bin widths, shape ``S + (K,)`` (or broadcastable to it).
        unnormalized_heights: raw bin heights, shape ``S + (K,)``.
        unnormalized_derivatives: raw derivatives at the ``K - 1`` interior knots,
            shape ``S + (K - 1,)``; the two boundary derivatives are exactly 1.
        bound: half-width of the spline interval.
        inverse: evaluate the inverse map instead.
        min_bin_width: minimum bin width as a fraction of the interval.
        min_bin_height: minimum bin height as a fraction of the interval.
        min_derivative: minimum knot derivative.

    Returns:
        ``(y, log|dy/dx|)`` for the requested direction, both of shape ``S``. All-zero raw
        parameters give the identity.
    """
    _check_raw(
        unnormalized_widths,
        unnormalized_heights,
        unnormalized_derivatives,
        unnormalized_widths.shape[-1] - 1,
    )
    widths, xk = _knots(unnormalized_widths, -bound, bound, min_bin_width)
    heights, yk = _knots(unnormalized_heights, -bound, bound, min_bin_height)
    inner = _derivatives(unnormalized_derivatives, min_derivative)
    derivatives = F.pad(inner, (1, 1), value=1.0)
    inside = (x >= -bound) & (x <= bound)
    # Tail points are evaluated at 0 (a safe interior value) and then discarded: clamping them
    # onto the bound would put them where the inverse's discriminant cancels in float32.
    y, ladj = _rqs(torch.where(inside, x, 0.0), widths, heights, derivatives, xk, yk, inverse)
    return torch.where(inside, y, x), torch.where(inside, ladj, torch.zeros_like(ladj))


def bounded_rational_quadratic_spline(
    x: Tensor,
    unnormalized_widths: Tensor,
    unnormalized_heights: Tensor,
    unnormalized_derivatives: Tensor,
    *,
    low: float = 0.0,
    high: float = 1.0,
    inverse: bool = False,
    min_bin_width: float = DEFAULT_MIN_BIN_WIDTH,
    min_bin_height: float = DEFAULT_MIN_BIN_HEIGHT,
    min_derivative: float = DEFAULT_MIN_DERIVATIVE,
) -> tuple[Tensor, Tensor]:
    """Monotone rational-quadratic bijection of ``[low, high]`` onto itself, without tails.

    Args:
        x: input, any shape ``S``; values outside ``[low, high]`` are clamped onto it, and
            the inverse gives them log-det ``-inf`` (the density is zero outside).
        unnormalized_widths: raw bin widths, shape ``S + (K,)``.
        unnormalized_heights: raw bin heights, shape ``S + (K,)``.
        unnormalized_derivatives: raw derivatives at all ``K + 1`` knots, ``S + (K + 1,)``.
        low: lower end of the interval.
        high: upper end of the interval.
        inverse: evaluate the inverse map instead.
        min_bin_width: minimum bin width as a fraction of the interval.
        min_bin_height: minimum bin height as a fraction of the interval.
        min_derivative: minimum knot derivative.

    Returns:
        ``(y, log|dy/dx|)``, both of shape ``S``; all-zero raw parameters give the identity.
    """
    if not high > low:
        raise ValueError(f"need low < high, got low={low!r}, high={high!r}")
    _check_raw(
        unnormalized_widths,
        unnormalized_heights,
        unnormalized_derivatives,
        unnormalized_widths.shape[-1] + 1,
    )
    widths, xk = _knots(unnormalized_widths, low, high, min_bin_width)
    heights, yk = _knots(unnormalized_heights, low, high, min_bin_height)
    derivatives = _derivatives(unnormalized_derivatives, min_derivative)
    y, ladj = _rqs(x.clamp(low, high), widths, heights, derivatives, xk, yk, inverse)
    if inverse:  # the map is undefined outside the interval: zero density there
        outside = (x < low) | (x > high)
        ladj = torch.where(outside, torch.full_like(ladj, -math.inf), ladj)
    return y, ladj


def circular_rational_quadratic_spline(
    x: Tensor,
    unnormalized_widths: Tensor,
    unnormalized_heights: Tensor,
    unnormalized_derivatives: Tensor,
    *,
    bound: float = math.pi,
    inverse: bool = False,
    min_bin_width: float = DEFAULT_MIN_BIN_WIDTH,
    min_bin_height: float = DEFAULT_MIN_BIN_HEIGHT,
    min_derivative: float = DEFAULT_MIN_DERIVATIVE,
) -> tuple[Tensor, Tensor]:
    """Rational-quadratic diffeomorphism of the circle ``[-bound, bound)`` (Rezende et al., 2020).

    The ends are fixed (``-bound -> -bound``) and share one derivative, so the map is smooth
    across the identified endpoints. Inputs are first wrapped into ``[-bound, bound)``;
    outputs lie in ``[-bound, bound]``.

    Args:
        x: angles, any shape ``S``.
        unnormalized_widths: raw bin widths, shape ``S + (K,)``.
        unnormalized_heights: raw bin heights, shape ``S + (K,)``.
        unnormalized_derivatives: raw derivatives at the ``K`` distinct knots (knot ``K`` is
            knot 0), shape ``S + (K,)``.
        bound: half the period.
        inverse: evaluate the inverse map instead.
        min_bin_width: minimum bin width as a fraction of the period.
        min_bin_height: minimum bin height as a fraction of the period.
        min_derivative: minimum knot derivative.

    Returns:
        ``(y, log|dy/dx|)``, both of shape ``S``; all-zero raw parameters give the identity.
    """
    _check_raw(
        unnormalized_widths,
        unnormalized_heights,
        unnormalized_derivatives,
        unnormalized_widths.shape[-1],
    )
    widths, xk = _knots(unnormalized_widths, -bound, bound, min_bin_width)
    heights, yk = _knots(unnormalized_heights, -bound, bound, min_bin_height)
    d = _derivatives(unnormalized_derivatives, min_derivative)
    derivatives = torch.cat([d, d[..., :1]], dim=-1)
    wrapped = torch.remainder(x + bound, 2.0 * bound) - bound
    return _rqs(wrapped, widths, heights, derivatives, xk, yk, inverse)
