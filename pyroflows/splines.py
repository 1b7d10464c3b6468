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

All three run through one fused kernel, `packed_spline` (a `torch.autograd.Function` with
a hand-written backward pass), that works parameter-first: the raw parameters are laid out as
``(num_params, *x.shape)``, so every operation over the bins acts on slabs of the input's shape
and the bins never form a short innermost dimension. The softmaxes of widths and heights are
computed once, their cumulative sums by a few slab additions; the bin of each input is the
number of knots below it, and the two knots around it are read with `torch.gather`. There is
no boolean-mask indexing, so a compiled graph has no data-dependent shapes and a GPU never
waits for the host. The backward pass differentiates the spline in closed form (the inverse
by implicit differentiation of the quadratic it solves) and sends the gradients of the knots
back through a reversed cumulative sum, so autograd records one node per spline instead of
some sixty and keeps no per-bin intermediates beyond the softmax numerators. The inverse
solves the per-bin quadratic with a cancellation-free root whose discriminant is clamped at
zero and whose result is clipped to its bin. The kernel is differentiable once: a second
derivative through a spline is an error.

Float32 limit. Inverting a spline is only as accurate as the spline is steep: a round trip
``x -> y -> x`` errs by about ``eps * |y| / (dy/dx)`` (``eps`` = 6e-8 in float32). Raw
parameters that differ by a few units give bins of very different slopes next to knot
derivatives near 1, and the interior slope of such a bin falls to ~1e-7. Measured with 8 bins
on ``[-5, 5]`` (largest error over 20,000 draws; raw values ``±r`` or ``N(0, r^2)``), float32:

========================  =======  =======  =======  ========
raw magnitude ``r``       1        2        3        >= 5
========================  =======  =======  =======  ========
round-trip error in x     1e-4     1e-2     0.1-0.5  1 - 9
========================  =======  =======  =======  ========

Float64 stays below 1e-7 for any ``r``. The functions here take raw parameters as given;
the spline transformers (`pyroflows.transformers`) bound them softly first
(``raw_bound``, default 2: each raw value becomes ``2 * tanh(r / 2)``), which
keeps the float32 round trip within about 0.2% of the interval in x and 1e-2 in log-det
for raw parameters of any size, whatever a conditioner outputs.

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
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .checks import check_int, check_real

