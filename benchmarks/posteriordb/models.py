"""Hand-written Pyro ports of the nine posteriordb posteriors of the accuracy benchmark.

Every port is registered in `POSTERIORS` as a `Posterior`:

* ``prepare(raw)`` turns the ``data.json`` object into float64 tensors (and does the Stan
  program's ``transformed data``);
* ``model(data)`` is the Pyro model. Latent sites keep the Stan parameter names; data use
  ``pyro.plate(..., dim=-1)``, so the model also runs under an outer plate of particles
  (``Trace_ELBO(vectorize_particles=True)``, `pyro.infer.Predictive(parallel=True)`);
* ``log_density(params, data)`` is the Stan ``target`` written directly with torch
  (unnormalised log posterior on the constrained scale), for the port tests;
* ``to_columns(params)`` maps site values with a leading sample dimension,
  ``{name: (S, *site_shape)}``, to the reference's draw columns ``(S, n_columns)`` (computing
  transformed parameters such as the non-centred eight schools' ``theta``), and
  ``from_columns`` is its inverse (reference draws to site values);
* ``init_values(data)`` is a starting point computed from the data (least squares for the
  regressions), the same for every guide: flat (``ImproperUniform``) sites cannot be sampled,
  so Pyro's ``init_to_sample`` / ``init_to_median`` / ``init_to_feasible`` fail on them.

``log_density``, ``to_columns`` and ``from_columns`` broadcast over any leading batch
dimensions. ``load(folder)`` reads a posteriordb folder of this layout.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions import constraints
from torch import Tensor

__all__ = [
    "POSTERIORS",
    "Posterior",
    "load_data",
    "load_reference",
    "matvec",
    "hmm_forward",
    "max_plate_nesting",
    "per_particle",
    "vectorized_log_joint",
]

DTYPE = torch.float64
Params = dict[str, Tensor]
Data = dict[str, Tensor]


@dataclass(frozen=True)
class Posterior:
    """One posteriordb posterior: a Pyro port of its Stan model plus helpers."""

    name: str
    columns: tuple[str, ...]
    prepare: Callable[[dict], Data]
    model: Callable[[Data], None]
    log_density: Callable[[Params, Data], Tensor]
    to_columns: Callable[[Params], Tensor]
    from_columns: Callable[[Tensor], Params]
    init_values: Callable[[Data], Params]
    notes: str = ""

    def site_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes of the latent sites (one draw), read off the column map's inverse."""
        probe = torch.zeros(1, len(self.columns), dtype=DTYPE)
        return {k: tuple(v.shape[1:]) for k, v in self.from_columns(probe).items()}


def load_data(root: Path | str, posterior: Posterior) -> Data:
    """Read ``data.json`` of ``posterior`` under ``root`` and prepare it for the model."""
    with open(Path(root) / posterior.name / "data.json") as f:
        return posterior.prepare(json.load(f))


def load_reference(root: Path | str, posterior: Posterior) -> np.ndarray:
    """Reference draws as an array ``(chains, draws, columns)`` in ``posterior.columns`` order."""
    with open(Path(root) / posterior.name / "reference_draws.json") as f:
        chains = json.load(f)
    names = list(chains[0])
    if tuple(names) != posterior.columns:
        raise ValueError(f"{posterior.name}: reference columns {names} != {posterior.columns}")
    return np.stack([np.column_stack([c[n] for n in names]) for c in chains])


def _t(x) -> Tensor:
    return torch.as_tensor(np.asarray(x, dtype=np.float64), dtype=DTYPE)


def matvec(X: Tensor, b: Tensor) -> Tensor:
    """``X @ b`` for ``X`` of shape ``(N, K)`` and ``b`` of shape ``(..., K)``.

    Returns ``(..., N)``. Under a particle plate ``b`` has batch shape ``(P, 1)`` (its last
    batch dimension is the data plate's slot) and the result is ``(P, N)``.
    """
    if b.dim() == 1:
        return X @ b
    if b.shape[-2] != 1:
        raise ValueError(f"expected a size-1 data-plate slot in b's shape, got {tuple(b.shape)}")
    return b.squeeze(-2) @ X.T


