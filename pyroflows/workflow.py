"""Bayesian workflow for guides: ArviZ export and importance-sampling trust diagnostics.

`to_inference_data` turns any Pyro guide (an `AutoFlow`, any Pyro autoguide, or a hand-written
guide) into an ArviZ ``InferenceData``; `diagnose` scores the guide's draws against the model
with Pareto-smoothed importance sampling (PSIS, Vehtari et al. 2015; Yao et al. 2018) and says
whether the approximation can be trusted.

Both draw ``num_samples`` independent samples ``z ~ q`` from the guide, replay the model on
them, and record, per draw: the latent values on the constrained scale (and any
``pyro.deterministic`` sites), the log joint ``log p(x, z)``, the guide's ``log q(z)``, the
pointwise log-likelihood of every observed site and, optionally, a posterior-predictive draw.
By default the draws are taken in vectorised chunks under an outer particle plate (the model
must broadcast like it does for ``Trace_ELBO(vectorize_particles=True)``); pass
``parallel=False`` for models that do not.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.distributions import TorchDistribution, constraints
from pyro.infer.autoguide import AutoContinuous
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch import Tensor

from .checks import is_int, is_real

if TYPE_CHECKING:
    from arviz import InferenceData

__all__ = ["Diagnosis", "MassCheck", "diagnose", "to_inference_data", "KHAT_GOOD", "KHAT_OK"]

#: Below this Pareto k-hat the approximation is close to the posterior (Yao et al. 2018).
KHAT_GOOD = 0.5
#: Above this Pareto k-hat neither the guide nor importance sampling from it can be trusted.
KHAT_OK = 0.7

_PARTICLE_PLATE = "_pyroflows_draws"


def _import_arviz():
    """ArviZ, imported on first use (its import announces a refactor with a FutureWarning)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import arviz

    return arviz


# ---------------------------------------------------------------------------------------------
# Drawing from the guide and scoring under the model
# ---------------------------------------------------------------------------------------------


@dataclass
class _SiteInfo:
    """Shape and naming of one site, read from a single (non-vectorised) trace."""

    shape: tuple[int, ...]  # value shape of one draw
    batch_ndim: int  # leading dims of ``shape`` that are batch (not event) dims
    dims: list[str]  # ArviZ dim name of every axis of ``shape``


@dataclass
class _Draws:
    """Per-draw quantities, each with a leading dimension of ``num_samples`` (host tensors)."""

    posterior: dict[str, Tensor]
    log_p: Tensor
    log_q: Tensor
    log_likelihood: dict[str, Tensor]
    predictive: dict[str, Tensor]
    observed: dict[str, Tensor]
    dims: dict[str, list[str]]
    coords: dict[str, np.ndarray]

    @property
    def log_weights(self) -> Tensor:
        return self.log_p - self.log_q

    def take(self, index: Tensor) -> _Draws:
        """The draws at ``index`` (e.g. importance resampling), observed data unchanged."""
        pick = {k: v[index] for k, v in self.posterior.items()}
        return _Draws(
            posterior=pick,
            log_p=self.log_p[index],
            log_q=self.log_q[index],
            log_likelihood={k: v[index] for k, v in self.log_likelihood.items()},
            predictive={k: v[index] for k, v in self.predictive.items()},
            observed=self.observed,
            dims=self.dims,
            coords=self.coords,
        )


def _site_dims(name: str, site: dict, shape: tuple[int, ...], batch_ndim: int, coords) -> list:
    """Name each axis of a site's value: plate axes by the plate's name, others ``name_dim_i``."""
    dims = [f"{name}_dim_{i}" for i in range(len(shape))]
    for frame in site["cond_indep_stack"]:
        if frame.dim is None:
            continue
        axis = batch_ndim + frame.dim
        if 0 <= axis < batch_ndim and shape[axis] == frame.size:
            dims[axis] = frame.name
            coords.setdefault(frame.name, np.arange(frame.size))
    return dims


def _sample_sites(trace):
    """``(name, site)`` of every sample site of a trace, plates' subsample sites excluded."""
    for name, site in trace.nodes.items():
        if site["type"] == "sample" and not site_is_subsample(site):
            yield name, site


def _is_deterministic(site: dict) -> bool:
    return bool(site["infer"].get("_deterministic", False))