__all__ = [
    "DEFAULT_MIN_BIN_WIDTH",
    "DEFAULT_MIN_BIN_HEIGHT",
    "DEFAULT_MIN_DERIVATIVE",
    "check_spline_args",
    "rational_quadratic_spline",
    "bounded_rational_quadratic_spline",
    "circular_rational_quadratic_spline",
    "tanh_of_scaled",
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
    check_int("count_bins", count_bins)
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
    check_real("bound", bound, positive=True, optional=True)


_VARIANTS = ("identity", "free", "circular")


def _derivative_shift(min_derivative: float) -> float:
    """Offset making a raw derivative of 0 give exactly 1: ``min + softplus(0 + shift) = 1``."""
    return math.log(math.expm1(1.0 - min_derivative))


def _empty_in_layout(shape: torch.Size, stride: tuple[int, ...], like: Tensor) -> Tensor:
    """An uninitialised dense tensor of ``shape`` whose dimensions are ordered in memory as
    ``stride`` orders them (so a gradient has the layout of the tensor it belongs to)."""
    order = sorted(range(len(shape)), key=lambda i: -stride[i])
    dense = like.new_empty([shape[i] for i in order])
    return dense.permute([order.index(i) for i in range(len(shape))])


def _out(buffer: Tensor) -> Tensor | None:
    """``buffer`` as the ``out=`` target of an operation, or ``None`` under `torch.jit.trace`.

    The tracer records a custom Function's forward both as one opaque node and op by op
    into the enclosing graph. Dead-code elimination drops the op-by-op copy, except writes
    into tensors it cannot prove private (such as the views ``unbind`` returns): those would
    run again on every call of the traced graph, with gradients on, where ``out=`` with inputs
    that require grad is an error (Pyro's ``JitTrace_ELBO``). Traced, the operation allocates
    its result instead, so nothing leaks; eager code keeps writing into its buffers.
    """
    return None if torch.jit.is_tracing() else buffer


def _rq_values(
    v: Tensor,
    x_k: Tensor,
    w_k: Tensor,
    y_k: Tensor,
    h_k: Tensor,
    d0: Tensor,
    d1: Tensor,
    inverse: bool,
) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
    """One rational-quadratic bin: ``(out, log|dy/dx|, saved)`` in the requested direction.

    Written with fused operations (``addcmul``, ``addcdiv``) because at small batch sizes the
    number of operations, not the arithmetic, sets the cost.
    """
    s = h_k / w_k
    two_s = torch.add(d0, d1).sub_(s, alpha=2.0)  # d0 + d1 - 2 s
    if inverse:
        dy = v - y_k
        a = torch.addcmul(dy * two_s, h_k, s - d0)
        b = torch.addcmul(h_k * d0, dy, two_s, value=-1.0)
        cp = s * dy  # c = -cp
        sqrt_disc = torch.addcmul(b * b, a, cp, value=4.0).clamp_(min=0.0).sqrt_()
        # Root in [0, 1] without cancellation: a + b = h_k * s > 0, so a > 0 whenever b < 0.
        # Both forms give the same root; pick one by the sign of b with a 0/1 weight.
        neg = (b < 0).to(b.dtype)
        num = torch.add(sqrt_disc - b, cp, alpha=2.0).mul_(neg).sub_(cp, alpha=2.0)
        bs = b + sqrt_disc
        den = torch.add(bs, a, alpha=2.0).mul_(neg).sub_(bs)
        den.add_(neg, alpha=2.0 * torch.finfo(v.dtype).tiny).sub_(torch.finfo(v.dtype).tiny)
        xi = num.div_(den).clamp_(0.0, 1.0)
    else:
        xi = torch.sub(v, x_k).div_(w_k).clamp_(0.0, 1.0)
    omx = 1.0 - xi
    xi2 = xi * xi
    omx2 = omx * omx
    a_ = xi * omx
    den = torch.addcmul(s, two_s, a_)
    n1 = torch.addcmul(s * xi2, d0, a_)
    nd = torch.addcmul(d1 * xi2, d0, omx2).addcmul_(s, a_, value=2.0)
    r = s / den
    log_dydx = r.mul_(r).mul_(nd).log_()  # log(s^2 nd / den^2), one logarithm
    if inverse:
        out = torch.addcmul(x_k, xi, w_k)
    else:
        out = torch.addcdiv(y_k, h_k * n1, den)
    return out, log_dydx, (xi, omx, xi2, omx2, a_, s, two_s, d0, d1, h_k, w_k, den, n1, nd)


def _rq_grads(
    saved: tuple[Tensor, ...], g_out: Tensor, g_ladj: Tensor, inverse: bool
) -> tuple[Tensor, ...]:
    """Gradients of one bin's ``(out, ladj)`` with respect to ``(v, x_k, w_k, y_k, h_k, d0, d1)``.

    ``ladj`` is ``log|dy/dx|`` forward and ``-log|dy/dx|`` for the inverse. The inverse is
    differentiated implicitly: ``xi`` solves ``Y(xi) = v``, so ``dxi = (dv - dY) / Y'(xi)``
    with ``Y'(xi) = h_k * s * nd / den**2``. With ``A = xi (1 - xi)``:
    ``den = s + (d0 + d1 - 2 s) A``, ``n1 = s xi^2 + d0 A``, ``Y = y_k + h_k n1 / den``,
    ``nd = d1 xi^2 + 2 s A + d0 (1 - xi)^2`` and ``log|dy/dx| = log(s^2 nd / den^2)``.
    """
    xi, omx, xi2, omx2, a_, s, two_s, d0, d1, h_k, w_k, den, n1, nd = saved
    rden = den.reciprocal()
    one_m2xi = omx - xi
    one_m2a = xi2 + omx2  # 1 - 2 A
    dden_dxi = two_s * one_m2xi
    half_dnd_dxi = torch.addcmul(d1 * xi, s, one_m2xi).addcmul_(d0, omx, value=-1.0)
    if inverse:
        # L = g_out * (x_k + xi w_k) - g_ladj * log|dy/dx|: explicit partials first.
        g_nd = g_ladj / nd  # minus dL/dnd
        g_den = torch.mul(g_ladj, rden).mul_(2.0)  # dL/dden
        g_xi = torch.addcmul(g_out * w_k, g_den, dden_dxi).addcmul_(g_nd, half_dnd_dxi, value=-2.0)
        g_s = torch.mul(g_den, one_m2a).addcmul_(g_nd, a_, value=-2.0)
        g_s.addcdiv_(g_ladj, s, value=-2.0)
        g_den_a = g_den * a_
        g_d0 = torch.addcmul(g_den_a, g_nd, omx2, value=-1.0)
        g_d1 = torch.addcmul(g_den_a, g_nd, xi2, value=-1.0)
        # Implicit step: lam = (dL/dxi) / Y'(xi).
        hr2 = h_k * rden * rden
        lam = g_xi.div_(hr2 * s * nd)
        lh = lam * hr2
        g_s.addcmul_(lh, torch.addcmul(xi2 * den, n1, one_m2a, value=-1.0), value=-1.0)
        lha = lh * a_
        g_d0.addcmul_(lha, den - n1, value=-1.0)
        g_d1.addcmul_(lha, n1)
        g_s_w = g_s / w_k
        g_hk = torch.addcmul(g_s_w, lam * n1, rden, value=-1.0)
        g_wk = torch.addcmul(g_out * xi, g_s_w, s, value=-1.0)
        return lam, g_out, g_wk, -lam, g_hk, g_d0, g_d1
    g_n1 = g_out * h_k * rden
    minus_g_den = torch.addcmul(2.0 * g_ladj, g_n1, n1).mul_(rden)
    g_nd = g_ladj / nd
    g_xi = torch.addcmul(d0 * one_m2xi, s, xi, value=2.0).mul_(g_n1)
    g_xi.addcmul_(minus_g_den, dden_dxi, value=-1.0).addcmul_(g_nd, half_dnd_dxi, value=2.0)
    g_s = torch.addcmul(g_n1 * xi2, minus_g_den, one_m2a, value=-1.0)
    g_s.addcmul_(g_nd, a_, value=2.0).addcdiv_(g_ladj, s, value=2.0)
    g_d0 = torch.sub(g_n1, minus_g_den).mul_(a_).addcmul_(g_nd, omx2)
    g_d1 = torch.mul(g_nd, xi2).addcmul_(minus_g_den, a_, value=-1.0)
    g_v = g_xi.div_(w_k)
    g_s_w = g_s / w_k
    g_wk = torch.addcmul(g_v * xi, g_s_w, s).neg_()
    g_hk = torch.addcmul(g_s_w, g_out * n1, rden)
    return g_v, -g_v, g_wk, g_out, g_hk, g_d0, g_d1


def tanh_of_scaled(raw: Tensor, bound: float) -> Tensor:
    """``tanh(raw / bound)``, the soft bound of raw spline and affine parameters.

    On the CPU it is computed as ``2 sigmoid(2 raw / bound) - 1``, the same function
    (absolute error below 1e-7 in float32) at under half the time of ``torch.tanh`` there
    (16 x 8,192 values: 180 against 510 us, division included)."""
    if raw.device.type != "cpu":
        return torch.tanh(raw / bound)
    s = torch.sigmoid(raw * (2.0 / bound))
    # sigmoid's backward reads its output: scale it in place only outside autograd
    return (s.mul(2.0) if s.requires_grad else s.mul_(2.0)).sub_(1.0)


def _softmax_numerators(raw: Tensor, raw_bound: float) -> tuple[Tensor, Tensor | None]:
    """``exp`` of the (bounded) raw widths and heights ``(2, K, ...)``, shifted by their max
    unless bounded (then within ``+-raw_bound``); also ``tanh(raw / raw_bound)`` if bounded."""
    e = _out(raw.new_empty(raw.shape))
    if raw_bound <= 30.0:  # exp of values within +-30 needs no max shift
        tanh_wh = tanh_of_scaled(raw, raw_bound)
        return torch.exp(torch.mul(tanh_wh, raw_bound, out=e), out=e), tanh_wh
    tanh_wh = None
    if raw_bound != math.inf:
        tanh_wh = tanh_of_scaled(raw, raw_bound)
        raw = tanh_wh * raw_bound
    return torch.exp(torch.sub(raw, raw.amax(1, keepdim=True), out=e), out=e), tanh_wh


def _knot_derivatives(
    raw_d: Tensor,
    k: int,
    variant: str,
    idx: Tensor,
    index: Tensor,
    not_last: Tensor,
    min_derivative: float,
    raw_bound: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    """Derivatives ``d0, d1`` at the two knots around each input (bin ``idx``), from the raw
    values ``raw_d``: gathered, bounded, softplus (``index``: the two knots, as integers).
    Also what the backward pass needs: the softplus input, the gather index, the mask of
    learned knots and the bound's tanh."""
    valid = None
    if variant == "identity":  # raw_d holds knots 1..k-1; the ends are fixed at 1
        d_index = (index - 1).clamp_(0, max(k - 2, 0))
        valid = torch.stack([idx.clamp(max=1.0), not_last])
    elif variant == "free":  # raw_d holds knots 0..k
        d_index = index
    else:  # circular: raw_d holds knots 0..k-1, knot k is knot 0
        d_index = torch.remainder(index, k)
    tanh_d = None
    if raw_d.shape[0]:
        pre = torch.gather(raw_d, 0, d_index)
        if raw_bound != math.inf:  # bound the two gathered values only, not every knot's
            tanh_d = tanh_of_scaled(pre, raw_bound)
            pre = tanh_d * raw_bound
        pre = pre.add_(_derivative_shift(min_derivative))
        d = F.softplus(pre).add_(min_derivative)
    else:  # a single bin with fixed ends
        pre = d = torch.ones_like(index, dtype=idx.dtype)
    if valid is not None:
        d = d.sub_(1.0).mul_(valid).add_(1.0)
    d0, d1 = d.unbind(0)
    return d0, d1, pre, d_index, valid, tanh_d


class _RationalQuadratic(torch.autograd.Function):
    """The fused spline: ``(x, theta) -> (y, ladj)`` with ``theta`` of shape ``(P, *x.shape)``.

    ``theta`` stacks ``K`` raw widths, ``K`` raw heights and the raw derivatives along dim 0.
    Widths and heights are processed together as ``(2, K, ...)`` tensors, and the two knots
    around each input as pairs, so the whole spline costs about a hundred tensor operations
    forward and as many backward, whatever the batch size.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        theta: Tensor,
        k: int,
        variant: str,
        low: float,
        high: float,
        inverse: bool,
        min_bin_width: float,
        min_bin_height: float,
        min_derivative: float,
        raw_bound: float,
    ) -> tuple[Tensor, Tensor]:
        span = high - low
        shape = x.shape
        # Identity tails. Tail points are evaluated at 0 (a safe interior value) and discarded:
        # clamped onto the bound they would sit where the inverse's discriminant cancels.
        if variant == "identity":
            v = x.clamp(low, high)
            mask = (v == x).to(x.dtype)
            v = v.mul_(mask)
        elif variant == "free":
            v = x.clamp(low, high)
            mask = (v == x).to(x.dtype)
        else:
            v = torch.remainder(x - low, span).add_(low)
            mask = None

        # Unnormalised softmax of widths and heights together: e (2, K, ...), contiguous.
        # A finite raw_bound first maps each raw value r to raw_bound * tanh(r / raw_bound).
        raw = theta[: 2 * k].unflatten(0, (2, k))
        e, tanh_wh = _softmax_numerators(raw, raw_bound)
        # Exclusive cumulative sums c[j, s] = sum(e[s, :j]), j = 0..K, of both sides; c[K]
        # is the softmax normaliser z. A loop of slab additions: the bins are few and the
        # batch is wide, where cumsum and small matrix products are slow.
        # Eager, the rows are written straight into c; traced (no buffer), stacked at the end.
        bins, c = e.unbind(1), _out(e.new_empty((k + 1, 2) + shape))
        rows = [None] * (k + 1) if c is None else list(c.unbind(0))
        rows[0] = torch.zeros_like(bins[0]) if c is None else rows[0].zero_()
        for j in range(k):
            rows[j + 1] = torch.add(rows[j], bins[j], out=rows[j + 1])
        c = torch.stack(rows) if c is None else c
        z = rows[k]
        side = 1 if inverse else 0
        if k > 1:
            # Bin index: the number of interior knots j = 1..K-1 at or below v. Knot j sits
            # at the fraction F[j] = min * j + scale * c[j] / z, so v is above it when
            # (u - min * j) * z / scale >= c[j] with u = (v - low) / span.
            min_size = min_bin_height if inverse else min_bin_width
            scale = 1.0 - k * min_size
            q = z[side] / scale
            steps = torch.arange(1, k, dtype=e.dtype, device=e.device)
            steps = steps.view((k - 1,) + (1,) * len(shape))
            lhs = torch.addcmul(torch.sub(v, low).mul_(q / span), steps, q * min_size, value=-1.0)
            idx = torch.ge(lhs, c[1:k, side], out=_out(lhs)).sum(0, dtype=lhs.dtype)
        else:
            idx = torch.zeros_like(v)
        knots = torch.stack([idx, idx + 1.0])  # the knots on either side of v
        index = knots.long()
        not_last = torch.sub(k - 1.0, idx).clamp_(max=1.0)

        # Knot fractions f[(lo, hi), side] = min * (idx, idx + 1) + scale * c[idx] / z.
        expanded = index.unsqueeze(1).expand((2, 2) + shape)
        gathered = torch.gather(c, 0, expanded)  # (2 knots, 2 sides, ...)
        if min_bin_width == min_bin_height:
            scale = 1.0 - k * min_bin_width
            f = torch.addcdiv(knots.unsqueeze(1) * min_bin_width, gathered, z, value=scale)
        else:
            sizes = torch.tensor([min_bin_width, min_bin_height], dtype=e.dtype, device=e.device)
            sizes = sizes.view((2,) + (1,) * len(shape))
            f = torch.addcdiv(knots.unsqueeze(1) * sizes, gathered * (1.0 - k * sizes), z)
        f[1].sub_(1.0).mul_(not_last).add_(1.0)  # the last knot is exactly 1
        f = f.mul_(span)
        start = f[0] + low  # (x_k, y_k)
        size = f[1] - f[0]  # (w_k, h_k)
        x_k, y_k = start.unbind(0)
        w_k, h_k = size.unbind(0)

        d0, d1, pre, d_index, valid, tanh_d = _knot_derivatives(
            theta[2 * k :], k, variant, idx, index, not_last, min_derivative, raw_bound
        )

        out, ladj, saved = _rq_values(v, x_k, w_k, y_k, h_k, d0, d1, inverse)
        if inverse:
            ladj = ladj.neg_()
        if variant == "identity":
            out = torch.addcmul(out.mul_(mask), x, 1.0 - mask)
            ladj = ladj.mul_(mask)
        elif variant == "free":  # zero density outside the interval, in either direction
            ladj = torch.where(mask > 0, ladj, -math.inf if inverse else math.inf)

        ctx.config = (k, variant, span, min_bin_width, min_bin_height, inverse)
        ctx.theta_shape, ctx.theta_stride = theta.shape, theta.stride()
        none = x.new_ones(())  # a placeholder for an absent tensor
        ctx.save_for_backward(
            none if mask is None else mask,
            e, z, gathered, index, not_last, pre, d_index,
            none if valid is None else valid,
            none if tanh_wh is None else tanh_wh,
            none if tanh_d is None else tanh_d, *saved,
        )  # fmt: skip
        return out, ladj

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g_out: Tensor, g_ladj: Tensor) -> tuple[Tensor | None, ...]:
        k, variant, span, min_bin_width, min_bin_height, inverse = ctx.config
        mask, e, z, gathered, index, not_last, pre, d_index, valid, tanh_wh, tanh_d, *saved = (
            ctx.saved_tensors
        )
        if variant == "identity":
            g_in = g_out * mask
            g_outside = g_out - g_in
            g_out, g_ladj = g_in, g_ladj * mask
        elif variant == "free":
            g_ladj = g_ladj * mask
        g_v, g_xk, g_wk, g_yk, g_hk, g_d0, g_d1 = _rq_grads(tuple(saved), g_out, g_ladj, inverse)

        g_x = None
        if ctx.needs_input_grad[0]:
            if variant == "identity":
                g_x = g_v.add_(g_outside)
            elif variant == "free":
                g_x = g_v.mul_(mask)
            else:
                g_x = g_v
        if not ctx.needs_input_grad[1]:
            return (g_x,) + (None,) * 10

        # Eager: write the gradient straight into a tensor laid out like theta. Compiled: build
        # it out of place (dynamo refuses non-contiguous out= tensors; inductor fuses anyway).
        if torch.compiler.is_compiling():
            g_theta = e.new_empty(ctx.theta_shape)
        else:
            g_theta = _empty_in_layout(ctx.theta_shape, ctx.theta_stride, e)
        # Knot fractions: g_f[(lo, hi), side]; start = low + span f_lo, size = span (f_hi - f_lo).
        g_start = torch.stack([g_xk, g_yk])
        g_size = torch.stack([g_wk, g_hk])
        g_f = torch.stack([g_start - g_size, g_size * not_last])
        if min_bin_width == min_bin_height:
            coef = g_f * ((span * (1.0 - k * min_bin_width)) / z)
        else:
            sizes = torch.tensor([min_bin_width, min_bin_height], dtype=e.dtype, device=e.device)
            scale = (1.0 - k * sizes).view((2,) + (1,) * (z.dim() - 1))
            coef = g_f * (span * scale / z)
        # c[j, s] = sum(e[s, :j]) and z = c[K, s]: scatter the gradients of the gathered
        # entries and of z into g_c; then g_e[i] = sum(g_c[i + 1:]), a reversed cumulative sum.
        g_c = e.new_zeros((k + 1, 2) + e.shape[2:])
        g_c.scatter_add_(0, index.unsqueeze(1).expand_as(coef), coef)
        g_c[k].sub_((coef * gathered).sum(0).div_(z))
        rows = g_c.unbind(0)
        for j in range(k - 1, 0, -1):
            rows[j].add_(rows[j + 1])
        g_raw = g_theta[: 2 * k].unflatten(0, (2, k))
        torch.mul(e, g_c[1:].transpose(0, 1), out=g_raw)
        if tanh_wh.dim():  # through the bound: d(B tanh(r / B))/dr = 1 - tanh^2
            g_raw.mul_(1.0 - tanh_wh.square())

        # Derivatives: d = min + softplus(pre), scattered back onto the gathered raw values.
        g_d = g_theta[2 * k :]
        if g_d.shape[0]:
            g_pre = torch.stack([g_d0, g_d1]).mul_(torch.sigmoid(pre))
            if valid.dim():
                g_pre.mul_(valid)
            if tanh_d.dim():
                g_pre.mul_(1.0 - tanh_d.square())
            g_d.zero_()
            g_d.scatter_add_(0, d_index, g_pre)
        return (g_x, g_theta) + (None,) * 9


def _raw_count(variant: str, k: int) -> int:
    """Number of raw derivative parameters of a spline variant with ``k`` bins."""
    return {"identity": k - 1, "free": k + 1, "circular": k}[variant]


def packed_spline(
    x: Tensor,
    theta: Tensor,
    *,
    count_bins: int,
    variant: str = "identity",
    low: float = -5.0,
    high: float = 5.0,
    inverse: bool = False,
    min_bin_width: float = DEFAULT_MIN_BIN_WIDTH,
    min_bin_height: float = DEFAULT_MIN_BIN_HEIGHT,
    min_derivative: float = DEFAULT_MIN_DERIVATIVE,
    raw_bound: float = math.inf,
) -> tuple[Tensor, Tensor]:
    """The spline with parameters first: ``theta`` of shape ``(P, *S)`` for ``x`` of shape ``S``.

    The engine behind the three public functions and the spline transformers. ``theta``
    stacks the raw widths (``count_bins``), heights (``count_bins``) and derivatives
    (``count_bins - 1``, ``count_bins + 1`` or ``count_bins`` for the three variants) along
    its first dimension; its other dimensions broadcast with ``x``. Each slab ``theta[k]``
    should be laid out like ``x`` (the structures pass views of a parameter-major conditioner
    output whose rows are contiguous), so every operation over the bins reads whole slabs.

    Args:
        x: input, shape ``S``.
        theta: raw parameters, parameter dimension first.
        count_bins: number of bins ``K``.
        variant: ``"identity"`` (identity tails outside ``[low, high]``, end derivatives 1),
            ``"free"`` (a bijection of ``[low, high]``, free end derivatives) or
            ``"circular"`` (a circle of circumference ``high - low``).
        low: lower end of the interval.
        high: upper end of the interval.
        inverse: evaluate the inverse map instead.
        min_bin_width: minimum bin width as a fraction of the interval.
        min_bin_height: minimum bin height as a fraction of the interval.
        min_derivative: minimum knot derivative.
        raw_bound: if finite, each raw value ``r`` is first mapped to
            ``raw_bound * tanh(r / raw_bound)`` (inside the kernel, at no extra pass): the
            spline transformers use 2, which keeps the float32 round trip accurate (see the
            module docstring). The default ``inf`` takes the raw values as they are.

    Returns:
        ``(y, log|dy/dx|)`` of shape ``broadcast(S, theta.shape[1:])``.

    Example:
        >>> import torch
        >>> from pyroflows.splines import packed_spline
        >>> x = torch.randn(4, 100)
        >>> theta = torch.zeros(3 * 8 - 1, 4, 100)  # zero parameters: the identity
        >>> y, ladj = packed_spline(x, theta, count_bins=8)
        >>> bool(torch.allclose(y, x, atol=1e-6)), bool(ladj.abs().max() < 1e-6)
        (True, True)
    """
    if variant not in _VARIANTS:
        raise ValueError(f"variant must be one of {_VARIANTS}, got {variant!r}")
    expected = 2 * count_bins + _raw_count(variant, count_bins)
    if theta.dim() == 0 or theta.shape[0] != expected:
        raise ValueError(
            f"expected {expected} spline parameters first, got theta of shape {tuple(theta.shape)}"
        )
    shape = torch.broadcast_shapes(x.shape, theta.shape[1:])
    if x.shape != shape:
        x = x.expand(shape)
    if theta.shape[1:] != shape:
        missing = len(shape) - (theta.dim() - 1)  # batch dims are aligned on the right
        theta = theta.view(theta.shape[:1] + (1,) * missing + theta.shape[1:])
        theta = theta.expand(theta.shape[:1] + shape)
    return _RationalQuadratic.apply(
        x,
        theta,
        count_bins,
        variant,
        float(low),
        float(high),
        bool(inverse),
        float(min_bin_width),
        float(min_bin_height),
        float(min_derivative),
        float(raw_bound),
    )


def _spline_from_raw(
    x: Tensor,
    raw_w: Tensor,
    raw_h: Tensor,
    raw_d: Tensor,
    variant: str,
    low: float,
    high: float,
    inverse: bool,
    min_bin_width: float,
    min_bin_height: float,
    min_derivative: float,
) -> tuple[Tensor, Tensor]:
    """Check ``(..., K)`` widths and heights and ``(..., n)`` derivatives, stack them
    parameter-first as one ``(2K + n, ...)`` tensor and run `packed_spline`."""
    k = raw_w.shape[-1]
    if raw_h.shape[-1] != k:
        raise ValueError(
            f"widths and heights need the same number of bins, got {k} and {raw_h.shape[-1]}"
        )
    if raw_d.shape[-1] != _raw_count(variant, k):
        raise ValueError(
            f"expected {_raw_count(variant, k)} derivative parameters for {k} bins, "
            f"got {raw_d.shape[-1]}"
        )
    batch = torch.broadcast_shapes(raw_w.shape[:-1], raw_h.shape[:-1], raw_d.shape[:-1])
    parts = [t.expand(batch + t.shape[-1:]) for t in (raw_w, raw_h, raw_d)]
    theta = torch.cat(parts, dim=-1).movedim(-1, 0)
    return packed_spline(
        x,
        theta,
        count_bins=k,
        variant=variant,
        low=low,
        high=high,
        inverse=inverse,
        min_bin_width=min_bin_width,
        min_bin_height=min_bin_height,
        min_derivative=min_derivative,
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
    return _spline_from_raw(
        x,
        unnormalized_widths,
        unnormalized_heights,
        unnormalized_derivatives,
        "identity",
        -bound,
        bound,
        inverse,
        min_bin_width,
        min_bin_height,
        min_derivative,
    )


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

    The map is a bijection of ``[low, high]`` only: a value outside it is clamped onto the
    interval and gets log-det ``-inf`` from the inverse and ``+inf`` from the forward map
    (the two agree, ``log|dx/dy| = -log|dy/dx|``), so a flow's log-density there is ``-inf``
    (zero density) whichever direction computes it, and never NaN. Nothing is raised: that
    would need a device-to-host check on every call.

    Args:
        x: input, any shape ``S``; values outside ``[low, high]`` are outside the domain
            (see above).
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
    return _spline_from_raw(
        x,
        unnormalized_widths,
        unnormalized_heights,
        unnormalized_derivatives,
        "free",
        low,
        high,
        inverse,
        min_bin_width,
        min_bin_height,
        min_derivative,
    )


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
    return _spline_from_raw(
        x,
        unnormalized_widths,
        unnormalized_heights,
        unnormalized_derivatives,
        "circular",
        -bound,
        bound,
        inverse,
        min_bin_width,
        min_bin_height,
        min_derivative,
    )
