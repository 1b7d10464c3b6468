"""Drawing from a guide and scoring the draws under the model (internal to the workflow).

This module owns what `to_inference_data` and `diagnose` share: one non-vectorised trace of
the guide and the model read into a `_Prototype` (which sites are latent, deterministic or
observed, their shapes and ArviZ dim names, the plate nesting, and the input checks: no
subsampling, no scaling, a guide with a density that samples every latent site), then
``num_samples`` draws taken in vectorised chunks under an outer particle plate and gathered
into `_Draws`, the per-draw record the export and the diagnostics read.

It holds no randomness of its own: the draws come from the guide's and the model's
distributions, through torch's generator as the caller left it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.poutine.util import site_is_subsample
from torch import Tensor

from ..checks import check_int

if TYPE_CHECKING:
    from pyro.poutine.runtime import Message
    from pyro.poutine.trace_struct import Trace

_PARTICLE_PLATE = "_pyroflows_draws"

_Kind = Literal["latent", "deterministic", "observed", "auxiliary"]


@dataclass
class _SiteInfo:
    """Shape and naming of one site, read from a single (non-vectorised) trace."""

    shape: tuple[int, ...]  # value shape of one draw
    batch_ndim: int  # leading dims of ``shape`` that are batch (not event) dims
    dims: list[str]  # ArviZ dim name of every axis of ``shape``


@dataclass(frozen=True)
class _Prototype:
    """What one non-vectorised draw says about the model: its sites, shapes and plates."""

    latent: list[str]  # latent sample sites (auxiliary sites excluded), in model order
    deterministic: list[str]  # ``pyro.deterministic`` sites
    observed: list[str]  # observed sample sites
    sites: dict[str, _SiteInfo]  # shape and dim names of every site above
    nesting: int  # batch dims used by plates and batch shapes: the particle plate goes left
    observed_values: dict[str, Tensor]  # the data of every observed site
    coords: dict[str, np.ndarray]  # ArviZ coordinates of every plate dim


@dataclass
class _Chunk:
    """Per-draw quantities of some draws, each with a leading draw dimension (host tensors)."""

    posterior: dict[str, Tensor]
    log_p: Tensor
    log_q: Tensor
    log_likelihood: dict[str, Tensor]
    predictive: dict[str, Tensor]

    @staticmethod
    def cat(chunks: Sequence[_Chunk]) -> _Chunk:
        """The chunks' draws one after the other."""

        def cat_dicts(dicts: list[dict[str, Tensor]]) -> dict[str, Tensor]:
            return {k: torch.cat([d[k] for d in dicts]) for k in dicts[0]}

        return _Chunk(
            posterior=cat_dicts([c.posterior for c in chunks]),
            log_p=torch.cat([c.log_p for c in chunks]),
            log_q=torch.cat([c.log_q for c in chunks]),
            log_likelihood=cat_dicts([c.log_likelihood for c in chunks]),
            predictive=cat_dicts([c.predictive for c in chunks]),
        )


@dataclass
class _Draws(_Chunk):
    """All draws (a `_Chunk` of ``num_samples``) with the observed data and ArviZ labels."""

    observed: dict[str, Tensor]
    dims: dict[str, list[str]]
    coords: dict[str, np.ndarray]

    @property
    def log_weights(self) -> Tensor:
        """Log importance weights ``log p(x, z) - log q(z)``, one per draw."""
        return self.log_p - self.log_q

    def take(self, index: Tensor) -> _Draws:
        """The draws at ``index`` (e.g. importance resampling), observed data unchanged."""

        def pick(d: dict[str, Tensor]) -> dict[str, Tensor]:
            return {k: v[index] for k, v in d.items()}

        return dataclasses.replace(
            self,
            posterior=pick(self.posterior),
            log_p=self.log_p[index],
            log_q=self.log_q[index],
            log_likelihood=pick(self.log_likelihood),
            predictive=pick(self.predictive),
        )


# --- one draw, not vectorised: the prototype ---------------------------------------------------


def _sample_sites(trace: Trace) -> Iterator[tuple[str, Message]]:
    """``(name, site)`` of every sample site of a trace, plates' subsample sites excluded."""
    for name, site in trace.nodes.items():
        if site["type"] == "sample" and not site_is_subsample(site):
            yield name, site


def _is_deterministic(site: Message) -> bool:
    return bool(site["infer"].get("_deterministic", False))