def _prototype(model, guide, args, kwargs):
    """One draw, not vectorised: site shapes, names, plate nesting and input checks."""
    with torch.no_grad():
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
            *args, **kwargs
        )
    guided = {name for name, _ in _sample_sites(guide_trace)}
    latent, observed, deterministic = [], [], []
    nesting = 0
    for trace in (guide_trace, model_trace):
        for _, site in _sample_sites(trace):
            dims = [-f.dim for f in site["cond_indep_stack"] if f.dim is not None]
            nesting = max([nesting, len(site["fn"].batch_shape), *dims])
    for name, site in _sample_sites(model_trace):
        if _is_deterministic(site):
            deterministic.append(name)
        elif site["is_observed"]:
            observed.append(name)
        elif not site["infer"].get("is_auxiliary", False):
            latent.append(name)
        for frame in site["cond_indep_stack"]:
            full = frame.full_size if frame.full_size is not None else frame.size
            if frame.dim is not None and site["value"].dim() and frame.size != full:
                raise ValueError(
                    f"site {name!r} is in the subsampled plate {frame.name!r} ({frame.size} of "
                    f"{full}): importance weights and the pointwise log-likelihood need the full "
                    "data set; call without subsampling"
                )
        if isinstance(site["scale"], (int, float)) and site["scale"] != 1.0:
            raise ValueError(
                f"site {name!r} is scaled by {site['scale']}: importance weights need the "
                "unscaled model (remove poutine.scale / annealing)"
            )
    if guided and all(
        isinstance(site["fn"], dist.Delta) or _is_deterministic(site)
        for _, site in _sample_sites(guide_trace)
    ):
        raise ValueError(
            "the guide is a point estimate (only Delta sites, e.g. AutoDelta): it has no "
            "density to weigh against the model; draws and diagnostics need a guide with a "
            "spread (AutoFlow, AutoNormal, AutoMultivariateNormal, ...)"
        )
    unguided = [name for name in latent if name not in guided]
    if unguided:
        raise ValueError(
            f"the guide does not sample the model's latent sites {unguided}: their values would "
            "come from the prior and the importance weights would be wrong"
        )
    if not latent:
        raise ValueError("the model has no latent sample sites to draw")
    coords: dict[str, np.ndarray] = {}
    infos = {}
    for name in latent + deterministic + observed:
        site = model_trace.nodes[name]
        shape = tuple(site["value"].shape)
        if name in deterministic:  # event_dim is the whole value: read plate axes from the right
            batch_ndim = min(len(shape), nesting)
        else:
            batch_ndim = len(shape) - site["fn"].event_dim
        dims = _site_dims(name, site, shape, batch_ndim, coords)
        infos[name] = _SiteInfo(shape, batch_ndim, dims)
    observed_values = {name: model_trace.nodes[name]["value"].detach() for name in observed}
    return latent, deterministic, observed, infos, nesting, observed_values, coords


def _per_draw(value: Tensor, n: int, shape: tuple[int, ...], nesting: int, event_ndim: int):
    """Reshape a vectorised site value (particle dim at ``-(nesting + 1 + event_ndim)``)."""
    batch_ndim = len(shape) - event_ndim
    target = (n,) + (1,) * (nesting - batch_ndim) + shape
    if value.dim() < len(target):
        value = value.reshape((1,) * (len(target) - value.dim()) + tuple(value.shape))
    return torch.broadcast_to(value, target).reshape((n,) + shape)


def _log_prob_per_draw(trace, n: int, nesting: int) -> Tensor:
    """Sum of every sample site's (scaled, masked) log-density, per draw: shape ``(n,)``."""
    total = torch.zeros(n)
    for _, site in _sample_sites(trace):
        lp = site["log_prob"]
        if lp.dim() <= nesting:  # does not depend on the draw
            total = total + lp.sum().cpu()
            continue
        lp = lp.reshape((-1,) + tuple(lp.shape[lp.dim() - nesting :]))
        total = total + torch.broadcast_to(lp, (n,) + lp.shape[1:]).reshape(n, -1).sum(-1).cpu()
    return total


def _vectorised(fn, n: int, nesting: int):
    def wrapped(*args, **kwargs):
        with pyro.plate(_PARTICLE_PLATE, n, dim=-(nesting + 1)):
            return fn(*args, **kwargs)

    return wrapped