def _normal(x: Tensor, loc, scale) -> Tensor:
    """Stan's ``normal_lpdf`` without the ``-log(sqrt(2 pi))`` constant."""
    return -0.5 * ((x - loc) / scale) ** 2 - torch.log(torch.as_tensor(scale, dtype=DTYPE))


def _cauchy(x: Tensor, loc, scale) -> Tensor:
    return -torch.log1p(((x - loc) / scale) ** 2)


def _student_t(x: Tensor, nu: float, loc: float, scale: float) -> Tensor:
    return -(nu + 1) / 2 * torch.log1p(((x - loc) / scale) ** 2 / nu)


def _ols(
    X: Tensor, y: Tensor, prior_sd: Tensor | float | None = None, prior_mean: Tensor | float = 0.0
) -> tuple[Tensor, Tensor]:
    """Regression coefficients and residual sd, used as initial values.

    Least squares; with ``prior_sd`` (per coefficient, ``inf`` for flat) the posterior mode
    given the least-squares residual sd (ridge regression towards ``prior_mean``), which
    differs from least squares along poorly identified directions (diamonds).
    """
    coef = torch.linalg.lstsq(X, y.unsqueeze(-1)).solution.squeeze(-1)
    s = (y - X @ coef).std()
    if prior_sd is not None:
        prec = torch.as_tensor(prior_sd, dtype=DTYPE).expand(X.shape[-1]) ** -2
        mean = torch.as_tensor(prior_mean, dtype=DTYPE).expand(X.shape[-1])
        A = X.T @ X / s**2 + torch.diag(prec)
        coef = torch.linalg.solve(A, X.T @ y / s**2 + prec * mean)
    return coef, (y - X @ coef).std()


def _split(x: Tensor, sizes: dict[str, int | None]) -> Params:
    """Columns ``(..., n)`` to a dict of sites; ``None`` means a scalar site."""
    out, pos = {}, 0
    for name, size in sizes.items():
        if size is None:
            out[name] = x[..., pos]
            pos += 1
        else:
            out[name] = x[..., pos : pos + size]
            pos += size
    return out


def _join(params: Params, sizes: dict[str, int | None]) -> Tensor:
    """Inverse of `_split`: a dict of sites to columns ``(..., n)``."""
    parts = [params[n].unsqueeze(-1) if size is None else params[n] for n, size in sizes.items()]
    return torch.cat(parts, dim=-1)


def _vector_names(name: str, size: int) -> tuple[str, ...]:
    return tuple(f"{name}[{i + 1}]" for i in range(size))


# --------------------------------------------------------------------------- arK


def _ark_prepare(raw: dict) -> Data:
    K, T = int(raw["K"]), int(raw["T"])
    y = _t(raw["y"])
    # lags[i, k] = y[t - k - 1] for t = K + i (0-based): Stan's y[t - k] for t in K+1..T
    lags = torch.stack([y[K - k - 1 : T - k - 1] for k in range(K)], dim=-1)
    return {"y": y[K:], "lags": lags}


def _ark_model(data: Data) -> None:
    K = data["lags"].shape[-1]
    alpha = pyro.sample("alpha", dist.Normal(_t(0.0), 10.0))
    beta = pyro.sample("beta", dist.Normal(_t(0.0), 10.0).expand([K]).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfCauchy(_t(2.5)))
    with pyro.plate("t", len(data["y"]), dim=-1):
        pyro.sample("y", dist.Normal(alpha + matvec(data["lags"], beta), sigma), obs=data["y"])