def _site_kind(site: Message) -> _Kind:
    """Whether a model's sample site is latent, deterministic, observed or auxiliary."""
    if _is_deterministic(site):
        return "deterministic"
    if site["is_observed"]:
        return "observed"
    if site["infer"].get("is_auxiliary", False):
        return "auxiliary"
    return "latent"


def _check_full_and_unscaled(name: str, site: Message) -> None:
    """Refuse a site in a subsampled plate or under a scale: the weights need the full model."""
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


def _check_guide(guide_trace: Trace, latent: list[str]) -> None:
    """Refuse a point-estimate guide, one that leaves latent sites out, and a model without any."""
    guided = {name for name, _ in _sample_sites(guide_trace)}
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


def _nesting(traces: Sequence[Trace]) -> int:
    """Number of batch dims the traces' plates and batch shapes use."""
    nesting = 0
    for trace in traces:
        for _, site in _sample_sites(trace):
            dims = [-f.dim for f in site["cond_indep_stack"] if f.dim is not None]
            nesting = max([nesting, len(site["fn"].batch_shape), *dims])
    return nesting


def _site_dims(
    name: str,
    site: Message,
    shape: tuple[int, ...],
    batch_ndim: int,
    coords: dict[str, np.ndarray],
) -> list[str]:
    """Name each axis of a site's value: plate axes by the plate's name, others ``name_dim_i``.

    Adds the coordinates of every plate axis named to ``coords``.
    """
    dims = [f"{name}_dim_{i}" for i in range(len(shape))]
    for frame in site["cond_indep_stack"]:
        if frame.dim is None:
            continue
        axis = batch_ndim + frame.dim
        if 0 <= axis < batch_ndim and shape[axis] == frame.size:
            dims[axis] = frame.name
            coords.setdefault(frame.name, np.arange(frame.size))
    return dims


def _site_info(
    name: str, site: Message, kind: _Kind, nesting: int, coords: dict[str, np.ndarray]
) -> _SiteInfo:
    """Shape, batch dims and dim names of one site of the prototype's model trace."""
    shape = tuple(site["value"].shape)
    if kind == "deterministic":  # event_dim is the whole value: read plate axes from the right
        batch_ndim = min(len(shape), nesting)
    else:
        batch_ndim = len(shape) - site["fn"].event_dim
    dims = _site_dims(name, site, shape, batch_ndim, coords)
    return _SiteInfo(shape=shape, batch_ndim=batch_ndim, dims=dims)


def _prototype(
    model: Callable[..., Any],
    guide: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> _Prototype:
    """One draw, not vectorised: site shapes, names, plate nesting and input checks."""
    with torch.no_grad():
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
            *args, **kwargs
        )
    nesting = _nesting([guide_trace, model_trace])
    kinds: dict[str, _Kind] = {}
    for name, site in _sample_sites(model_trace):
        kinds[name] = _site_kind(site)
        _check_full_and_unscaled(name, site)
    latent = [name for name, kind in kinds.items() if kind == "latent"]
    deterministic = [name for name, kind in kinds.items() if kind == "deterministic"]
    observed = [name for name, kind in kinds.items() if kind == "observed"]
    _check_guide(guide_trace, latent)
    coords: dict[str, np.ndarray] = {}
    sites = {
        name: _site_info(name, model_trace.nodes[name], kinds[name], nesting, coords)
        for name in latent + deterministic + observed
    }
    return _Prototype(
        latent=latent,
        deterministic=deterministic,
        observed=observed,
        sites=sites,
        nesting=nesting,
        observed_values={name: model_trace.nodes[name]["value"].detach() for name in observed},
        coords=coords,
    )


# --- vectorised draws ------------------------------------------------------------------------


def _per_draw(
    value: Tensor, n: int, shape: tuple[int, ...], nesting: int, event_ndim: int
) -> Tensor:
    """Reshape a vectorised site value (particle dim at ``-(nesting + 1 + event_ndim)``)."""
    batch_ndim = len(shape) - event_ndim
    target = (n,) + (1,) * (nesting - batch_ndim) + shape
    if value.dim() < len(target):
        value = value.reshape((1,) * (len(target) - value.dim()) + tuple(value.shape))
    return torch.broadcast_to(value, target).reshape((n,) + shape)


def _log_prob_per_draw(trace: Trace, n: int, nesting: int) -> Tensor:
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


def _vectorised(fn: Callable[..., Any], n: int, nesting: int) -> Callable[..., Any]:
    """``fn`` under the particle plate of ``n`` draws, left of its ``nesting`` batch dims."""

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with pyro.plate(_PARTICLE_PLATE, n, dim=-(nesting + 1)):
            return fn(*args, **kwargs)

    return wrapped


