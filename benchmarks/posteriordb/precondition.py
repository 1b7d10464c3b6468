"""Laplace whitening: a posterior reparameterised so that its initial Laplace approximation is
``N(0, I)``, for any guide (the ``+laplace`` guide variants of ``run.py``).

All latent sites are mapped to one unconstrained vector ``u`` (``biject_to(support)``, as
Pyro's autoguides do). At the initial point ``u0`` the Hessian ``H`` of ``-log p`` on that
scale gives ``L = chol(H^-1)``, and the new model has one flat latent vector ``w`` with

``u = u0 + L w``, ``log p(w) = log p(x, T(u)) + log |det dT/du| (+ const)``,

so a guide fitted to ``w`` sees a posterior whose scales are about one and whose linear
correlations are removed at the start: this is the preconditioning that SGD-based VI lacks
on ill-conditioned posteriors (kilpisjarvi, earnings, diamonds). The density over the
original sites is unchanged (the Jacobian is included), so draws of ``w`` map back to
exactly the same reference columns, and importance weights (k-hat) are identical.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pyro
import pyro.distributions as dist
import torch
from models import DTYPE, Data, Params, Posterior, max_plate_nesting, per_particle
from pyro import poutine
from pyro.distributions import constraints
from torch import Tensor
from torch.distributions import biject_to

__all__ = ["laplace_whiten"]


class _Layout:
    """Packing of a posterior's latent sites into one unconstrained vector."""

    def __init__(self, post: Posterior, data: Data, values: Params):
        cond = poutine.condition(post.model, data=values)
        trace = poutine.trace(cond).get_trace(data)
        self.nesting = max_plate_nesting(cond, data)
        self.sites = []
        for name in values:
            fn = trace.nodes[name]["fn"]
            transform = biject_to(fn.support)
            shape = tuple(transform.inv(values[name]).shape)
            self.sites.append((name, transform, shape, tuple(fn.batch_shape)))
        self.dim = sum(math.prod(s[2]) for s in self.sites)

    def pack(self, values: Params, lead: tuple[int, ...]) -> Tensor:
        """Constrained values ``{name: (*lead, *site_shape)}`` to ``u`` of shape ``(*lead, D)``."""
        parts = [t.inv(values[n]).reshape(lead + (-1,)) for n, t, _, _ in self.sites]
        return torch.cat(parts, dim=-1)

    def unpack(self, u: Tensor, plated: bool) -> tuple[Params, Tensor]:
        """``u`` ``(n, D)`` to constrained values and ``log|det dT/du|`` ``(n,)``.

        ``plated``: shape each value as an outer plate of size ``n`` left of the model's
        plates would (for running the model); else ``(n, *site_shape)``.
        """
        n = u.shape[0]
        values, logdet, pos = {}, u.new_zeros(n), 0
        for name, transform, shape, batch in self.sites:
            x = u[:, pos : pos + math.prod(shape)]
            pos += math.prod(shape)
            if plated:
                pad = (1,) * (self.nesting - len(batch))
                x = x.reshape((n,) + pad + batch + shape[len(batch):])
            else:
                x = x.reshape((n,) + shape)
            y = transform(x)
            logdet = logdet + transform.log_abs_det_jacobian(x, y).reshape(n, -1).sum(-1)
            values[name] = y
        return values, logdet


def _log_joint(post: Posterior, data: Data, layout: _Layout, u: Tensor) -> Tensor:
    """``log p(x, T(u)) + log|det dT/du|`` for ``u`` of shape ``(n, D)``: ``(n,)``.

    The values are shaped as a plate of size ``n`` at dim ``-(nesting + 1)`` would shape them
    (the whitened model's particle plate, when there is one); the model runs blocked, so its
    sites stay out of the outer trace and only the sum enters, as one factor.
    """
    n = u.shape[0]
    values, logdet = layout.unpack(u, plated=True)
    with poutine.block():
        trace = poutine.trace(poutine.condition(post.model, data=values)).get_trace(data)
    trace.compute_log_prob()
    lp = sum(
        per_particle(s["log_prob"], n, layout.nesting)
        for s in trace.nodes.values()
        if s["type"] == "sample"
    )
    return lp + logdet