def _draw_chunk(model, guide, args, kwargs, n, proto, parallel: bool, predictive: bool):
    """``n`` draws: latent/deterministic values, log p, log q, pointwise log-lik, predictive."""
    latent, deterministic, observed, infos, nesting, _, _ = proto
    if not parallel:
        parts = [
            _draw_chunk(model, guide, args, kwargs, 1, proto, True, predictive) for _ in range(n)
        ]
        return {
            key: (
                {k: torch.cat([p[key][k] for p in parts]) for k in parts[0][key]}
                if isinstance(parts[0][key], dict)
                else torch.cat([p[key] for p in parts])
            )
            for key in parts[0]
        }
    with torch.no_grad():
        guide_trace = poutine.trace(_vectorised(guide, n, nesting)).get_trace(*args, **kwargs)
        model_trace = poutine.trace(
            poutine.replay(_vectorised(model, n, nesting), trace=guide_trace)
        ).get_trace(*args, **kwargs)
        guide_trace.compute_log_prob()
        model_trace.compute_log_prob()
        out: dict[str, Any] = {
            "log_p": _log_prob_per_draw(model_trace, n, nesting),
            "log_q": _log_prob_per_draw(guide_trace, n, nesting),
            "posterior": {},
            "log_likelihood": {},
            "predictive": {},
        }
        for name in latent + deterministic:
            site, info = model_trace.nodes[name], infos[name]
            if name in deterministic:  # extra dims right of the plates are event dims
                event_ndim = min(max(0, site["value"].dim() - nesting - 1), len(info.shape))
            else:
                event_ndim = len(info.shape) - info.batch_ndim
            out["posterior"][name] = _per_draw(
                site["value"], n, info.shape, nesting, event_ndim
            ).cpu()
        for name in observed:
            site, info = model_trace.nodes[name], infos[name]
            lp = site["fn"].log_prob(site["value"])
            lp_shape = info.shape[: info.batch_ndim]
            out["log_likelihood"][name] = _per_draw(lp, n, lp_shape, nesting, 0).cpu()
        if predictive:
            # one replicate per draw: each observed site redrawn from its distribution given
            # the draw's latent values (and the observed values of sites before it)
            for name in observed:
                site, info = model_trace.nodes[name], infos[name]
                event_ndim = len(info.shape) - info.batch_ndim
                try:
                    replicate = site["fn"].sample()
                except NotImplementedError:  # e.g. an observed ImproperUniform: no replicate
                    continue
                out["predictive"][name] = _per_draw(
                    replicate, n, info.shape, nesting, event_ndim
                ).cpu()
    return out


def _draw(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    num_samples: int,
    *,
    parallel: bool = True,
    chunk_size: int = 1000,
    predictive: bool = True,
) -> _Draws:
    if not (is_int(num_samples) and num_samples > 0):
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    if not (isinstance(chunk_size, int) and chunk_size > 0):
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    proto = _prototype(model, guide, args, kwargs)
    chunks = []
    for start in range(0, num_samples, chunk_size):
        n = min(chunk_size, num_samples - start)
        try:
            chunks.append(_draw_chunk(model, guide, args, kwargs, n, proto, parallel, predictive))
        except (RuntimeError, ValueError, IndexError) as error:
            if not parallel:
                raise
            raise ValueError(
                "drawing vectorised samples failed; the model or guide may not broadcast over "
                "an extra batch dimension on the left of its plates (as needed by "
                f"Trace_ELBO(vectorize_particles=True)). Retry with parallel=False. ({error})"
            ) from error
    joined = {
        key: (
            {k: torch.cat([c[key][k] for c in chunks]) for k in chunks[0][key]}
            if isinstance(chunks[0][key], dict)
            else torch.cat([c[key] for c in chunks])
        )
        for key in chunks[0]
    }
    _, _, _, infos, _, observed_values, coords = proto
    dims = {name: info.dims for name, info in infos.items()}
    for name in observed_values:  # log-likelihood has the batch axes only
        dims[f"{name}__loglik"] = infos[name].dims[: infos[name].batch_ndim]
    return _Draws(
        posterior=joined["posterior"],
        log_p=joined["log_p"],
        log_q=joined["log_q"],
        log_likelihood=joined["log_likelihood"],
        predictive=joined["predictive"],
        observed={k: v.cpu() for k, v in observed_values.items()},
        dims=dims,
        coords=coords,
    )


# ---------------------------------------------------------------------------------------------
# ArviZ export
# ---------------------------------------------------------------------------------------------


def _chains(value: Tensor, num_chains: int) -> np.ndarray:
    array = value.detach().to(torch.float64 if value.is_floating_point() else value.dtype)
    array = array.numpy()
    return array.reshape((num_chains, -1) + array.shape[1:])


