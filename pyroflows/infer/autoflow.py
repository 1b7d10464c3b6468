"""`AutoFlow`: a normalizing-flow autoguide over all continuous latent sites of a Pyro model."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from pyro.distributions.transforms import biject_to
from pyro.infer.autoguide import AutoContinuous
from pyro.infer.autoguide.initialization import init_to_median
from torch import Tensor

from .. import flows
from ..distribution import Flow, FlowDistribution
from ..transforms import ActNorm

__all__ = ["AutoFlow"]


class AutoFlow(AutoContinuous):
    """Flow guide over every continuous latent site of ``model``, for SVI.

    Each latent site is mapped to the real line with ``biject_to(site.support)`` and the
    values are packed into one vector ``u`` of size ``D``. The guide is

    ``z ~ N(0, I)``, ``v = f(z)`` (flow layers in the cheap-sampling IAF direction), then
    ``u = loc + scale * v`` (an `ActNorm` layer),

    with ``loc`` starting at the unconstrained value given by ``init_loc_fn`` and ``scale``
    starting at ``init_scale``, and all flow layers starting as the identity: the fresh guide
    is a narrow Gaussian at the initial point. Samples are scored from the forward pass, so an
    ELBO step never inverts the flow.

    Parameters are created when the model is first traced: pass ``model_args`` /
    ``model_kwargs`` (or call `setup`) to create them at once, so that ``state_dict``
    round trips into a fresh guide and the parameters exist before the first SVI step.

    Args:
        model: a Pyro model.
        layers: ``"spline"`` (rational-quadratic splines) or ``"affine"`` (IAF).
        num_layers: number of autoregressive flow layers.
        hidden_dims: hidden widths of each MADE (default two layers of ``max(32, 2 D)``).
        count_bins: spline bins.
        bound: splines act on ``[-bound, bound]`` (in units of the initial scale).
        init_loc_fn: per-site initialisation (Pyro's ``init_to_*`` functions).
        init_scale: initial standard deviation of the guide in unconstrained space.
        num_quantile_samples: draws used by `median` and `quantiles`.
        model_args: positional arguments of the model, to build the guide now.
        model_kwargs: keyword arguments of the model, to build the guide now.

    Example:
        >>> import torch, pyro, pyro.distributions as dist
        >>> from pyroflows.infer import AutoFlow
        >>> def model(data):
        ...     mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        ...     sigma = pyro.sample("sigma", dist.HalfNormal(5.0))
        ...     with pyro.plate("n", len(data)):
        ...         pyro.sample("x", dist.Normal(mu, sigma), obs=data)
        >>> data = torch.randn(50) + 3
        >>> guide = AutoFlow(model, model_args=(data,))
        >>> optim = pyro.optim.Adam({"lr": 0.01})
        >>> svi = pyro.infer.SVI(model, guide, optim, pyro.infer.Trace_ELBO())
        >>> loss = svi.step(data)
        >>> sorted(guide.median(data))
        ['mu', 'sigma']
    """

    def __init__(
        self,
        model: Callable[..., Any],
        *,
        layers: str = "spline",
        num_layers: int = 3,
        hidden_dims: Sequence[int] | None = None,
        count_bins: int = 8,
        bound: float = 5.0,
        init_loc_fn: Callable = init_to_median,
        init_scale: float = 0.1,
        num_quantile_samples: int = 10_000,
        model_args: Sequence[Any] | None = None,
        model_kwargs: dict[str, Any] | None = None,
    ):
        if layers not in ("spline", "affine"):
            raise ValueError(f"layers must be 'spline' or 'affine', got {layers!r}")
        if not (isinstance(num_layers, int) and num_layers >= 0):
            raise ValueError(f"num_layers must be a non-negative integer, got {num_layers!r}")
        if not (init_scale > 0 and math.isfinite(init_scale)):
            raise ValueError(f"init_scale must be positive, got {init_scale!r}")
        super().__init__(model, init_loc_fn=init_loc_fn)
        self._options = {
            "layers": layers,
            "num_layers": num_layers,
            "hidden_dims": None if hidden_dims is None else tuple(hidden_dims),
            "count_bins": count_bins,
            "bound": bound,
        }
        self._init_scale = float(init_scale)
        self.num_quantile_samples = num_quantile_samples
        self.flow: Flow | None = None
        if model_args is not None or model_kwargs is not None:
            self.setup(*(model_args or ()), **(model_kwargs or {}))

    def setup(self, *args: Any, **kwargs: Any) -> AutoFlow:
        """Trace the model with these arguments and create all parameters. Returns ``self``."""
        self._setup_prototype(*args, **kwargs)
        return self

    def _setup_prototype(self, *args: Any, **kwargs: Any) -> None:
        try:
            super()._setup_prototype(*args, **kwargs)
        except (NotImplementedError, ValueError, RuntimeError) as error:
            self._explain_setup_error(error)
            raise
        init = self._init_loc().detach()
        self.flow = self._build_flow(init)

    def _explain_setup_error(self, error: Exception) -> None:
        trace = getattr(self, "prototype_trace", None)
        if trace is not None:
            discrete = [
                name
                for name, site in trace.iter_stochastic_nodes()
                if site["fn"].support.is_discrete
            ]
            if discrete:
                raise ValueError(
                    f"AutoFlow handles continuous latent sites only, but {discrete} are "
                    "discrete: enumerate them (config_enumerate + TraceEnum_ELBO) or guide them "
                    "separately with AutoGuideList"
                ) from error
        if "no latent variables" in str(error):
            raise ValueError(
                "the model has no latent sample sites: there is nothing for AutoFlow to guide"
            ) from error

    def _build_flow(self, init: Tensor) -> Flow:
        dim = init.numel()
        opts = self._options
        width = max(32, 2 * dim)
        hidden = opts["hidden_dims"] or (width, width)
        if opts["num_layers"] == 0:
            flow = Flow([], dim)
        elif opts["layers"] == "spline":
            flow = flows.nsf(
                dim,
                num_layers=opts["num_layers"],
                hidden_dims=hidden,
                count_bins=opts["count_bins"],
                bound=opts["bound"],
                invert=False,
            )
        else:
            flow = flows.iaf(dim, num_layers=opts["num_layers"], hidden_dims=hidden)
        affine = ActNorm(dim)
        with torch.no_grad():
            affine.loc.copy_(init)
            affine.log_scale.fill_(math.log(self._init_scale))
        flow.layers.append(affine)
        return flow.to(device=init.device, dtype=init.dtype)

    def get_posterior(self, *args: Any, **kwargs: Any) -> FlowDistribution:
        """The guide's distribution over the packed unconstrained latent vector."""
        if self.flow is None:
            raise RuntimeError("AutoFlow is not set up: call guide.setup(*model_args) first")
        return self.flow()

    def _constrained_samples(self, num_samples: int) -> dict[str, Tensor]:
        """Draws of every site, shaped ``(num_samples,) + site shape`` (left of any plate)."""
        with torch.no_grad():
            latent = self.get_posterior().sample((num_samples,))
        out, pos = {}, 0
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            shape = self._unconstrained_shapes[name]
            size = math.prod(shape)
            value = latent[:, pos : pos + size].reshape((num_samples, *shape))
            out[name] = biject_to(site["fn"].support)(value)
            pos += size
        return out

    def sample_posterior(self, num_samples: int, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        """Independent posterior draws of every latent site, on the constrained scale.

        Returns a dict of tensors with a leading dimension ``num_samples``.
        """
        if self.flow is None:
            self.setup(*args, **kwargs)
        return self._constrained_samples(num_samples)

    @torch.no_grad()
    def quantiles(self, quantiles: Sequence[float] | Tensor, *args: Any, **kwargs: Any):
        """Posterior quantiles of each latent site, estimated from draws of the guide.

        Uses ``num_quantile_samples`` draws (Monte Carlo error ~ 1/sqrt of that); quantiles
        are taken on the constrained scale, site by site and element by element.
        """
        if self.flow is None:
            self.setup(*args, **kwargs)
        samples = self._constrained_samples(self.num_quantile_samples)
        q = torch.as_tensor(quantiles, dtype=next(iter(samples.values())).dtype)
        return {name: v.quantile(q.to(v.device), dim=0) for name, v in samples.items()}

    @torch.no_grad()
    def median(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        """Posterior medians of each latent site (Monte Carlo estimate, see `quantiles`)."""
        return {name: v[0] for name, v in self.quantiles([0.5], *args, **kwargs).items()}