def _ark_log_density(p: Params, data: Data) -> Tensor:
    alpha, beta, sigma = p["alpha"], p["beta"], p["sigma"]
    mu = alpha[..., None] + beta @ data["lags"].T
    lp = _normal(alpha, 0, 10) + _normal(beta, 0, 10).sum(-1) + _cauchy(sigma, 0, 2.5)
    return lp + _normal(data["y"], mu, sigma[..., None]).sum(-1)


def _ark_init(data: Data) -> Params:
    X = torch.cat([torch.ones_like(data["y"]).unsqueeze(-1), data["lags"]], dim=-1)
    coef, s = _ols(X, data["y"], prior_sd=10.0)
    return {"alpha": coef[0], "beta": coef[1:], "sigma": s}


_ARK_SIZES = {"alpha": None, "beta": 5, "sigma": None}


# --------------------------------------------------------------------------- bball HMM


def _hmm_prepare(raw: dict) -> Data:
    if int(raw["K"]) != 2:
        raise ValueError("hmm_drive_0 has theta1/theta2 and two prior means: K must be 2")
    return {"u": _t(raw["u"]), "v": _t(raw["v"]), "alpha": _t(raw["alpha"])}


def _logmatmulexp(a: Tensor, b: Tensor) -> Tensor:
    """``log(exp(a) @ exp(b))`` over the last two dimensions, with broadcasting."""
    return torch.logsumexp(a.unsqueeze(-1) + b.unsqueeze(-3), dim=-2)


def hmm_forward(log_trans: Tensor, log_emit: Tensor) -> Tensor:
    """The Stan program's forward algorithm: ``log_sum_exp(gamma[N])``.

    ``log_trans[..., j, k] = log theta[j, k]``, ``log_emit[..., t, k]`` the emission log
    density of step ``t`` in state ``k``; ``gamma[1] = log_emit[1]`` (no initial
    distribution). The chain of ``T - 1`` log-matrix products is reduced pairwise (a tree of
    depth ``log2 T``) instead of step by step; the result is the same.
    """
    if log_emit.shape[-2] == 1:
        return torch.logsumexp(log_emit[..., 0, :], dim=-1) + 0 * log_trans.sum((-2, -1))
    mats = log_trans.unsqueeze(-3) + log_emit[..., 1:, None, :]  # (..., T-1, K, K)
    K = mats.shape[-1]
    eye = torch.full((K, K), -math.inf, dtype=mats.dtype, device=mats.device)
    eye.fill_diagonal_(0.0)
    while mats.shape[-3] > 1:
        if mats.shape[-3] % 2:
            pad = eye.expand(*mats.shape[:-3], 1, K, K)
            mats = torch.cat([mats, pad], dim=-3)
        mats = _logmatmulexp(mats[..., 0::2, :, :], mats[..., 1::2, :, :])
    total = mats[..., 0, :, :]
    return torch.logsumexp(log_emit[..., 0, :, None] + total, dim=(-2, -1))


def _hmm_terms(theta1: Tensor, theta2: Tensor, phi: Tensor, lam: Tensor, data: Data) -> Tensor:
    log_trans = torch.log(torch.stack([theta1, theta2], dim=-2))
    u, v = data["u"][:, None], data["v"][:, None]
    log_emit = (
        torch.log(phi).unsqueeze(-2)
        - phi.unsqueeze(-2) * u
        + torch.log(lam).unsqueeze(-2)
        - lam.unsqueeze(-2) * v
    )
    return hmm_forward(log_trans, log_emit)


_HMM_PRIOR_MEANS = (0.0, 3.0)