def _export(draws: _Draws, num_chains: int, attrs: dict[str, Any]) -> InferenceData:
    az = _import_arviz()
    n = draws.log_p.shape[0]
    if not (isinstance(num_chains, int) and num_chains > 0 and n % num_chains == 0):
        raise ValueError(
            f"num_chains must be a positive integer dividing num_samples={n}, got {num_chains!r}"
        )
    weights = draws.log_weights
    sample_stats = {
        "log_importance_weight": _chains(weights, num_chains),
        "log_p": _chains(draws.log_p, num_chains),
        "log_q": _chains(draws.log_q, num_chains),
    }
    dims = {k: v for k, v in draws.dims.items() if not k.endswith("__loglik")}
    log_lik_dims = {
        k[: -len("__loglik")]: v for k, v in draws.dims.items() if k.endswith("__loglik")
    }
    log_likelihood = {k: _chains(v, num_chains) for k, v in draws.log_likelihood.items()}
    groups: dict[str, Any] = {
        "posterior": {k: _chains(v, num_chains) for k, v in draws.posterior.items()},
        "sample_stats": sample_stats,
    }
    if draws.observed:
        groups["observed_data"] = {k: v.numpy() for k, v in draws.observed.items()}
    if draws.predictive:
        groups["posterior_predictive"] = {
            k: _chains(v, num_chains) for k, v in draws.predictive.items()
        }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "More chains than draws" etc.
        data = az.from_dict(coords=dict(draws.coords), dims=dims, attrs=attrs, **groups)
        if log_likelihood:
            # separate dims: an observed site's log-likelihood has only its batch axes
            loglik = az.from_dict(
                log_likelihood=log_likelihood, coords=dict(draws.coords), dims=log_lik_dims
            )
            data.extend(loglik)
    return data


def to_inference_data(
    model: Callable,
    guide: Callable,
    *args: Any,
    num_samples: int = 4000,
    num_chains: int = 4,
    parallel: bool = True,
    chunk_size: int = 1000,
    posterior_predictive: bool = True,
    **kwargs: Any,
) -> InferenceData:
    """ArviZ ``InferenceData`` from a fitted guide (SVI), like ``az.from_pyro`` for MCMC.

    Draws ``num_samples`` independent samples from ``guide`` with the model's arguments
    ``*args, **kwargs`` and arranges them as ``num_chains`` chains of independent draws.

    Groups: ``posterior`` (every latent site on the constrained scale, and
    ``pyro.deterministic`` sites; plate axes named after the model's plates),
    ``posterior_predictive`` (one replicated data set per draw), ``log_likelihood``
    (pointwise, per observed site, so ``az.loo`` and ``az.waic`` work), ``observed_data``, and
    ``sample_stats`` with ``log_importance_weight = log p(x, z) - log q(z)``, ``log_p`` and
    ``log_q``.

    Args:
        model: the Pyro model the guide was fitted to.
        guide: any guide: `pyroflows.infer.AutoFlow`, a Pyro autoguide, or a function.
        *args: positional arguments of the model (and guide).
        num_samples: total number of draws (a multiple of ``num_chains``).
        num_chains: number of chains to split the independent draws into.
        parallel: draw in vectorised chunks under an outer plate (needs a model that
            broadcasts over an extra left batch dimension); ``False`` draws one at a time.
        chunk_size: draws per vectorised pass (bounds memory).
        posterior_predictive: also draw replicated data: each observed site redrawn from its
            distribution given the draw's latent values (and the data of earlier sites).
        **kwargs: keyword arguments of the model.

    Returns:
        ``arviz.InferenceData``.

    Example:
        >>> import torch, pyro, pyro.distributions as dist
        >>> from pyroflows import to_inference_data
        >>> from pyroflows.infer import AutoFlow
        >>> def model(y):
        ...     mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        ...     with pyro.plate("obs", len(y)):
        ...         pyro.sample("y", dist.Normal(mu, 1.0), obs=y)
        >>> y = torch.randn(20) + 1.0
        >>> guide = AutoFlow(model, model_args=(y,), layers="affine")
        >>> idata = to_inference_data(model, guide, y, num_samples=400)
        >>> idata.posterior["mu"].shape
        (4, 100)
        >>> idata.log_likelihood["y"].dims
        ('chain', 'draw', 'obs')
    """
    draws = _draw(
        model,
        guide,
        args,
        kwargs,
        num_samples,
        parallel=parallel,
        chunk_size=chunk_size,
        predictive=posterior_predictive,
    )
    attrs = {"inference_library": "pyro + pyroflows", "guide": type(guide).__name__}
    return _export(draws, num_chains, attrs)


