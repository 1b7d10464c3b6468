"""Neural posterior estimation: an amortised posterior ``q(theta | x)`` fitted on simulations.

Simulation-based inference in three calls: draw parameters from the prior and run the
simulator (`simulate`), fit a conditional flow to the pairs (`fit_posterior`), then read the
posterior of any observation off the flow, without retraining::

    theta, x = simulate(prior, simulator, 10_000)
    posterior, history = fit_posterior(theta, x, prior=prior)
    draws = posterior.condition(x_observed).sample((1000,))   # (1000, D)

The posterior is an ordinary conditional `Flow`: it saves and loads with `pyroflows.save` /
`pyroflows.load`, scores with ``posterior.condition(x).log_prob(theta)`` and takes one
observation ``(C,)`` or many ``(N, C)`` at once. A prior with a bounded support (a box, as
`pyro.distributions.Uniform` gives) puts a fixed `SupportMap` on the flow, so the posterior has
exactly no mass outside the prior's support: nothing to reject afterwards. Observations are
standardised inside the model, like any context.

Example:
    >>> import torch, pyro.distributions as dist
    >>> from pyroflows.infer import fit_posterior, simulate
    >>> prior = dist.Uniform(-torch.ones(2), torch.ones(2)).to_event(1)
    >>> simulator = lambda theta: theta + 0.1 * torch.randn_like(theta)
    >>> theta, x = simulate(prior, simulator, 500, seed=0)
    >>> posterior, _ = fit_posterior(theta, x, prior=prior, epochs=2, progress=False)
    >>> draws = posterior.condition(torch.tensor([0.5, 0.9])).sample((100,))
    >>> draws.shape, bool((draws.abs() < 1).all())
    (torch.Size([100, 2]), True)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from torch import Tensor

from .. import flows
from ..checks import check_int
from ..distribution import Flow
from ..training import FitHistory, fit
from ..training.sizing import flow_size

__all__ = ["simulate", "prior_bounds", "posterior_flow", "fit_posterior"]


def simulate(
    prior: dist.Distribution,
    simulator: Callable[[Tensor], Tensor],
    num_simulations: int,
    *,
    seed: int | None = 0,
    batch_size: int = 10_000,
) -> tuple[Tensor, Tensor]:
    """Parameters drawn from ``prior`` and the simulator's outputs for them.

    ``simulator`` maps a batch of parameters ``(B, D)`` to outputs ``(B, C)`` (or ``(B,)``
    for one output); it is called on batches of at most ``batch_size``. With ``seed``, the
    draws (and a simulator that uses torch's generator) are reproducible for the same
    ``batch_size``; the caller's global random state is restored afterwards (``None``: the
    global state is used).

    Returns:
        ``(theta, x)`` of shapes ``(num_simulations, D)`` and ``(num_simulations, C)``.
    """
    check_int("num_simulations", num_simulations)
    check_int("batch_size", batch_size)
    with torch.random.fork_rng(enabled=seed is not None, devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        theta = _as_rows(prior.sample((num_simulations,)), "prior draws")
        x = torch.cat([_simulated(simulator, t) for t in theta.split(batch_size)])
    return theta, x


def _as_rows(t: Tensor, what: str) -> Tensor:
    """``t`` as a ``(N, D)`` table (a ``(N,)`` vector becomes one column)."""
    if t.dim() == 1:
        t = t[:, None]
    if t.dim() != 2:
        raise ValueError(f"{what} must have shape (N, D) or (N,), got {tuple(t.shape)}")
    return t


def _simulated(simulator: Callable[[Tensor], Tensor], theta: Tensor) -> Tensor:
    """The simulator's outputs for one batch, checked to be one row per parameter row."""
    x = simulator(theta)
    if not isinstance(x, Tensor):
        raise TypeError(f"the simulator must return a tensor, got {type(x).__name__}")
    x = _as_rows(x, "simulator outputs")
    if len(x) != len(theta):
        raise ValueError(f"the simulator returned {len(x)} rows for {len(theta)} parameters")
    return x