def _hmm_model(data: Data) -> None:
    alpha = data["alpha"]
    theta1 = pyro.sample("theta1", dist.Dirichlet(alpha[0]))
    theta2 = pyro.sample("theta2", dist.Dirichlet(alpha[1]))
    flat = dist.ImproperUniform(constraints.positive_ordered_vector, (), (2,))
    phi = pyro.sample("phi", flat)
    lam = pyro.sample("lambda", flat)
    prior = dist.Normal(_t(_HMM_PRIOR_MEANS), 1.0)
    # normal priors on the elements of a positive_ordered vector: a factor on the flat site
    pyro.factor("phi_prior", prior.log_prob(phi).sum(-1))
    pyro.factor("lambda_prior", prior.log_prob(lam).sum(-1))
    pyro.factor("forward", _hmm_terms(theta1, theta2, phi, lam, data))


def _dirichlet(x: Tensor, a: Tensor) -> Tensor:
    return ((a - 1) * torch.log(x)).sum(-1)


def _hmm_log_density(p: Params, data: Data) -> Tensor:
    a, means = data["alpha"], _t(_HMM_PRIOR_MEANS)
    lp = _dirichlet(p["theta1"], a[0]) + _dirichlet(p["theta2"], a[1])
    lp = lp + _normal(p["phi"], means, 1.0).sum(-1) + _normal(p["lambda"], means, 1.0).sum(-1)
    # plain step-by-step recursion, as in the Stan program (independent of `hmm_forward`)
    theta = torch.stack([p["theta1"], p["theta2"]], dim=-2)
    phi, lam = p["phi"], p["lambda"]
    u, v = data["u"], data["v"]

    def emit(t: int) -> Tensor:
        return torch.log(phi) - phi * u[t] + torch.log(lam) - lam * v[t]

    gamma = emit(0)
    for t in range(1, len(u)):
        gamma = torch.logsumexp(gamma[..., :, None] + torch.log(theta), dim=-2) + emit(t)
    return lp + torch.logsumexp(gamma, dim=-1)


def _hmm_init(data: Data) -> Params:
    a = data["alpha"]
    rate_u, rate_v = 1 / data["u"].mean(), 1 / data["v"].mean()
    return {
        "theta1": a[0] / a[0].sum(),
        "theta2": a[1] / a[1].sum(),
        "phi": rate_u * _t([0.5, 2.0]),
        "lambda": rate_v * _t([0.5, 2.0]),
    }


_HMM_SIZES = {"theta1": 2, "theta2": 2, "phi": 2, "lambda": 2}


# --------------------------------------------------------------------------- diamonds


def _diamonds_prepare(raw: dict) -> Data:
    X = _t(raw["X"])[:, 1:]  # drop the intercept column
    if int(raw["prior_only"]):
        raise ValueError("prior_only data is not supported")
    return {"Y": _t(raw["Y"]), "Xc": X - X.mean(0)}  # brms centres the predictors


_HALF_T = dist.FoldedDistribution(dist.StudentT(_t(3.0), _t(0.0), _t(10.0)))


def _diamonds_model(data: Data) -> None:
    Kc = data["Xc"].shape[-1]
    b = pyro.sample("b", dist.Normal(_t(0.0), 1.0).expand([Kc]).to_event(1))
    intercept = pyro.sample("Intercept", dist.StudentT(_t(3.0), 8.0, 10.0))
    sigma = pyro.sample("sigma", _HALF_T)
    with pyro.plate("n", len(data["Y"]), dim=-1):
        pyro.sample("Y", dist.Normal(intercept + matvec(data["Xc"], b), sigma), obs=data["Y"])


def _diamonds_log_density(p: Params, data: Data) -> Tensor:
    b, c, s = p["b"], p["Intercept"], p["sigma"]
    lp = _normal(b, 0, 1).sum(-1) + _student_t(c, 3, 8, 10) + _student_t(s, 3, 0, 10)
    mu = c[..., None] + b @ data["Xc"].T
    return lp + _normal(data["Y"], mu, s[..., None]).sum(-1)