# ---------------------------------------------------------------------------------------------
# Trust diagnostics
# ---------------------------------------------------------------------------------------------


def _systematic_resample(log_weights: Tensor, num: int, generator: torch.Generator | None):
    """Indices drawn with probability proportional to ``exp(log_weights)`` (systematic)."""
    probs = torch.softmax(log_weights.detach().to("cpu", torch.float64), 0)
    u = torch.rand((), generator=generator, dtype=torch.float64, device="cpu")
    u = (u + torch.arange(num, device="cpu")) / num
    cdf = probs.cumsum(0)
    cdf[-1] = 1.0
    return torch.searchsorted(cdf, u).clamp_(max=len(probs) - 1)


def _verdict(khat: float) -> tuple[str, bool]:
    if math.isnan(khat) or khat == math.inf:
        return "k-hat could not be estimated: the log importance weights are not finite.", False
    if khat < KHAT_GOOD:
        return (
            f"good (k-hat {khat:.2f} < {KHAT_GOOD}): the guide is close to the posterior; its "
            "draws and importance-sampling estimates from them are reliable.",
            True,
        )
    if khat <= KHAT_OK:
        return (
            f"usable (k-hat {khat:.2f} in [{KHAT_GOOD}, {KHAT_OK}]): the guide is off in places; "
            "prefer the PSIS-reweighted draws and check the estimates you care about.",
            True,
        )
    return (
        f"do not trust the approximation (k-hat {khat:.2f} > {KHAT_OK}): the guide misses "
        "important parts of the posterior, and reweighting cannot fix it. Fit longer, use more "
        "particles or a more flexible guide, reparameterise the model, or use MCMC.",
        False,
    )


class _Defensive(TorchDistribution):
    """Half the draws from ``q``, half from ``q`` widened ``factor``-fold about ``center``.

    A defensive importance-sampling proposal (Hesterberg 1995): where ``q`` is too narrow
    the widened half still puts draws, and its density never falls below half of ``q``'s.
    """

    arg_constraints: dict = {}
    support = constraints.real_vector

    def __init__(self, q, center: Tensor, factor: float):
        self.q, self.center, self.factor = q, center, factor
        super().__init__(q.batch_shape, q.event_shape, validate_args=False)

    def sample(self, sample_shape=()) -> Tensor:
        u = self.q.sample(torch.Size(sample_shape))
        widened = torch.rand(u.shape[:-1], device=u.device) < 0.5
        return torch.where(widened[..., None], self.center + self.factor * (u - self.center), u)

    def log_prob(self, value: Tensor) -> Tensor:
        shrunk = self.center + (value - self.center) / self.factor
        narrow = self.q.log_prob(value)
        wide = self.q.log_prob(shrunk) - value.shape[-1] * math.log(self.factor)
        return torch.logaddexp(narrow, wide) - math.log(2.0)


class _Replace(Messenger):
    """Replaces the distribution of one sample site (the guide's packed latent)."""

    def __init__(self, name: str, make: Callable):
        super().__init__()
        self.name, self.make = name, make

    def _pyro_sample(self, msg) -> None:
        if msg["name"] == self.name:
            msg["fn"] = self.make(msg["fn"])


def _log_mean_exp_and_ess(log_w: Tensor) -> tuple[float, float]:
    w = torch.softmax(log_w, 0)
    return float(torch.logsumexp(log_w, 0) - math.log(len(log_w))), float(1.0 / (w**2).sum())


@dataclass
class MassCheck:
    """Does the guide miss posterior mass? A wider proposal's evidence against the guide's.

    The guide's importance-sampling estimate of ``log p(x)`` sees only the posterior mass
    where the guide puts draws. A defensive proposal (half the guide, half the guide widened
    ``factor``-fold about its mean) sees more; if its estimate is clearly larger, the guide
    misses at least ``missing_mass`` of the posterior, whatever k-hat says. Available for
    guides with a packed latent (`AutoFlow`, Pyro's ``AutoContinuous`` guides).

    Attributes:
        factor: widening factor of the defensive half.
        log_evidence: the defensive proposal's estimate of ``log p(x)``.
        gap: ``log_evidence`` minus the guide's own estimate, in nats.
        standard_error: Monte Carlo standard error of ``gap``.
        missing_mass: ``1 - exp(-gap)`` (0 when ``gap`` is not significant): the share of
            posterior mass the guide's own draws do not reach.
        significant: ``gap`` exceeds both 3 standard errors and 0.05 nats.
    """

    factor: float
    log_evidence: float
    gap: float
    standard_error: float
    missing_mass: float
    significant: bool


