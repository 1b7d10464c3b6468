"""Preconditioning for flow guides: the mode of a log density and its curvature there.

`laplace_preconditioner` looks for the mode of a negative log density ``f(u)`` over a
vector ``u`` and returns a centre and a scale ``L`` with ``L L^T`` the inverse Hessian
there (the Laplace approximation), so that a guide written as ``u = centre + L w`` sees a
posterior whose scales are about one and whose linear correlations are gone. `AutoFlow`
builds its output layer (`pyroflows.Precondition`) from it.

Two forms, by dimension (`FULL_MAX_DIM`):

* ``"full"`` (``D <= 200``): damped saddle-free Newton steps to the mode (the Hessian costs
  ``D`` gradient passes per step), then ``L = chol(H^-1)``;
* ``"diagonal"`` (larger ``D``): L-BFGS to the mode, then ``L = diag(H_ii^-1/2)`` with the
  Hessian diagonal estimated from Hessian-vector products with random sign vectors.

The search runs from several start points. Only the curvature of a single dominant mode is
trusted: where it finds several distinct modes of comparable mass (two lobes, a band of
modes), one Laplace approximation would pin the guide to one of them, and where it finds no
finite mode (a funnel, whose density grows without bound towards its neck), there is no
curvature to use; in both cases the start point is kept with ``L = I``, and the record says
so. With the search off, the curvature at
the start point is used, and its directions of non-positive curvature get a unit scale.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..checks import check_int

__all__ = ["FULL_MAX_DIM", "Preconditioning", "laplace_preconditioner"]

#: Largest dimension given a full (dense Cholesky) preconditioner; above it, a diagonal one.
FULL_MAX_DIM = 200
#: Newton decrement (nats) at which the search stops: within ~0.05 Laplace sds of the mode.
DECREMENT_TOL = 1e-3
#: Scatter (unconstrained units) of the extra start points of the mode search.
START_SPREAD = 2.0
#: Hessian-vector products behind the diagonal form's curvature estimate.
NUM_PROBES = 32


@dataclass(frozen=True)
class Preconditioning:
    """What preconditioning did, recorded on the guide (``guide.preconditioning``).

    Attributes:
        form: the form used, ``"full"`` (triangular ``L``) or ``"diagonal"``; ``"off"`` when
            preconditioning was switched off or skipped. With ``centre == "start"`` after a
            search that found no mode, ``L`` is the identity whatever the form.
        centre: ``"mode"`` (the search converged to one dominant mode), ``"start"`` (no
            mode, or several of comparable mass: the start point was kept, with ``L = I``)
            or ``"start, mode search off"``.
        iterations: mode-search iterations run.
        seconds: wall time of the search and the curvature.
        message: one sentence for the user (why a fallback happened, for instance).
    """

    form: str
    centre: str
    iterations: int
    seconds: float
    message: str

    def __str__(self) -> str:
        return f"{self.form} preconditioner at the {self.centre} ({self.seconds:.2f} s): " + (
            self.message
        )


@dataclass(frozen=True)
class _Search:
    point: Tensor
    converged: bool
    iterations: int
    message: str
    eig: tuple[Tensor, Tensor] | None = None  # the Hessian's eigenpairs at ``point``, if known


def _safe_value(fn: Callable[[Tensor], Tensor], u: Tensor) -> float:
    """``fn(u)`` as a float, ``inf`` where it is not finite or the model refuses the point."""
    try:
        with torch.no_grad():
            value = float(fn(u))
    except (ValueError, RuntimeError):  # e.g. a distribution refusing an overflowed parameter
        return math.inf
    return value if math.isfinite(value) else math.inf


def _gradient(fn: Callable[[Tensor], Tensor], u: Tensor) -> Tensor:
    """The gradient of ``fn`` at ``u`` (``u`` itself is left untouched)."""
    x = u.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(fn(x), x)
    return grad


def _hessian(fn: Callable[[Tensor], Tensor], u: Tensor) -> Tensor:
    """The Hessian of ``fn`` at ``u``, symmetrised."""
    h = torch.autograd.functional.hessian(fn, u.detach())
    return 0.5 * (h + h.T)


def _rounding(evals: Tensor) -> float:
    """The smallest eigenvalue magnitude that is not rounding error, relative to the largest
    (in the dtype the model computes in)."""
    largest = float(evals.abs().max().clamp(min=torch.finfo(evals.dtype).tiny))
    return 10 * evals.numel() * torch.finfo(evals.dtype).eps * largest


def _positive(evals: Tensor) -> Tensor:
    """Eigenvalues that are positive beyond rounding: a numerically flat direction is not
    curvature."""
    return evals > _rounding(evals)


def _newton(fn: Callable[[Tensor], Tensor], start: Tensor, max_iter: int) -> _Search:
    """Damped saddle-free Newton with a backtracking line search.

    Steps use the magnitudes of the Hessian's eigenvalues, so every step descends; the search
    has converged when the Hessian is positive definite and the Newton decrement (the
    predicted decrease, half the squared distance to the mode in Laplace standard
    deviations) is below `DECREMENT_TOL`, or below 1e-2 when rounding stops the line search.
    """
    u, f = start.detach().clone(), _safe_value(fn, start)
    if not math.isfinite(f):
        return _Search(start, False, 0, "the log density is not finite at the start point")
    for it in range(1, max_iter + 1):
        grad, hess = _gradient(fn, u), _hessian(fn, u)
        if not bool(torch.isfinite(grad).all() & torch.isfinite(hess).all()):
            return _Search(u, False, it, "non-finite gradient or Hessian during the search")
        evals, evecs = torch.linalg.eigh(hess)
        convex = bool(_positive(evals).all())
        magnitude = evals.abs().clamp(min=_rounding(evals))
        step = -(evecs / magnitude) @ (evecs.T @ grad)
        decrement = float(-(grad @ step)) / 2
        if convex and decrement < DECREMENT_TOL:
            return _Search(u, True, it, f"Newton converged in {it} iterations", (evals, evecs))
        for _ in range(40):
            f_new = _safe_value(fn, u + step)
            if f_new < f:
                break
            step = step / 2
        else:
            if convex and decrement < 1e-2:
                message = f"Newton converged in {it} iterations (rounding)"
                return _Search(u, True, it, message, (evals, evecs))
            return _Search(u, False, it, "the line search found no decrease")
        u, f = u + step, f_new
    return _Search(u, False, max_iter, f"no mode within {max_iter} Newton iterations")


def _lbfgs(fn: Callable[[Tensor], Tensor], start: Tensor, max_iter: int) -> _Search:
    """L-BFGS with a strong-Wolfe line search; converged when the gradient vanishes."""
    if not math.isfinite(_safe_value(fn, start)):
        return _Search(start, False, 0, "the log density is not finite at the start point")
    u = start.detach().clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS(
        [u],
        max_iter=max_iter,
        history_size=20,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-7,
        tolerance_change=1e-12,
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        value = fn(u)
        value.backward()
        return value

    optimizer.step(closure)
    point = u.detach()
    iterations = int(optimizer.state[u].get("n_iter", 0))
    grad = _gradient(fn, point)
    scale = 1.0 + abs(_safe_value(fn, point))
    if bool(torch.isfinite(grad).all()) and float(grad.abs().max()) < 1e-4 * scale:
        return _Search(point, True, iterations, f"L-BFGS converged in {iterations} iterations")
    return _Search(point, False, iterations, f"no mode within {max_iter} L-BFGS iterations")


def _full_scale(
    fn: Callable[[Tensor], Tensor], u: Tensor, eig: tuple[Tensor, Tensor] | None = None
) -> tuple[Tensor, int]:
    """``chol(H^-1)`` at ``u`` (unit scale along non-positive curvature) and that count.

    ``eig``: the Hessian's eigenpairs at ``u`` when the search already has them.
    """
    evals, evecs = eig if eig is not None else torch.linalg.eigh(_hessian(fn, u))
    flat = ~_positive(evals)
    evals, evecs = evals.to(torch.float64), evecs.to(torch.float64)
    evals = torch.where(flat, torch.ones_like(evals), evals)
    cov = (evecs / evals) @ evecs.T
    scale = torch.linalg.cholesky(0.5 * (cov + cov.T))
    return scale.to(u.dtype), int(flat.sum())


def _diagonal_scale(
    fn: Callable[[Tensor], Tensor], u: Tensor, eig: tuple[Tensor, Tensor] | None = None
) -> tuple[Tensor, int]:
    """``H_ii^-1/2`` from Hessian-vector products with random signs (Bekas et al., 2007);
    ``eig`` is accepted for a common signature and unused."""
    x = u.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(fn(x), x, create_graph=True)
    generator = torch.Generator(device="cpu").manual_seed(0)  # a private stream: no global RNG
    diagonal = torch.zeros_like(u)
    for _ in range(NUM_PROBES):
        probe = torch.randint(0, 2, u.shape, generator=generator).to(u) * 2 - 1
        (hvp,) = torch.autograd.grad(grad @ probe, x, retain_graph=True)
        diagonal = diagonal + probe * hvp / NUM_PROBES
    flat = ~(diagonal > 0) | ~torch.isfinite(diagonal)
    return torch.where(flat, torch.ones_like(u), diagonal.rsqrt()), int(flat.sum())


def _modes(
    search: Callable, fn: Callable[[Tensor], Tensor], start: Tensor, max_iter: int, starts: int
) -> tuple[list[_Search], _Search]:
    """Modes found from ``start`` and ``starts - 1`` points scattered around it (the
    converged searches), and the search from ``start`` itself.

    The scatter is ``START_SPREAD`` unconstrained units, drawn from a private generator
    (reproducible; the global random state is not touched).
    """
    generator = torch.Generator(device="cpu").manual_seed(0)
    found = []
    for k in range(starts):
        noise = torch.randn(start.shape, generator=generator, dtype=start.dtype)
        point = start if k == 0 else start + START_SPREAD * noise.to(start.device)
        found.append(search(fn, point, max_iter))
    return [f for f in found if f.converged], found[0]


#: ``(fn, u, eig=None) -> (scale, number of directions without positive curvature)``.
_Curvature = Callable[..., tuple[Tensor, int]]


@dataclass(frozen=True)
class _Laplace:
    mode: Tensor
    scale: Tensor  # lower-triangular (D, D) or diagonal (D,)
    log_mass: float  # log p(mode) + log|det scale| (+ a constant): the Laplace evidence

    def distance(self, point: Tensor) -> float:
        """Mahalanobis distance of ``point`` from the mode."""
        r = (point - self.mode).to(torch.float64)
        s = self.scale.to(torch.float64)
        w = (
            r / s
            if s.dim() == 1
            else torch.linalg.solve_triangular(s, r[:, None], upper=False)[:, 0]
        )
        return float(w.norm())


def _dominant(laplaces: list[_Laplace]) -> tuple[_Laplace | None, str]:
    """The mode holding all but 0.1% of the Laplace mass, or ``None`` and why not.

    Modes within one standard deviation of a higher one are the same mode; each distinct
    mode is weighted by its Laplace evidence ``p(mode) |L|``.
    """
    kept: list[_Laplace] = []
    for lap in sorted(laplaces, key=lambda lap: -lap.log_mass):
        if all(k.distance(lap.mode) > 1 for k in kept):
            kept.append(lap)
    weights = torch.softmax(torch.tensor([k.log_mass for k in kept], dtype=torch.float64), 0)
    if len(kept) == 1 or float(weights[0]) >= 1 - 1e-3:
        return kept[0], "one mode"
    shares = ", ".join(f"{float(w):.2f}" for w in weights if w >= 1e-3)
    return None, f"{len(kept)} distinct modes (Laplace mass {shares}): no single Gaussian fits"


def _resolve_form(start: Tensor, form: str, max_iter: int, starts: int) -> str:
    """Check the arguments of `laplace_preconditioner`; return the form, ``"auto"`` resolved."""
    dim = start.numel()
    if start.dim() != 1:
        raise ValueError(f"start must be a vector, got shape {tuple(start.shape)}")
    if form == "auto":
        form = "full" if dim <= FULL_MAX_DIM else "diagonal"
    if form not in ("full", "diagonal"):
        raise ValueError(f"form must be 'auto', 'full' or 'diagonal', got {form!r}")
    check_int("max_iter", max_iter)
    check_int("starts", starts)
    return form


def _curvature_at_start(
    curvature: _Curvature, fn: Callable[[Tensor], Tensor], start: Tensor
) -> tuple[Tensor, str]:
    """The scale from the curvature at ``start`` (mode search off) and the message saying so."""
    scale, flat = curvature(fn, start)
    message = "the mode search is off: the curvature at the start point"
    if flat:
        dim = start.numel()
        message += f"; {flat} of {dim} directions without positive curvature get unit scale"
    return scale, message


def _laplaces(
    curvature: _Curvature, fn: Callable[[Tensor], Tensor], modes: list[_Search]
) -> list[_Laplace]:
    """The Laplace approximation at each mode whose curvature is positive and finite."""
    laplaces = []
    for m in modes:
        scale, flat = curvature(fn, m.point, m.eig)
        if not flat and bool(torch.isfinite(scale).all()):
            log_det = scale.log().sum() if scale.dim() == 1 else scale.diagonal().log().sum()
            value = -_safe_value(fn, m.point)
            laplaces.append(_Laplace(m.point, scale, value + float(log_det)))
    return laplaces


def _searches_found(modes: list[_Search], first: _Search, starts: int) -> str:
    """What the mode searches found, for the record's message."""
    found = f"{len(modes)} of {starts} searches converged" if starts > 1 else first.message
    if starts > 1 and not modes:
        found += f" (from the start point: {first.message})"
    return found


