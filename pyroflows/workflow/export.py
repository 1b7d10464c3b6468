"""ArviZ export: `to_inference_data` and the lazy `import_arviz`.

This module owns the conversion of the workflow's draws into an ArviZ ``InferenceData``: the
groups (``posterior``, ``posterior_predictive``, ``log_likelihood``, ``observed_data``,
``sample_stats``), the split of independent draws into chains, and the dim names and
coordinates read from the model's plates. `diagnose`'s `Diagnosis.to_inference_data` exports
through it too.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from ..checks import check_int
from .draws import _draw, _Draws

if TYPE_CHECKING:
    from arviz import InferenceData

__all__ = ["to_inference_data", "import_arviz"]


def import_arviz() -> ModuleType:
    """ArviZ, imported on first use, without the ``FutureWarning`` its import announces.

    ArviZ is imported when the workflow first needs it, not with `pyroflows`; this helper
    imports it the same way for scripts and tests that use it next to the workflow.

    Example:
        >>> from pyroflows.workflow import import_arviz
        >>> az = import_arviz()
        >>> hasattr(az, "from_dict")
        True
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import arviz

    return arviz


def _chains(value: Tensor, num_chains: int) -> np.ndarray:
    """A host tensor of per-draw values as a ``(num_chains, draws per chain, ...)`` array."""
    array = value.detach().to(torch.float64 if value.is_floating_point() else value.dtype)
    array = array.numpy()
    return array.reshape((num_chains, -1) + array.shape[1:])


def _check_chains(num_chains: int, num_samples: int) -> int:
    """``num_chains`` if it is a positive integer dividing ``num_samples``."""
    num_chains = check_int("num_chains", num_chains)
    if num_samples % num_chains:
        raise ValueError(f"num_chains must divide num_samples={num_samples}, got {num_chains!r}")
    return num_chains


def _export(draws: _Draws, num_chains: int, attrs: dict[str, Any]) -> InferenceData:
    """``InferenceData`` of ``draws`` split into ``num_chains`` chains, with ``attrs``."""
    az = import_arviz()
    num_chains = _check_chains(num_chains, draws.log_p.shape[0])
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
    model: Callable[..., Any],
    guide: Callable[..., Any],
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
    num_samples = check_int("num_samples", num_samples)
    _check_chains(num_chains, num_samples)  # before drawing: fail fast
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