def _mass_check(model, guide, args, kwargs, num_samples, factor, parallel, chunk_size):
    """Log importance weights of draws from the defensive proposal around ``guide``."""
    with torch.no_grad():
        center = guide.get_posterior(*args, **kwargs).sample((num_samples,)).mean(0)
    site = f"_{guide._pyro_name}_latent"

    def widened_guide(*a, **k):
        with _Replace(site, lambda q: _Defensive(q, center, factor)):
            return guide(*a, **k)

    draws = _draw(
        model,
        widened_guide,
        args,
        kwargs,
        num_samples,
        parallel=parallel,
        chunk_size=chunk_size,
        predictive=False,
    )
    return draws.log_weights.to(torch.float64)


@dataclass
class Diagnosis:
    """Result of `diagnose`: PSIS statistics of a guide against its model.

    Attributes:
        log_weights: raw log importance weights ``log p(x, z) - log q(z)``, one per draw.
        smoothed_log_weights: Pareto-smoothed, normalised log weights (``logsumexp`` is 0).
        khat: Pareto shape estimate of the weights' right tail (Yao et al. 2018); ``-inf``
            when the largest weights are tied (e.g. constant weights of an exact guide).
        ess: effective sample size of the smoothed weights, ``1 / sum(w_i^2)``.
        verdict: a sentence saying whether the approximation can be trusted.
        trustworthy: ``khat <= 0.7`` (and finite).
        elbo: Monte Carlo ELBO, the mean of the log weights.
        log_evidence: importance-sampling estimate of ``log p(x)`` (log-mean-exp of the raw
            weights); a lower bound in expectation, tight when k-hat is small.
        mass_check: the `MassCheck` (``None`` when it was not run: ``widen=None`` or a guide
            without a packed latent).
    """

    log_weights: Tensor
    smoothed_log_weights: Tensor
    khat: float
    ess: float
    verdict: str
    trustworthy: bool
    elbo: float
    log_evidence: float
    mass_check: MassCheck | None
    _draws: _Draws = field(repr=False)
    _resampled: _Draws = field(repr=False)

    @property
    def num_samples(self) -> int:
        """Number of guide draws the statistics come from."""
        return int(self.log_weights.shape[0])

    @property
    def samples(self) -> dict[str, Tensor]:
        """The guide's own draws (constrained scale), ``(num_samples, *site shape)``."""
        return self._draws.posterior

    @property
    def posterior(self) -> dict[str, Tensor]:
        """PSIS-reweighted posterior: draws resampled in proportion to the smoothed weights.

        Same size as `samples`; duplicates are expected (about ``num_samples / ess`` copies per
        distinct draw).
        """
        return self._resampled.posterior

    def to_inference_data(self, *, reweighted: bool = True, num_chains: int = 4) -> InferenceData:
        """ArviZ export of the PSIS-reweighted draws (or, ``reweighted=False``, the guide's).

        The groups are those of `to_inference_data`; ``sample_stats`` of the reweighted data
        holds the raw log weights of the drawn rows.
        """
        draws = self._resampled if reweighted else self._draws
        attrs = {
            "inference_library": "pyro + pyroflows",
            "psis_khat": self.khat,
            "psis_ess": self.ess,
            "reweighted": int(reweighted),
        }
        return _export(draws, num_chains, attrs)

    def __str__(self) -> str:
        return (
            f"PSIS diagnosis from {self.num_samples} guide draws\n"
            f"  k-hat        {self.khat:.3f}\n"
            f"  ESS          {self.ess:.1f} ({100 * self.ess / self.num_samples:.1f}% of draws)\n"
            f"  ELBO         {self.elbo:.4f}\n"
            f"  log evidence {self.log_evidence:.4f} (importance-sampling estimate)\n"
            + (
                f"  widened x{self.mass_check.factor:g}  log evidence "
                f"{self.mass_check.log_evidence:.4f} (gap {self.mass_check.gap:+.3f} "
                f"+- {self.mass_check.standard_error:.3f} nats)\n"
                if self.mass_check is not None
                else ""
            )
            + f"  verdict      {self.verdict}"
        )