def prior_bounds(prior: dist.Distribution) -> list[tuple[float | None, float | None]]:
    """The support of each parameter of ``prior`` as ``(low, high)`` pairs for `fit`.

    Real, interval, half-line and box supports are read (``None``: unbounded on that side);
    a prior over a simplex, a correlation matrix or similar is refused, since its support is
    not a product of intervals.

    Example:
        >>> import torch, pyro.distributions as dist
        >>> prior_bounds(dist.Uniform(torch.zeros(2), torch.tensor([1.0, 3.0])).to_event(1))
        [(0.0, 1.0), (0.0, 3.0)]
        >>> prior_bounds(dist.LogNormal(torch.zeros(2), 1.0).to_event(1))
        [(0.0, None), (0.0, None)]
    """
    dim = math.prod(prior.batch_shape + prior.event_shape)  # one parameter per element
    support = prior.support
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    low, high = _interval(support)
    return [(_entry(low, i, dim), _entry(high, i, dim)) for i in range(dim)]


def _interval(support: constraints.Constraint) -> tuple[Any, Any]:
    """Lower and upper bounds of an elementwise support (``None``: unbounded)."""
    if support is constraints.real:
        return None, None
    if isinstance(support, constraints.interval | constraints.half_open_interval):
        return support.lower_bound, support.upper_bound
    if isinstance(support, constraints.greater_than | constraints.greater_than_eq):
        return support.lower_bound, None
    if isinstance(support, constraints.less_than):
        return None, support.upper_bound
    raise ValueError(
        f"the prior's support {support} is not a product of intervals; map the parameters "
        "to the real line first (e.g. with pyro.distributions.transforms.biject_to)"
    )


def _entry(bound: Any, i: int, dim: int) -> float | None:
    """Element ``i`` of a scalar or ``(dim,)`` bound, as a float (``None`` stays ``None``)."""
    if bound is None:
        return None
    bound = torch.as_tensor(bound).expand(dim).reshape(-1)
    return float(bound[i])


def posterior_flow(
    theta_dim: int, x_dim: int, num_simulations: int | None = None, **options: Any
) -> Flow:
    """The default flow for ``q(theta | x)``: a conditional autoregressive neural spline flow.

    With ``num_simulations``, sized for them by `pyroflows.training.sizing.flow_size` (the
    rule `fit` and the command line follow); ``options`` go to `pyroflows.flows.nsf` and
    override it (e.g. ``num_layers``, ``hidden_dims``, ``count_bins``).
    """
    if num_simulations is not None:
        options = flow_size(num_simulations, theta_dim).options() | options
    return flows.nsf(theta_dim, x_dim, **options)


def fit_posterior(
    theta: Any,
    x: Any,
    *,
    prior: dist.Distribution | None = None,
    flow: Flow | None = None,
    seed: int = 0,
    **fit_options: Any,
) -> tuple[Flow, FitHistory]:
    """Fit ``q(theta | x)`` to simulated pairs by maximum likelihood.

    Args:
        theta: parameters, ``(N, D)`` (tensor, array or data frame; ``(N,)``: one column).
        x: the simulator's outputs for them, ``(N, C)`` (or ``(N,)``).
        prior: the prior ``theta`` was drawn from; its support bounds the posterior
            (`prior_bounds`), so no mass falls outside it. Without it the posterior is
            unbounded.
        flow: the conditional flow to train (default `posterior_flow`, sized for the number
            of simulations, its initial weights drawn from ``seed``).
        seed: seeds the default flow's initial weights (a private generator: the caller's
            is untouched) and `fit`'s split and shuffling.
        **fit_options: passed to `pyroflows.fit` (``epochs``, ``batch_size``, ``lr``,
            ``validation``, ``device``, ...); ``bounds`` cannot be given
            together with ``prior``. `fit`'s defaults apply: the batch size and epochs of
            `pyroflows.training.sizing`, with early stopping (20 epochs without validation
            improvement) deciding the rest.

    Returns:
        The trained flow and `fit`'s history.
    """
    if prior is not None:
        if "bounds" in fit_options:
            raise ValueError("give either prior or bounds, not both")
        fit_options["bounds"] = prior_bounds(prior)
    theta_t = _as_rows(torch.as_tensor(_table(theta)), "theta")
    x_t = _as_rows(torch.as_tensor(_table(x)), "x")
    if flow is None:
        with torch.random.fork_rng(devices=[]):  # private: the caller's generator is untouched
            torch.manual_seed(seed)
            flow = posterior_flow(theta_t.shape[1], x_t.shape[1], len(theta_t))
    history = fit(flow, theta_t, context=x_t, seed=seed, **fit_options)
    return flow, history


def _table(data: Any) -> Any:
    """A data frame's values; anything else unchanged (`fit` checks it)."""
    return data.to_numpy() if hasattr(data, "to_numpy") else data