def _diamonds_init(data: Data) -> Params:
    X = torch.cat([torch.ones_like(data["Y"]).unsqueeze(-1), data["Xc"]], dim=-1)
    prior_sd = torch.cat([_t([10.0]), torch.ones(X.shape[-1] - 1, dtype=DTYPE)])
    coef, s = _ols(
        X,
        data["Y"],
        prior_sd=prior_sd,
        prior_mean=torch.cat([_t([8.0]), torch.zeros(X.shape[-1] - 1, dtype=DTYPE)]),
    )
    return {"b": coef[1:], "Intercept": coef[0], "sigma": s}


_DIAMONDS_SIZES = {"b": 24, "Intercept": None, "sigma": None}


# --------------------------------------------------------------------------- earnings


def _earn_prepare(raw: dict) -> Data:
    height, male = _t(raw["height"]), _t(raw["male"])
    X = torch.stack([torch.ones_like(height), height, male, height * male], dim=-1)
    return {"log_earn": torch.log(_t(raw["earn"])), "X": X}


def _earn_model(data: Data) -> None:
    # no prior statements in the Stan program: flat priors on beta and on sigma > 0
    beta = pyro.sample("beta", dist.ImproperUniform(constraints.real_vector, (), (4,)))
    sigma = pyro.sample("sigma", dist.ImproperUniform(constraints.positive, (), ()))
    with pyro.plate("n", len(data["log_earn"]), dim=-1):
        pyro.sample("log_earn", dist.Normal(matvec(data["X"], beta), sigma), obs=data["log_earn"])


def _earn_log_density(p: Params, data: Data) -> Tensor:
    mu = p["beta"] @ data["X"].T
    return _normal(data["log_earn"], mu, p["sigma"][..., None]).sum(-1)


def _earn_init(data: Data) -> Params:
    coef, s = _ols(data["X"], data["log_earn"])
    return {"beta": coef, "sigma": s}


_EARN_SIZES = {"beta": 4, "sigma": None}


# --------------------------------------------------------------------------- eight schools


def _schools_prepare(raw: dict) -> Data:
    return {"y": _t(raw["y"]), "sigma": _t(raw["sigma"])}