def diagnose(
    model: Callable,
    guide: Callable,
    *args: Any,
    num_samples: int = 4000,
    parallel: bool = True,
    chunk_size: int = 1000,
    seed: int | None = None,
    widen: float | None = 2.0,
    posterior_predictive: bool = False,
    **kwargs: Any,
) -> Diagnosis:
    """Can the guide be trusted? Pareto-smoothed importance sampling of its draws.

    Draws ``num_samples`` samples ``z ~ q`` from ``guide``, computes the log importance
    weights ``log p(x, z) - log q(z)`` under ``model`` (with ``*args, **kwargs``) and smooths
    their right tail with ArviZ's PSIS. The Pareto shape k-hat of that tail measures how far
    the guide is from the posterior (Yao et al. 2018, "Yes, but did it work?"):

    * ``k-hat < 0.5``: good, the guide is close to the posterior;
    * ``0.5 <= k-hat <= 0.7``: usable; the PSIS-reweighted draws improve estimates;
    * ``k-hat > 0.7``: do not trust the approximation.

    k-hat only sees where the guide puts draws: a guide that misses a whole region of the
    posterior (a funnel's mouth, a second mode) can have a small k-hat. For guides with a
    packed latent (`AutoFlow`, Pyro's ``AutoContinuous`` guides) a `MassCheck` therefore
    also estimates ``log p(x)`` with a defensive proposal that widens the guide ``widen``-fold;
    a clearly larger estimate means missing mass, and the verdict says so.

    The estimate of k-hat is itself noisy: use at least a few thousand draws. Works with any
    guide whose draws cover all latent sites of the model: `pyroflows.infer.AutoFlow`, every
    Pyro autoguide with a density (not ``AutoDelta``), hand-written guides.

    Args:
        model: the Pyro model.
        guide: the fitted guide.
        *args: positional arguments of the model.
        num_samples: number of guide draws.
        parallel: vectorised draws (see `to_inference_data`).
        chunk_size: draws per vectorised pass.
        seed: seeds the draws and the resampling (``None`` leaves the RNG as it is).
        widen: widening factor of the mass check's defensive proposal (``None``: no check;
            it costs another ``num_samples`` draws, scored by the guide's ``log_prob``, which
            for IAF-direction flows inverts them).
        posterior_predictive: also draw replicated data, for the export of the reweighted
            posterior (off by default: the diagnostics do not need it).
        **kwargs: keyword arguments of the model.

    Returns:
        a `Diagnosis`; ``print`` it for a summary, ``.to_inference_data()`` exports the
        PSIS-reweighted posterior.

    Example:
        >>> import torch, pyro, pyro.distributions as dist
        >>> from pyro.infer.autoguide import AutoNormal
        >>> from pyroflows import diagnose
        >>> def model(y):
        ...     mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        ...     with pyro.plate("obs", len(y)):
        ...         pyro.sample("y", dist.Normal(mu, 1.0), obs=y)
        >>> y = torch.randn(25)
        >>> guide = AutoNormal(model, init_scale=0.01)  # unfitted and far too narrow
        >>> result = diagnose(model, guide, y, num_samples=2000, seed=0)
        >>> result.trustworthy
        False
    """
    with _seeded(seed):  # a forked RNG: the caller's generators are left as they were
        return _diagnose(
            model, guide, args, kwargs, num_samples, parallel, chunk_size, seed, widen,
            posterior_predictive,
        )  # fmt: skip


@contextlib.contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    """Seed torch's RNG inside a fork of it (CPU and the current CUDA device); ``None``: as is."""
    if seed is None:
        yield
        return
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _diagnose(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict[str, Any],
    num_samples: int,
    parallel: bool,
    chunk_size: int,
    seed: int | None,
    widen: float | None,
    posterior_predictive: bool,
) -> Diagnosis:
    """`diagnose` with its arguments gathered (see there)."""
    if not (is_int(num_samples) and num_samples >= 2):
        raise ValueError(
            f"diagnose needs num_samples >= 2 draws (a few thousand for a reliable k-hat), "
            f"got {num_samples!r}"
        )
    if widen is not None and not (is_real(widen) and widen > 1):
        raise ValueError(f"widen must be a finite number above 1 (or None), got {widen!r}")
    az = _import_arviz()
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    draws = _draw(
        model,
        guide,
        args,
        kwargs,
        num_samples,
        parallel=parallel,
        chunk_size=chunk_size,
        predictive=posterior_predictive,
    )
    log_w = draws.log_weights.to(torch.float64)
    smoothed_t, khat = _psis(az, log_w)
    ess = float(1.0 / torch.exp(2 * smoothed_t).sum())
    log_evidence, raw_ess = _log_mean_exp_and_ess(log_w)
    verdict, trustworthy = _verdict(khat)
    mass, wide_log_w = None, None
    if widen is not None and isinstance(guide, AutoContinuous):
        wide_log_w = _widened_log_weights(
            model, guide, args, kwargs, num_samples, widen, parallel, chunk_size
        )
    if wide_log_w is not None:
        mass = _mass_record(wide_log_w, widen, log_evidence, raw_ess)
        if mass.significant:
            verdict, trustworthy = _missed_mass_verdict(mass, verdict, trustworthy, khat)
    index = _systematic_resample(smoothed_t, num_samples, generator)
    return Diagnosis(
        log_weights=log_w,
        smoothed_log_weights=smoothed_t,
        khat=khat,
        ess=ess,
        verdict=verdict,
        trustworthy=trustworthy,
        elbo=float(log_w.mean()),
        log_evidence=log_evidence,
        mass_check=mass,
        _draws=draws,
        _resampled=draws.take(index),
    )


