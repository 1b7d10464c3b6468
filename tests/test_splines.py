"""The rational-quadratic spline functions: exactness, tails, monotonicity, stress, fuzzing."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pyroflows.splines import (
    bounded_rational_quadratic_spline,
    check_spline_args,
    circular_rational_quadratic_spline,
    rational_quadratic_spline,
)
from pyroflows.transformers import RationalQuadraticSpline


def raw_params(shape, count_bins, n_derivatives, scale, dtype, generator=None):
    def draw(k):
        return torch.randn(shape + (k,), generator=generator, dtype=torch.float64).to(dtype) * scale

    return draw(count_bins), draw(count_bins), draw(n_derivatives)


def test_zero_parameters_give_identity(dtype):
    x = torch.linspace(-7, 7, 101, dtype=dtype)
    w, h, d = (torch.zeros(101, k, dtype=dtype) for k in (8, 8, 7))
    y, ladj = rational_quadratic_spline(x, w, h, d, bound=5.0)
    torch.testing.assert_close(y, x)
    torch.testing.assert_close(ladj, torch.zeros_like(x))


def test_identity_tails_and_unit_boundary_derivative(dtype):
    w, h, d = raw_params((1,), 8, 7, 2.0, dtype)
    outside = torch.tensor([-100.0, -5.5, -5.0 - 1e-6, 5.0 + 1e-6, 7.0, 1e4], dtype=dtype)
    y, ladj = rational_quadratic_spline(outside, w, h, d, bound=5.0)
    torch.testing.assert_close(y, outside)
    assert torch.equal(ladj, torch.zeros_like(ladj))
    # Just inside the bound the derivative is (numerically) 1: the map is C1 at the bound.
    inside = torch.tensor([-5.0, 5.0], dtype=dtype)
    _, ladj_in = rational_quadratic_spline(inside, w, h, d, bound=5.0)
    torch.testing.assert_close(ladj_in, torch.zeros_like(ladj_in), atol=1e-6, rtol=0)


def test_monotone_and_finite_at_knots_and_bounds(dtype):
    gen = torch.Generator().manual_seed(0)
    w, h, d = raw_params((1,), 10, 9, 4.0, dtype, gen)
    x = torch.linspace(-6, 6, 20001, dtype=dtype)
    # Add the knots themselves, where bin selection switches.
    widths = 1e-3 + (1 - 1e-3 * 10) * torch.softmax(w, -1)
    knots = -5 + 10 * torch.cat([torch.zeros(1, 1, dtype=dtype), widths.cumsum(-1)], -1)
    x = torch.cat([x, knots.flatten()]).sort().values
    y, ladj = rational_quadratic_spline(
        x, w.expand(len(x), -1), h.expand(len(x), -1), d.expand(len(x), -1), bound=5.0
    )
    assert torch.isfinite(y).all() and torch.isfinite(ladj).all()
    assert (y[1:] >= y[:-1]).all(), "spline is not monotone"
    x_back, ladj_inv = rational_quadratic_spline(
        y,
        w.expand(len(x), -1),
        h.expand(len(x), -1),
        d.expand(len(x), -1),
        bound=5.0,
        inverse=True,
    )
    assert torch.isfinite(x_back).all() and torch.isfinite(ladj_inv).all()


def test_log_det_matches_autograd(dtype, tol):
    x = torch.linspace(-6, 6, 333, dtype=dtype).requires_grad_()
    w, h, d = raw_params((333,), 8, 7, 2.0, dtype)
    y, ladj = rational_quadratic_spline(x, w, h, d, bound=5.0)
    (grad,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(ladj, grad.log(), atol=tol, rtol=tol)
    y = y.detach().requires_grad_()
    x2, ladj_inv = rational_quadratic_spline(y, w, h, d, bound=5.0, inverse=True)
    (grad_inv,) = torch.autograd.grad(x2.sum(), y)
    torch.testing.assert_close(ladj_inv, grad_inv.log(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype_name, tol", [("float32", 1e-3), ("float64", 1e-9)])
def test_inverse_is_stable_for_large_raw_parameters(dtype_name, tol):
    """Conditioner outputs of size ~ 5 * randn: no NaN/Inf, tight round trip.

    The round trip is measured where the inverse is well conditioned: from data ``y`` to
    ``x = f^-1(y)`` and back. The opposite trip loses what the forward map rounded away where
    the spline is nearly flat; there the error is bounded in the output's units.
    """
    dtype = getattr(torch, dtype_name)
    gen = torch.Generator().manual_seed(1)
    n = 200_000
    y = (torch.rand(n, generator=gen, dtype=torch.float64) * 12 - 6).to(dtype)
    w, h, d = raw_params((n,), 8, 7, 5.0, dtype, gen)
    x, ladj_inv = rational_quadratic_spline(y, w, h, d, bound=5.0, inverse=True)
    y_back, ladj = rational_quadratic_spline(x, w, h, d, bound=5.0)
    for t in (x, ladj_inv, y_back, ladj):
        assert torch.isfinite(t).all()
    assert (y_back - y).abs().max() <= tol
    assert (ladj + ladj_inv).abs().max() <= 1e3 * tol
    # Forward first: x -> y -> x, with the error measured through the forward map.
    x0 = y
    y0, _ = rational_quadratic_spline(x0, w, h, d, bound=5.0)
    x1, _ = rational_quadratic_spline(y0, w, h, d, bound=5.0, inverse=True)
    y1, _ = rational_quadratic_spline(x1, w, h, d, bound=5.0)
    assert torch.isfinite(x1).all()
    assert (y1 - y0).abs().max() <= tol


def test_bounded_variant_maps_interval_onto_itself():
    dtype = torch.float64  # exact identities; float32 precision is the stress test's job
    w, h, d = raw_params((5,), 6, 7, 2.0, dtype)
    ends = torch.tensor([[-1.0, 3.0]] * 5, dtype=dtype)
    y, _ = bounded_rational_quadratic_spline(
        ends, w[:, None], h[:, None], d[:, None], low=-1.0, high=3.0
    )
    torch.testing.assert_close(y, ends)
    x = torch.rand(5, dtype=dtype) * 4 - 1
    y, ladj = bounded_rational_quadratic_spline(x, w, h, d, low=-1.0, high=3.0)
    x2, ladj2 = bounded_rational_quadratic_spline(y, w, h, d, low=-1.0, high=3.0, inverse=True)
    torch.testing.assert_close(x2, x)
    torch.testing.assert_close(ladj, -ladj2)


def test_circular_variant_is_smooth_across_the_seam():
    dtype = torch.float64  # exact identities; float32 precision is the stress test's job
    w, h, d = raw_params((1,), 6, 6, 2.0, dtype)
    eps = 1e-9 if dtype == torch.float64 else 1e-5
    x = torch.tensor([-math.pi + eps, math.pi - eps], dtype=dtype)
    y, ladj = circular_rational_quadratic_spline(x, w, h, d)
    # Ends are fixed and share one derivative.
    torch.testing.assert_close(y, x, atol=10 * eps, rtol=0)
    torch.testing.assert_close(ladj[0], ladj[1], atol=1e-3, rtol=0)
    # Inputs are wrapped: x and x + 2 pi map to the same angle.
    x = torch.rand(50, dtype=dtype) * 6 - 3
    y1, _ = circular_rational_quadratic_spline(x, w, h, d)
    y2, _ = circular_rational_quadratic_spline(x + 2 * math.pi, w, h, d)
    torch.testing.assert_close(y1, y2, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"count_bins": 0}, "count_bins"),
        ({"count_bins": 2.5}, "count_bins"),
        ({"count_bins": 10, "min_bin_width": 0.1}, "does not fit"),
        ({"count_bins": 4, "min_bin_height": 0.3}, "does not fit"),
        ({"count_bins": 4, "min_derivative": 1.0}, "min_derivative"),
        ({"count_bins": 4, "min_derivative": 0.0}, "min_derivative"),
        ({"count_bins": 4, "bound": -1.0}, "bound"),
    ],
)
def test_bad_hyper_parameters_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        check_spline_args(**kwargs)
    with pytest.raises(ValueError, match=match):
        RationalQuadraticSpline(**kwargs)


def test_wrong_number_of_derivatives_raises():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="derivative parameters"):
        rational_quadratic_spline(x, torch.zeros(3, 4), torch.zeros(3, 4), torch.zeros(3, 4))


@settings(max_examples=150, deadline=None)
@given(
    count_bins=st.integers(1, 12),
    bound=st.floats(0.5, 10.0),
    scale=st.floats(0.0, 8.0),
    seed=st.integers(0, 2**31 - 1),
    min_size=st.sampled_from([1e-4, 1e-3, 1e-2]),
)
def test_fuzz_unconstrained_spline(count_bins, bound, scale, seed, min_size):
    gen = torch.Generator().manual_seed(seed)
    n = 64
    w, h, d = raw_params((n,), count_bins, count_bins - 1, scale, torch.float64, gen)
    y = (torch.rand(n, generator=gen, dtype=torch.float64) * 2 - 1) * 1.5 * bound
    kw = {"bound": bound, "min_bin_width": min_size, "min_bin_height": min_size}
    x, ladj_inv = rational_quadratic_spline(y, w, h, d, inverse=True, **kw)
    y_back, ladj = rational_quadratic_spline(x, w, h, d, **kw)
    assert torch.isfinite(x).all() and torch.isfinite(ladj_inv).all()
    torch.testing.assert_close(y_back, y, atol=1e-9 * bound, rtol=0)
    torch.testing.assert_close(ladj, -ladj_inv, atol=1e-6, rtol=0)
    # One parameter set on sorted inputs: outputs sorted too (monotone), nothing non-finite.
    grid = torch.linspace(-1.5 * bound, 1.5 * bound, 257, dtype=torch.float64)
    out, _ = rational_quadratic_spline(grid, w[0], h[0], d[0], **kw)
    assert (out[1:] >= out[:-1]).all()
    x32, _ = rational_quadratic_spline(
        y.float(), w.float(), h.float(), d.float(), inverse=True, **kw
    )
    assert torch.isfinite(x32).all()


@settings(max_examples=60, deadline=None)
@given(
    count_bins=st.integers(1, 10),
    scale=st.floats(0.0, 6.0),
    seed=st.integers(0, 2**31 - 1),
    variant=st.sampled_from(["bounded", "circular"]),
)
def test_fuzz_bounded_and_circular_splines(count_bins, scale, seed, variant):
    gen = torch.Generator().manual_seed(seed)
    n = 64
    if variant == "bounded":
        w, h, d = raw_params((n,), count_bins, count_bins + 1, scale, torch.float64, gen)
        fn, kw, lo, hi = bounded_rational_quadratic_spline, {"low": -2.0, "high": 1.0}, -2.0, 1.0
    else:
        w, h, d = raw_params((n,), count_bins, count_bins, scale, torch.float64, gen)
        fn, kw, lo, hi = circular_rational_quadratic_spline, {}, -math.pi, math.pi
    y = lo + (hi - lo) * torch.rand(n, generator=gen, dtype=torch.float64)
    x, ladj_inv = fn(y, w, h, d, inverse=True, **kw)
    y_back, ladj = fn(x, w, h, d, **kw)
    assert ((x >= lo) & (x <= hi)).all()
    torch.testing.assert_close(y_back, y, atol=1e-9, rtol=0)
    torch.testing.assert_close(ladj, -ladj_inv, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype_name", ["float32", "float64"])
@pytest.mark.parametrize("inverse", [False, True])
def test_gradients_are_finite_at_knots_bounds_and_tails(dtype_name, inverse):
    """One non-finite gradient poisons a whole update: none at knots, bounds or in the tails."""
    dtype = getattr(torch, dtype_name)
    gen = torch.Generator().manual_seed(3)
    n = 4000
    w, h, d = (t.requires_grad_() for t in raw_params((n,), 8, 7, 8.0, dtype, gen))
    special = torch.tensor([-5.0, 5.0, -5.0 - 1e-3, 5.0 + 1e-3, -50.0, 50.0, 0.0], dtype=dtype)
    x = torch.cat([special.repeat(n // 8), torch.linspace(-7, 7, n - 7 * (n // 8), dtype=dtype)])
    x = x.requires_grad_()
    y, ladj = rational_quadratic_spline(x, w, h, d, bound=5.0, inverse=inverse)
    (y.sum() + ladj.sum()).backward()
    for name, t in (("x", x), ("widths", w), ("heights", h), ("derivatives", d)):
        assert torch.isfinite(t.grad).all(), f"non-finite gradient for {name}"


def test_bounded_inverse_gives_zero_density_outside():
    w, h, d = raw_params((3,), 4, 5, 1.0, torch.float64)
    y = torch.tensor([-0.5, 0.5, 1.5], dtype=torch.float64)
    _, ladj = bounded_rational_quadratic_spline(y, w, h, d, low=0.0, high=1.0, inverse=True)
    assert ladj[0] == -math.inf and ladj[2] == -math.inf and torch.isfinite(ladj[1])


SPLINES = {
    "unbounded": (rational_quadratic_spline, -1, {"bound": 3.0}, 4.0),
    "bounded": (bounded_rational_quadratic_spline, 1, {"low": -1.0, "high": 2.0}, None),
    "circular": (circular_rational_quadratic_spline, 0, {}, 5.0),
}


@pytest.mark.parametrize("count_bins", [1, 2, 5])
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("variant", list(SPLINES))
def test_hand_written_gradients_match_finite_differences(variant, inverse, count_bins, device):
    """The spline kernel's backward pass is written by hand: check it against gradcheck
    (on the ``--device`` of the run, so a GPU run checks the same kernel there)."""
    fn, extra, kwargs, half_range = SPLINES[variant]
    gen = torch.Generator().manual_seed(count_bins)
    n = 12
    if half_range is None:  # inside the interval (the clamp outside has no derivative)
        x = -1.0 + 3.0 * torch.rand(n, generator=gen, dtype=torch.float64)
    else:  # inside and outside the interval (tails)
        x = (2.0 * torch.rand(n, generator=gen, dtype=torch.float64) - 1.0) * half_range
    w, h, d = raw_params((n,), count_bins, count_bins + extra, 1.5, torch.float64, gen)
    kwargs = dict(kwargs, min_bin_width=0.01, min_bin_height=0.02, min_derivative=0.05)
    inputs = tuple(t.to(device).requires_grad_() for t in (x, w, h, d))
    assert torch.autograd.gradcheck(
        lambda *args: fn(*args, inverse=inverse, **kwargs), inputs, atol=1e-6, fast_mode=True
    )


def test_second_derivatives_raise():
    """The kernel is differentiable once: a second derivative is an error, never a silent 0."""
    x = torch.randn(5, dtype=torch.float64, requires_grad=True)
    w, h, d = raw_params((5,), 4, 3, 1.0, torch.float64)
    y, _ = rational_quadratic_spline(x, w, h, d)
    (g,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice|does not require grad"):
        g.sum().backward()


def test_the_bound_tanh_is_tanh():
    from pyroflows.splines import tanh_of_scaled as _tanh_of_scaled

    u = torch.cat([torch.linspace(-40, 40, 20001), torch.tensor([0.0, 1e-30, -1e-30, 1e30])])
    for bound in (2.0, 0.5, 7.0):
        got = _tanh_of_scaled(u, bound)
        torch.testing.assert_close(got, torch.tanh(u / bound), atol=2e-7, rtol=0)
        assert bool((got.abs() <= 1).all())
    u64 = u.double()
    torch.testing.assert_close(_tanh_of_scaled(u64, 2.0), torch.tanh(u64 / 2.0), atol=1e-15, rtol=0)
    # under autograd (the affine transformer's path) the gradient is tanh's
    v = torch.linspace(-8, 8, 101, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(_tanh_of_scaled(v, 3.0).sum(), v)
    torch.testing.assert_close(g, (1 - torch.tanh(v / 3.0) ** 2) / 3.0, atol=1e-12, rtol=0)