def _find_mode(fn, u0: Tensor, max_iter: int) -> Tensor | None:
    """Damped saddle-free Newton on ``fn`` from ``u0`` (backtracking line search). The
    minimum if it converged there, else None (e.g. a funnel, whose density grows without
    bound towards its neck)."""

    def value(u: Tensor) -> float:
        with pyro.validation_enabled(False):
            v = float(fn(u))
        return v if math.isfinite(v) else math.inf

    u, f = u0.clone(), value(u0)
    for _ in range(max_iter):
        x = u.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(fn(x), x)
        hess = torch.autograd.functional.hessian(fn, u)
        evals, evecs = torch.linalg.eigh(0.5 * (hess + hess.T))
        convex = bool((evals > 0).all())
        # saddle-free Newton: curvature magnitudes, so the step always descends
        evals = evals.abs().clamp(min=1e-8 * float(evals.abs().max()))
        step = -(evecs / evals) @ (evecs.T @ grad)
        if convex and float(-(grad @ step)) < 1e-10:  # Newton decrement: at the mode
            return u
        for _ in range(40):
            f_new = value(u + step)
            if f_new < f:
                break
            step = step / 2
        else:
            return None
        u, f = u + step, f_new
    return None


def laplace_whiten(post: Posterior, data: Data, init: Params | None = None,
                   mode_iter: int = 0) -> Posterior:
    """``post`` reparameterised by its Laplace approximation at ``init`` (default its init).

    With ``mode_iter > 0`` up to that many damped Newton steps first look for the mode from
    ``init``; it replaces ``init`` if they converge there with a positive definite Hessian
    (funnels have no mode: their density grows without bound towards the neck).

    The returned `Posterior` has one latent site ``w`` (``ImproperUniform`` on ``R^D``,
    initial value 0) and the same reference columns. Directions of non-positive curvature
    (the point is not a mode) get unit variance.
    """
    init = post.init_values(data) if init is None else init
    layout = _Layout(post, data, init)
    u0 = layout.pack({k: v.unsqueeze(0) for k, v in init.items()}, (1,))[0].detach()

    def neg_log_joint(u: Tensor) -> Tensor:
        return -_log_joint(post, data, layout, u.unsqueeze(0))[0]

    if mode_iter:
        mode = _find_mode(neg_log_joint, u0, mode_iter)
        if mode is not None:
            h = torch.autograd.functional.hessian(neg_log_joint, mode)
            if bool((torch.linalg.eigvalsh(0.5 * (h + h.T)) > 0).all()):
                u0 = mode
    hessian = torch.autograd.functional.hessian(neg_log_joint, u0)
    evals, evecs = torch.linalg.eigh(0.5 * (hessian + hessian.T))
    evals = torch.where(evals > 0, evals, torch.ones_like(evals))
    cov = (evecs / evals) @ evecs.T
    L = torch.linalg.cholesky(0.5 * (cov + cov.T)).to(DTYPE)
    D = layout.dim

    def u_of_w(w: Tensor) -> Tensor:
        return u0 + w @ L.T

    m = layout.nesting

    def model(data: Data) -> None:
        w = pyro.sample("w", dist.ImproperUniform(constraints.real_vector, (), (D,)))
        lead = tuple(w.shape[:-1])
        lp = _log_joint(post, data, layout, u_of_w(w.reshape(-1, D))).reshape(lead)
        if m:
            # a size-1 plate at the model's outermost plate dim keeps outer plates (particles)
            # left of the original model's plates, which run inside the factor
            with pyro.plate("_nesting", 1, dim=-m):
                pyro.factor("log_joint", lp)
        else:
            pyro.factor("log_joint", lp)

    def sites(p: Params) -> Params:
        w = p["w"]
        values, _ = layout.unpack(u_of_w(w.reshape(-1, D)), plated=False)
        return {k: v.reshape(w.shape[:-1] + v.shape[1:]) for k, v in values.items()}

    def log_density(p: Params, data: Data) -> Tensor:
        w = p["w"]
        values, logdet = layout.unpack(u_of_w(w.reshape(-1, D)), plated=False)
        return (post.log_density(values, data) + logdet).reshape(w.shape[:-1])

    def from_columns(x: Tensor) -> Params:
        values = post.from_columns(x)
        u = layout.pack(values, tuple(x.shape[:-1]))
        w = torch.linalg.solve_triangular(L, (u - u0).unsqueeze(-1), upper=False).squeeze(-1)
        return {"w": w}

    return replace(
        post,
        model=model,
        log_density=log_density,
        to_columns=lambda p: post.to_columns(sites(p)),
        from_columns=from_columns,
        init_values=lambda data: {"w": torch.zeros(D, dtype=DTYPE)},
        notes=f"Laplace-whitened ({D}-D w, u = u0 + L w) version of: {post.notes}",
    )