def _psis(az: Any, log_w: Tensor) -> tuple[Tensor, float]:
    """Pareto-smoothed log weights and k-hat (``-inf`` for tied weights: no tail to fit)."""
    finite = torch.isfinite(log_w)
    if not bool(finite.any()):
        raise ValueError(
            "every log importance weight is -inf, +inf or NaN: the guide's draws have no "
            "support under the model (check constraints and that the guide matches the model)"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # ArviZ warns on k-hat > 0.7 itself
        smoothed, khat = az.psislw(log_w.numpy().copy(), reff=1.0)
    khat = float(np.asarray(khat))
    smoothed_t = torch.as_tensor(np.asarray(smoothed), dtype=torch.float64)
    if not bool(finite.all()):
        khat = math.inf if bool((log_w == math.inf).any()) else khat
    elif khat == math.inf or float(log_w.max() - log_w.min()) < 1e-6:
        # ArviZ gives +inf when fewer than 5 weights exceed its tail cutoff: the largest
        # weights are tied (constant weights: the guide is the posterior, to rounding);
        # there is no heavy tail to fit
        khat = -math.inf
    return smoothed_t, khat


def _mass_record(
    wide_log_w: Tensor, widen: float, log_evidence: float, raw_ess: float
) -> MassCheck:
    """The mass check's numbers: evidence found by the widened proposal against the guide's."""
    wide_evidence, wide_ess = _log_mean_exp_and_ess(wide_log_w)
    gap = wide_evidence - log_evidence
    se = math.sqrt(1.0 / max(raw_ess, 1.0) + 1.0 / max(wide_ess, 1.0))
    significant = gap > max(3 * se, 0.05)
    return MassCheck(
        factor=float(widen),
        log_evidence=wide_evidence,
        gap=gap,
        standard_error=se,
        missing_mass=1.0 - math.exp(-gap) if significant else 0.0,
        significant=significant,
    )


def _missed_mass_verdict(
    mass: MassCheck, verdict: str, trustworthy: bool, khat: float
) -> tuple[str, bool]:
    """The verdict once the mass check found posterior mass the guide's draws miss."""
    missed = (
        f"a proposal {mass.factor:g}x wider than the guide finds {mass.gap:.2f} nats more "
        f"evidence (+- {mass.standard_error:.2f}): the guide's draws miss about "
        f"{100 * mass.missing_mass:.0f}% of the posterior mass"
    )
    if trustworthy:
        return (
            f"do not trust the approximation: {missed} (k-hat {khat:.2f} looks fine "
            "only because it cannot see mass where the guide puts no draws). "
            "Reparameterise the model, start the guide wider (init_scale), fit longer, "
            "or use MCMC."
        ), False
    return f"{verdict} Also, {missed}.", False


def _widened_log_weights(
    model: Callable, guide: Callable, args: tuple, kwargs: dict, num_samples: int,
    widen: float, parallel: bool, chunk_size: int,
) -> Tensor | None:  # fmt: skip
    """`_mass_check`'s log weights, or ``None`` with a warning when the guide cannot score them."""
    try:
        return _mass_check(model, guide, args, kwargs, num_samples, widen, parallel, chunk_size)
    except (RuntimeError, ValueError, NotImplementedError) as error:
        warnings.warn(
            f"mass check skipped: scoring the widened proposal with the guide failed ({error})",
            stacklevel=4,
        )
        return None