def _identity(start: Tensor, form: str) -> Tensor:
    """The unit scale of ``form``, like ``start``: ones (diagonal) or the identity matrix."""
    return torch.ones_like(start) if form == "diagonal" else torch.eye(start.numel()).to(start)


def laplace_preconditioner(
    neg_log_density: Callable[[Tensor], Tensor],
    start: Tensor,
    *,
    form: str = "auto",
    max_iter: int = 100,
    search: bool = True,
    starts: int = 1,
) -> tuple[Tensor, Tensor, Preconditioning]:
    """Centre and scale of the Laplace approximation of ``exp(-neg_log_density)``.

    Args:
        neg_log_density: ``f(u)``, a scalar for a vector ``u`` (differentiable twice).
        start: where the mode search starts (and the fallback centre).
        form: ``"full"``, ``"diagonal"`` or ``"auto"`` (full up to `FULL_MAX_DIM`).
        max_iter: bound on the search's iterations.
        search: look for the mode (``False``: take the curvature at ``start``).
        starts: search from ``start`` and ``starts - 1`` points scattered around it; the
            result needs one mode with all but 0.1% of the Laplace mass (see `_dominant`).
            The scatter, like the diagonal form's random probes, comes from a private
            generator: results are reproducible and the global random state is untouched.

    Returns:
        ``(centre, scale, record)``: ``scale`` is a lower-triangular ``(D, D)`` matrix or a
        vector ``(D,)`` (diagonal form), ready for `pyroflows.Precondition`.

    Example:
        >>> import torch
        >>> cov = torch.tensor([[4.0, 1.9], [1.9, 1.0]], dtype=torch.float64)
        >>> f = lambda u: 0.5 * (u - 3) @ torch.linalg.solve(cov, u - 3)
        >>> centre, scale, record = laplace_preconditioner(f, torch.zeros(2, dtype=torch.float64))
        >>> centre.round(decimals=6).tolist(), torch.allclose(scale @ scale.T, cov)
        ([3.0, 3.0], True)
        >>> record.centre
        'mode'
    """
    form = _resolve_form(start, form, max_iter, starts)
    began = time.perf_counter()
    curvature = _full_scale if form == "full" else _diagonal_scale

    def record(where: str, iterations: int, message: str) -> Preconditioning:
        """The record of this call, timed from its start."""
        return Preconditioning(form, where, iterations, time.perf_counter() - began, message)

    if not search:
        scale, message = _curvature_at_start(curvature, neg_log_density, start)
        return start.detach(), scale, record("start, mode search off", 0, message)
    modes, first = _modes(
        _newton if form == "full" else _lbfgs, neg_log_density, start, max_iter, starts
    )
    iterations = sum(m.iterations for m in modes) if modes else first.iterations
    laplaces = _laplaces(curvature, neg_log_density, modes)
    dominant, note = _dominant(laplaces) if laplaces else (None, first.message)
    found = _searches_found(modes, first, starts)
    if dominant is None:  # no curvature to trust: the unpreconditioned guide
        why = note if laplaces else "a funnel? a flat direction?"
        message = f"{found}; kept the start point and L = I ({why})"
        return start.detach(), _identity(start, form), record("start", iterations, message)
    return dominant.mode, dominant.scale.detach(), record("mode", iterations, f"{found}; {note}")