def _values(model_trace: Trace, proto: _Prototype, n: int) -> dict[str, Tensor]:
    """Every latent and deterministic site's value, per draw."""
    values = {}
    for name in proto.latent + proto.deterministic:
        site, info = model_trace.nodes[name], proto.sites[name]
        if name in proto.deterministic:  # extra dims right of the plates are event dims
            event_ndim = min(max(0, site["value"].dim() - proto.nesting - 1), len(info.shape))
        else:
            event_ndim = len(info.shape) - info.batch_ndim
        values[name] = _per_draw(site["value"], n, info.shape, proto.nesting, event_ndim).cpu()
    return values


def _log_likelihoods(model_trace: Trace, proto: _Prototype, n: int) -> dict[str, Tensor]:
    """Every observed site's pointwise log-likelihood (its batch axes), per draw."""
    log_likelihood = {}
    for name in proto.observed:
        site, info = model_trace.nodes[name], proto.sites[name]
        lp = site["fn"].log_prob(site["value"])
        lp_shape = info.shape[: info.batch_ndim]
        log_likelihood[name] = _per_draw(lp, n, lp_shape, proto.nesting, 0).cpu()
    return log_likelihood


def _replicates(model_trace: Trace, proto: _Prototype, n: int) -> dict[str, Tensor]:
    """One replicate per draw: each observed site redrawn from its distribution.

    Given the draw's latent values (and the observed values of sites before it).
    """
    predictive = {}
    for name in proto.observed:
        site, info = model_trace.nodes[name], proto.sites[name]
        event_ndim = len(info.shape) - info.batch_ndim
        try:
            replicate = site["fn"].sample()
        except NotImplementedError:  # e.g. an observed ImproperUniform: no replicate
            continue
        predictive[name] = _per_draw(replicate, n, info.shape, proto.nesting, event_ndim).cpu()
    return predictive


def _draw_chunk(
    model: Callable[..., Any],
    guide: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    n: int,
    proto: _Prototype,
    predictive: bool,
) -> _Chunk:
    """``n`` vectorised draws: values, log p, log q, pointwise log-lik and, maybe, replicates."""
    nesting = proto.nesting
    with torch.no_grad():
        guide_trace = poutine.trace(_vectorised(guide, n, nesting)).get_trace(*args, **kwargs)
        model_trace = poutine.trace(
            poutine.replay(_vectorised(model, n, nesting), trace=guide_trace)
        ).get_trace(*args, **kwargs)
        guide_trace.compute_log_prob()
        model_trace.compute_log_prob()
        return _Chunk(
            posterior=_values(model_trace, proto, n),
            log_p=_log_prob_per_draw(model_trace, n, nesting),
            log_q=_log_prob_per_draw(guide_trace, n, nesting),
            log_likelihood=_log_likelihoods(model_trace, proto, n),
            predictive=_replicates(model_trace, proto, n) if predictive else {},
        )


def _draw(
    model: Callable[..., Any],
    guide: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    num_samples: int,
    *,
    parallel: bool = True,
    chunk_size: int = 1000,
    predictive: bool = True,
) -> _Draws:
    """``num_samples`` draws from ``guide`` scored under ``model`` (with ``*args, **kwargs``).

    Vectorised in chunks of ``chunk_size`` draws; ``parallel=False`` takes them one at a time.
    """
    num_samples = check_int("num_samples", num_samples)
    chunk_size = check_int("chunk_size", chunk_size)
    proto = _prototype(model, guide, args, kwargs)
    step = chunk_size if parallel else 1
    chunks = []
    for start in range(0, num_samples, step):
        n = min(step, num_samples - start)
        try:
            chunks.append(_draw_chunk(model, guide, args, kwargs, n, proto, predictive))
        except (RuntimeError, ValueError, IndexError) as error:
            if not parallel:
                raise
            raise ValueError(
                "drawing vectorised samples failed; the model or guide may not broadcast over "
                "an extra batch dimension on the left of its plates (as needed by "
                f"Trace_ELBO(vectorize_particles=True)). Retry with parallel=False. ({error})"
            ) from error
    joined = _Chunk.cat(chunks)
    dims = {name: info.dims for name, info in proto.sites.items()}
    for name in proto.observed:  # log-likelihood has the batch axes only
        dims[f"{name}__loglik"] = proto.sites[name].dims[: proto.sites[name].batch_ndim]
    return _Draws(
        **vars(joined),
        observed={k: v.cpu() for k, v in proto.observed_values.items()},
        dims=dims,
        coords=proto.coords,
    )