def _schools_noncentered_model(data: Data) -> None:
    J = len(data["y"])
    mu = pyro.sample("mu", dist.Normal(_t(0.0), 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(_t(5.0)))
    with pyro.plate("school", J, dim=-1):
        theta_trans = pyro.sample("theta_trans", dist.Normal(_t(0.0), 1.0))
        theta = theta_trans * tau + mu  # transformed parameter
        pyro.sample("y", dist.Normal(theta, data["sigma"]), obs=data["y"])


def _schools_centered_model(data: Data) -> None:
    J = len(data["y"])
    mu = pyro.sample("mu", dist.Normal(_t(0.0), 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(_t(5.0)))
    with pyro.plate("school", J, dim=-1):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("y", dist.Normal(theta, data["sigma"]), obs=data["y"])


def _schools_common(theta: Tensor, mu: Tensor, tau: Tensor, data: Data) -> Tensor:
    lp = _cauchy(tau, 0, 5) + _normal(mu, 0, 5)
    return lp + _normal(data["y"], theta, data["sigma"]).sum(-1)


def _schools_noncentered_log_density(p: Params, data: Data) -> Tensor:
    mu, tau, tt = p["mu"], p["tau"], p["theta_trans"]
    theta = tt * tau[..., None] + mu[..., None]
    return _normal(tt, 0, 1).sum(-1) + _schools_common(theta, mu, tau, data)


def _schools_centered_log_density(p: Params, data: Data) -> Tensor:
    mu, tau, theta = p["mu"], p["tau"], p["theta"]
    prior = _normal(theta, mu[..., None], tau[..., None]).sum(-1)
    return prior + _schools_common(theta, mu, tau, data)


def _schools_init(centered: bool) -> Callable[[Data], Params]:
    def init(data: Data) -> Params:
        y = data["y"]
        mu, tau = y.mean(), y.std()
        out = {"mu": mu, "tau": tau}
        if centered:
            out["theta"] = (y + mu) / 2
        else:
            out["theta_trans"] = (y - mu) / (2 * tau)
        return out

    return init


def _schools_to_columns_nc(p: Params) -> Tensor:
    theta = p["theta_trans"] * p["tau"][..., None] + p["mu"][..., None]
    return _join({**p, "theta": theta}, _SCHOOLS_SIZES)


def _schools_from_columns_nc(x: Tensor) -> Params:
    p = _split(x, {"theta": 8, "mu": None, "tau": None})
    theta_trans = (p.pop("theta") - p["mu"][..., None]) / p["tau"][..., None]
    return {"mu": p["mu"], "tau": p["tau"], "theta_trans": theta_trans}


_SCHOOLS_SIZES = {"theta": 8, "mu": None, "tau": None}


# --------------------------------------------------------------------------- kilpisjarvi


def _kilpis_prepare(raw: dict) -> Data:
    keys = ("pmualpha", "psalpha", "pmubeta", "psbeta")
    return {"x": _t(raw["x"]), "y": _t(raw["y"]), **{k: _t(raw[k]) for k in keys}}


def _kilpis_model(data: Data) -> None:
    alpha = pyro.sample("alpha", dist.Normal(data["pmualpha"], data["psalpha"]))
    beta = pyro.sample("beta", dist.Normal(data["pmubeta"], data["psbeta"]))
    sigma = pyro.sample("sigma", dist.ImproperUniform(constraints.positive, (), ()))
    with pyro.plate("n", len(data["y"]), dim=-1):
        pyro.sample("y", dist.Normal(alpha + beta * data["x"], sigma), obs=data["y"])


def _kilpis_log_density(p: Params, data: Data) -> Tensor:
    a, b, s = p["alpha"], p["beta"], p["sigma"]
    lp = _normal(a, data["pmualpha"], data["psalpha"]) + _normal(b, data["pmubeta"], data["psbeta"])
    mu = a[..., None] + b[..., None] * data["x"]
    return lp + _normal(data["y"], mu, s[..., None]).sum(-1)


def _kilpis_init(data: Data) -> Params:
    X = torch.stack([torch.ones_like(data["x"]), data["x"]], dim=-1)
    prior_sd = torch.stack([data["psalpha"], data["psbeta"]])
    prior_mean = torch.stack([data["pmualpha"], data["pmubeta"]])
    coef, s = _ols(X, data["y"], prior_sd=prior_sd, prior_mean=prior_mean)
    return {"alpha": coef[0], "beta": coef[1], "sigma": s}


_KILPIS_SIZES = {"alpha": None, "beta": None, "sigma": None}


# --------------------------------------------------------------------------- Gaussian mixture


def _mix_prepare(raw: dict) -> Data:
    return {"y": _t(raw["y"])}


def _mix_model(data: Data) -> None:
    # ordered[2] mu with normal(0, 2) on each element: a normal density restricted to the
    # ordered region, written as a flat site on the ordered vectors plus a factor
    mu = pyro.sample("mu", dist.ImproperUniform(constraints.ordered_vector, (), (2,)))
    pyro.factor("mu_prior", dist.Normal(_t(0.0), 2.0).log_prob(mu).sum(-1))
    sigma = pyro.sample("sigma", dist.HalfNormal(_t(2.0)).expand([2]).to_event(1))
    theta = pyro.sample("theta", dist.Beta(_t(5.0), _t(5.0)))
    with pyro.plate("n", len(data["y"]), dim=-1):
        weights = torch.stack([theta, 1 - theta], dim=-1)
        mixture = dist.MixtureSameFamily(dist.Categorical(probs=weights), dist.Normal(mu, sigma))
        pyro.sample("y", mixture, obs=data["y"])


def _mix_log_density(p: Params, data: Data) -> Tensor:
    mu, sigma, theta = p["mu"], p["sigma"], p["theta"]
    lp = _normal(mu, 0, 2).sum(-1) + _normal(sigma, 0, 2).sum(-1)
    lp = lp + 4 * torch.log(theta) + 4 * torch.log1p(-theta)
    y = data["y"]
    lp1 = _normal(y, mu[..., :1], sigma[..., :1])
    lp2 = _normal(y, mu[..., 1:], sigma[..., 1:])
    mix = torch.logaddexp(torch.log(theta)[..., None] + lp1, torch.log1p(-theta)[..., None] + lp2)
    return lp + mix.sum(-1)


def _mix_init(data: Data) -> Params:
    y = data["y"]
    lo, hi = y[y < y.median()], y[y >= y.median()]
    return {
        "mu": torch.stack([lo.mean(), hi.mean()]),
        "sigma": torch.stack([lo.std(), hi.std()]),
        "theta": _t(0.5),
    }


_MIX_SIZES = {"mu": 2, "sigma": 2, "theta": None}


# --------------------------------------------------------------------------- sblrc


def _blr_prepare(raw: dict) -> Data:
    return {"X": _t(raw["X"]), "y": _t(raw["y"])}


def _blr_model(data: Data) -> None:
    D = data["X"].shape[-1]
    beta = pyro.sample("beta", dist.Normal(_t(0.0), 10.0).expand([D]).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfNormal(_t(10.0)))
    with pyro.plate("n", len(data["y"]), dim=-1):
        pyro.sample("y", dist.Normal(matvec(data["X"], beta), sigma), obs=data["y"])


def _blr_log_density(p: Params, data: Data) -> Tensor:
    beta, sigma = p["beta"], p["sigma"]
    lp = _normal(beta, 0, 10).sum(-1) + _normal(sigma, 0, 10)
    return lp + _normal(data["y"], beta @ data["X"].T, sigma[..., None]).sum(-1)


def _blr_init(data: Data) -> Params:
    coef, s = _ols(data["X"], data["y"], prior_sd=10.0)
    return {"beta": coef, "sigma": s}


_BLR_SIZES = {"beta": 5, "sigma": None}


# --------------------------------------------------------------------------- vectorised scoring


def max_plate_nesting(model: Callable, *args) -> int:
    """Number of plate dimensions the model uses (one trace)."""
    trace = poutine.trace(model).get_trace(*args)
    dims = [
        -f.dim
        for s in trace.nodes.values()
        if s["type"] == "sample"
        for f in s["cond_indep_stack"]
        if f.vectorized
    ]
    return max(dims, default=0)


def per_particle(log_prob: Tensor, n: int, nesting: int) -> Tensor:
    """Sum a site's ``log_prob`` over everything but an outer particle dim at ``-(nesting+1)``."""
    lp = log_prob.reshape((1,) * (nesting + 1 - log_prob.dim()) + tuple(log_prob.shape))
    if nesting:
        lp = lp.sum(dim=tuple(range(-nesting, 0)))
    return lp.expand(n)


def vectorized_log_joint(post: Posterior, data: Data, params: Params) -> Tensor:
    """Pyro log joint at ``S`` draws ``{name: (S, *site_shape)}`` in one vectorised pass.

    The draws are reshaped to the batch shape an outer ``pyro.plate`` of size ``S`` left of
    the model's plates gives them, and the model runs under that plate. Returns ``(S,)``.
    """
    n = len(next(iter(params.values())))
    one = {k: v[0] for k, v in params.items()}
    proto = poutine.trace(poutine.condition(post.model, data=one)).get_trace(data)
    m = max_plate_nesting(poutine.condition(post.model, data=one), data)
    shaped = {}
    for name, value in params.items():
        fn = proto.nodes[name]["fn"]
        batch, event = tuple(fn.batch_shape), tuple(fn.event_shape)
        shaped[name] = value.reshape((n,) + (1,) * (m - len(batch)) + batch + event)
    with pyro.plate("_particles", n, dim=-(m + 1)):
        trace = poutine.trace(poutine.condition(post.model, data=shaped)).get_trace(data)
    trace.compute_log_prob()
    return sum(
        per_particle(s["log_prob"], n, m) for s in trace.nodes.values() if s["type"] == "sample"
    )


# --------------------------------------------------------------------------- registry


def _columns(sizes: dict[str, int | None]) -> tuple[str, ...]:
    out: list[str] = []
    for name, size in sizes.items():
        out += [name] if size is None else list(_vector_names(name, size))
    return tuple(out)


def _plain(sizes: dict[str, int | None]) -> tuple[Callable, Callable]:
    """Column maps for a posterior whose reference columns are its sampled parameters."""
    return (lambda p: _join(p, sizes)), (lambda x: _split(x, sizes))


def _posterior(name, sizes, prepare, model, log_density, init, maps=None, notes=""):
    to_columns, from_columns = maps or _plain(sizes)
    return Posterior(
        name, _columns(sizes), prepare, model, log_density, to_columns, from_columns, init, notes
    )


_LIST = [
    _posterior(
        "eight_schools-eight_schools_noncentered",
        _SCHOOLS_SIZES,
        _schools_prepare,
        _schools_noncentered_model,
        _schools_noncentered_log_density,
        _schools_init(False),
        (_schools_to_columns_nc, _schools_from_columns_nc),
        "theta = mu + tau * theta_trans is a transformed parameter (the reference's columns)",
    ),
    _posterior(
        "eight_schools-eight_schools_centered",
        _SCHOOLS_SIZES,
        _schools_prepare,
        _schools_centered_model,
        _schools_centered_log_density,
        _schools_init(True),
        notes="funnel; Pyro needs mu and tau sampled before theta",
    ),
    _posterior(
        "kilpisjarvi_mod-kilpisjarvi",
        _KILPIS_SIZES,
        _kilpis_prepare,
        _kilpis_model,
        _kilpis_log_density,
        _kilpis_init,
        notes="flat prior on sigma > 0; uncentred x",
    ),
    _posterior(
        "diamonds-diamonds",
        _DIAMONDS_SIZES,
        _diamonds_prepare,
        _diamonds_model,
        _diamonds_log_density,
        _diamonds_init,
        notes="X's intercept column dropped, others centred; half-Student-t(3, 0, 10) sigma",
    ),
    _posterior(
        "earnings-logearn_interaction",
        _EARN_SIZES,
        _earn_prepare,
        _earn_model,
        _earn_log_density,
        _earn_init,
        notes="flat priors on beta and sigma > 0",
    ),
    _posterior(
        "bball_drive_event_0-hmm_drive_0",
        _HMM_SIZES,
        _hmm_prepare,
        _hmm_model,
        _hmm_log_density,
        _hmm_init,
        notes="simplex rows (Dirichlet), positive_ordered phi/lambda with normal factors, "
        "forward algorithm by pairwise log-matrix products",
    ),
    _posterior(
        "low_dim_gauss_mix-low_dim_gauss_mix",
        _MIX_SIZES,
        _mix_prepare,
        _mix_model,
        _mix_log_density,
        _mix_init,
        notes="ordered mu: flat ordered site + normal(0, 2) factor; log_mix as a mixture",
    ),
    _posterior(
        "arK-arK",
        _ARK_SIZES,
        _ark_prepare,
        _ark_model,
        _ark_log_density,
        _ark_init,
        notes="AR(5): lag matrix built once; half-Cauchy(2.5) sigma",
    ),
    _posterior(
        "sblrc-blr",
        _BLR_SIZES,
        _blr_prepare,
        _blr_model,
        _blr_log_density,
        _blr_init,
        notes="half-normal(10) sigma",
    ),
]

POSTERIORS: dict[str, Posterior] = {p.name: p for p in _LIST}
