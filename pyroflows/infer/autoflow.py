"""`AutoFlow`: a normalizing-flow autoguide over all continuous latent sites of a Pyro model."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.distributions.transforms import biject_to
from pyro.infer.autoguide import AutoContinuous
from pyro.infer.autoguide.initialization import init_to_median
from torch import Tensor

from .. import flows
from ..checks import check_int, check_real
from ..distribution import Flow, FlowDistribution
from ..transforms import Precondition
from .laplace import Preconditioning, laplace_preconditioner

__all__ = ["AutoFlow", "init_to_median_or_zero"]

#: Largest latent dimension whose guide uses the sticking-the-landing estimator by default:
#: its scoring costs about ``D`` forward passes (see `_PathDerivative`).
STL_MAX_DIM = 8
#: Largest ``(D + 1) x draws`` for which the sticking-the-landing estimator scores the guide's
#: own draws through a batched Jacobian rather than by inverting the flow. Measured (SVI steps,
#: affine IAF, one CPU thread): the Jacobian is 1.2-6x faster up to 1,152 rows (D = 8, 128
#: draws; D = 32, 16 draws), the inversion 1.2-2.6x faster from 3,072 (D = 2, 1,024 draws).
JACOBIAN_MAX_ROWS = 2048


def init_to_median_or_zero(site: dict | None = None) -> Tensor | Callable:
    """Pyro init strategy: the prior median, or for a flat prior the unconstrained zero.

    Like Pyro's ``init_to_median``, except that a site whose prior cannot be sampled
    (``dist.ImproperUniform``) starts where its unconstrained value is zero (0 on the real
    line, 1 for a positive site, ...). `AutoFlow` then moves the guide to the mode.
    """
    if site is None:
        return init_to_median_or_zero
    try:
        return init_to_median(site)
    except NotImplementedError:  # the prior has no sampler: an improper (flat) prior
        fn = site["fn"]
        transform = biject_to(fn.support)
        shape = transform.inverse_shape(fn.batch_shape + fn.event_shape)
        value = transform(torch.zeros(shape, dtype=torch.get_default_dtype()))
        value._pyro_custom_init = False
        return value


class AutoFlow(AutoContinuous):
    """Flow guide over every continuous latent site of ``model``, for SVI.

    Each latent site is mapped to the real line with ``biject_to(site.support)`` and the
    values are packed into one vector ``u`` of size ``D``. The guide is

    ``z ~ N(0, I)``, ``v = f(z)`` (flow layers in the cheap-sampling IAF direction), then
    ``u = u0 + L (a + s * v)`` (a `pyroflows.Precondition` layer),

    where ``u0`` and ``L`` come from the Laplace approximation of the posterior: before
    training, the guide looks for the mode of the log joint density of ``u`` (starting from
    ``init_loc_fn``) and takes ``L L^T`` = the inverse Hessian there. The flow then works on
    a posterior whose scales are about one and whose correlations are mostly gone, which is
    what stochastic-gradient VI needs on ill-conditioned posteriors. ``a`` (zero) and ``s``
    (``init_scale``) are learned, and every flow layer starts as the identity: the fresh guide
    is the Laplace approximation. What preconditioning did (form,
    mode or fallback, cost) is in ``guide.preconditioning`` and the guide's ``repr``. Where
    no finite mode exists (a funnel) the guide is the unpreconditioned one: centred at the
    start point, unit ``L``, ``s = 0.1``.

    Building the guide draws from the global torch RNG, as any Pyro autoguide and torch
    module does (the prior draws of the default ``init_loc_fn``, the networks' initial
    weights); nothing global is reseeded, and the mode search uses private generators.

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
        init_loc_fn: per-site initialisation (Pyro's ``init_to_*`` functions): the start of
            the mode search, and the guide's centre when preconditioning is off. The default
            starts flat (improper) sites at their unconstrained zero.
        init_scale: initial scale ``s`` of the guide, in units of the preconditioner (the
            Laplace standard deviations; unconstrained units when preconditioning is off).
            Default: 1 when the centre is a mode (the guide starts as the Laplace
            approximation), else 0.1 (a narrow start at a point that is not a mode).
        precondition: ``"auto"`` (full ``L`` up to ``D = 200``, diagonal above), ``"full"``,
            ``"diagonal"`` or ``"off"`` (``L = I``, centred at ``init_loc_fn``). A model that
            subsamples a plate has a noisy log density: it is not preconditioned.
        mode_iterations: bound on each mode search (``0``: curvature at the start point).
        mode_starts: the search runs from the start point and ``mode_starts - 1`` points
            scattered around it (2 unconstrained units); a mode holding all but 0.1% of the
            modes' Laplace mass is used (an HMM's local modes are passed over), several modes
            of comparable mass leave the guide unpreconditioned.
        stick_the_landing: score the guide's own draws with its parameters stopped (the
            path-derivative gradient of Roeder et al., 2017, whose noise vanishes as the guide
            reaches the posterior). ``None`` (default): on when the guide starts at a mode,
            ``D <= 8`` (`STL_MAX_DIM`) and a step draws at most ``JACOBIAN_MAX_ROWS / (D +
            1)`` particles, where it costs 1.1-1.6x a plain step (see `_PathDerivative`);
            with more particles the plain gradient's noise is already averaged down and the
            estimator would cost an inversion of the flow. ``True``: always (inverting the
            flow for many particles); ``False``: never.
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
        >>> guide.preconditioning.centre
        'mode'
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
        init_loc_fn: Callable = init_to_median_or_zero,
        init_scale: float | None = None,
        precondition: str = "auto",
        mode_iterations: int = 100,
        mode_starts: int = 4,
        stick_the_landing: bool | None = None,
        num_quantile_samples: int = 10_000,
        model_args: Sequence[Any] | None = None,
        model_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if layers not in ("spline", "affine"):
            raise ValueError(f"layers must be 'spline' or 'affine', got {layers!r}")
        num_layers = check_int("num_layers", num_layers, low=0)
        init_scale = check_real("init_scale", init_scale, positive=True, optional=True)
        if precondition not in ("auto", "full", "diagonal", "off"):
            raise ValueError(
                f"precondition must be 'auto', 'full', 'diagonal' or 'off', got {precondition!r}"
            )
        mode_iterations = check_int("mode_iterations", mode_iterations, low=0)
        mode_starts = check_int("mode_starts", mode_starts)
        super().__init__(model, init_loc_fn=init_loc_fn)
        self._options = {
            "layers": layers,
            "num_layers": num_layers,
            "hidden_dims": None if hidden_dims is None else tuple(hidden_dims),
            "count_bins": count_bins,
            "bound": bound,
        }
        self._init_scale = init_scale
        self._precondition = precondition
        self._mode_iterations = mode_iterations
        self._mode_starts = mode_starts
        self._stick_the_landing = stick_the_landing
        self.num_quantile_samples = num_quantile_samples
        self.flow: Flow | None = None
        self.preconditioning: Preconditioning | None = None
        if model_args is not None or model_kwargs is not None:
            self.setup(*(model_args or ()), **(model_kwargs or {}))

    @property
    def stick_the_landing(self) -> bool:
        """Whether ELBO gradients use the path derivative (see the class docstring); by
        default only for steps of at most ``JACOBIAN_MAX_ROWS / (D + 1)`` draws."""
        if self._stick_the_landing is not None:
            return self._stick_the_landing
        if self.flow is None or self.preconditioning.centre != "mode":
            return False  # far from the posterior, the path derivative alone is the noisier
        return self.flow.input_dim <= STL_MAX_DIM

    def extra_repr(self) -> str:
        if self.preconditioning is None:
            return "not set up"
        return f"preconditioning: {self.preconditioning}"

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
        start = self._init_loc().detach()
        self._refuse_dependent_supports(start, args, kwargs)
        with torch.enable_grad():  # the mode search differentiates, even when called lazily
            centre, scale, self.preconditioning = self._preconditioner(start, args, kwargs)
        init_scale = self._init_scale
        if init_scale is None:  # trust the curvature's scale only at a mode
            init_scale = 1.0 if self.preconditioning.centre == "mode" else 0.1
        self.flow = self._build_flow(centre, scale, init_scale)

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

    def _constrained(self, latent: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """Site values of one packed vector ``(D,)`` and ``log|det d values / d latent|``."""
        values, log_det = {}, latent.new_zeros(())
        for site, unconstrained in self._unpack_latent(latent):
            transform = biject_to(site["fn"].support)
            value = transform(unconstrained)
            log_det = log_det + transform.log_abs_det_jacobian(unconstrained, value).sum()
            values[site["name"]] = value
        return values, log_det

    def _model_trace(self, values: dict[str, Tensor], args: tuple, kwargs: dict):
        with poutine.block():  # nothing leaks into an enclosing trace (e.g. SVI's)
            conditioned = poutine.condition(self.model, data=values)
            return poutine.trace(conditioned).get_trace(*args, **kwargs)

    def log_joint(self, latent: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """``log p(data, sites(latent)) + log|det J|`` of one packed unconstrained vector.

        The target density of the guide (up to a constant), the function whose mode and
        curvature precondition it.
        """
        values, log_det = self._constrained(latent)
        return self._model_trace(values, args, kwargs).log_prob_sum() + log_det

    def _refuse_dependent_supports(self, start: Tensor, args: tuple, kwargs: dict) -> None:
        """Raise if a site's support depends on another latent (``b ~ Uniform(0, a)``)."""
        leaf = start.clone().requires_grad_(True)
        values, _ = self._constrained(leaf)
        trace = self._model_trace(values, args, kwargs)
        for name in values:
            bounds = [
                t for t in _constraint_tensors(trace.nodes[name]["fn"].support) if t.requires_grad
            ]
            if (
                bounds
                and torch.autograd.grad(sum(t.sum() for t in bounds), leaf, allow_unused=True)[0]
                is not None
            ):
                raise ValueError(
                    f"the support of latent site {name!r} depends on other latent sites; "
                    "AutoFlow (like Pyro's autoguides) needs fixed supports: reparameterise "
                    "it, e.g. b = a * pyro.sample('b_unit', dist.Uniform(0, 1))"
                )

    def _preconditioner(
        self, start: Tensor, args: tuple, kwargs: dict
    ) -> tuple[Tensor, Tensor, Preconditioning]:
        """Centre and scale of the output layer, and the record of how they were found."""

        def neg_log_joint(latent: Tensor) -> Tensor:
            return -self.log_joint(latent, *args, **kwargs)

        reason = self._unfit_for_preconditioning(neg_log_joint, start, args, kwargs)
        if reason is not None:
            record = Preconditioning("off", "start", 0, 0.0, reason)
            return start, torch.ones_like(start), record

        form = self._precondition
        return laplace_preconditioner(
            neg_log_joint,
            start,
            form=form,
            max_iter=max(1, self._mode_iterations),
            search=self._mode_iterations > 0,
            starts=self._mode_starts,
        )

    def _unfit_for_preconditioning(
        self, neg_log_joint: Callable, start: Tensor, args: tuple, kwargs: dict
    ) -> str | None:
        """Why the log joint cannot be preconditioned on, or ``None`` when it can."""
        if self._precondition == "off":
            return "preconditioning is off"
        trace = self._model_trace(self._constrained(start)[0], args, kwargs)
        if _subsampled(trace):
            return "the model subsamples a plate, so its log density is noisy"
        sites = [site for site in trace.nodes.values() if site["type"] == "sample"]
        if not any(site["is_observed"] for site in sites):
            return "the model shows no observed site (a part of an AutoGuideList?)"
        with torch.no_grad():
            first, second = neg_log_joint(start), neg_log_joint(start)
        if not bool(first == second) and bool(torch.isfinite(first)):
            return "the log density is random at a fixed point (sites hidden from the guide?)"
        return None

    def _build_flow(self, centre: Tensor, scale: Tensor, init_scale: float) -> Flow:
        dim = centre.numel()
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
        flow.layers.append(Precondition(centre, scale, init_scale=init_scale))
        return flow.to(device=centre.device, dtype=centre.dtype)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        if self.flow is None and any(k.startswith(prefix + "flow.") for k in state_dict):
            raise RuntimeError(
                "AutoFlow is not set up, so its parameters do not exist yet: build it with "
                "AutoFlow(model, model_args=(...)) or call guide.setup(*args) before "
                "load_state_dict"
            )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def get_posterior(self, *args: Any, **kwargs: Any) -> dist.TorchDistribution:
        """The guide's distribution over the packed unconstrained latent vector."""
        if self.flow is None:
            raise RuntimeError("AutoFlow is not set up: call guide.setup(*model_args) first")
        posterior = self.flow()
        if self.stick_the_landing and torch.is_grad_enabled():
            return _PathDerivative(posterior, self.flow, always=self._stick_the_landing is True)
        return posterior

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
        q = torch.as_tensor(quantiles, dtype=torch.float64)
        if q.dim() > 1 or not bool(((q >= 0) & (q <= 1)).all()):
            raise ValueError(f"quantiles must be a list of numbers in [0, 1], got {quantiles!r}")
        if self.flow is None:
            self.setup(*args, **kwargs)
        samples = self._constrained_samples(self.num_quantile_samples)
        q = q.to(next(iter(samples.values())).dtype)
        return {name: v.quantile(q.to(v.device), dim=0) for name, v in samples.items()}

    @torch.no_grad()
    def median(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        """Posterior medians of each latent site (Monte Carlo estimate, see `quantiles`)."""
        return {name: v[0] for name, v in self.quantiles([0.5], *args, **kwargs).items()}


class _PathDerivative(dist.TorchDistribution):
    """The flow's distribution, scoring values with the flow's parameters stopped.

    Draws are the flow's reparameterised draws; ``log_prob`` is the same number as the
    flow's, but its gradient reaches the parameters only through the value: the
    sticking-the-landing estimator, ``grad_z log q(z) . dz/dtheta``.

    Its own draws are scored without inverting the flow. `rsample` pushes ``D + 1`` copies
    of the base draws ``eps`` through the flow in one batch: the first ``D`` give the rows of
    the Jacobian ``J = dz/deps``, the last the draws and ``d log q / d eps`` (both by one
    backward pass to ``eps`` alone), so that ``grad_z log q = J^-T d log q / d eps`` is one
    ``D x D`` solve per draw. Any other value, and own draws beyond `JACOBIAN_MAX_ROWS`, are
    scored by inverting the flow with its parameters stopped (``D`` passes per layer), unless
    ``always`` is off: then so many draws get the plain gradient (the flow's own ``log q``).
    """

    arg_constraints: dict = {}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, posterior: FlowDistribution, flow: Flow, *, always: bool = True):
        self._posterior, self._flow, self._always = posterior, flow, always
        self._draw: tuple[Tensor, int, Tensor, Tensor] | None = None  # z, version, log q, score
        self._plain: tuple[Tensor, int, Tensor] | None = None  # z, version, log q (total grad)
        super().__init__(posterior.batch_shape, posterior.event_shape, validate_args=False)

    def expand(self, batch_shape, _instance=None) -> _PathDerivative:
        return _PathDerivative(self._posterior.expand(batch_shape), self._flow, always=self._always)

    def rsample(self, sample_shape: Sequence[int] = ()) -> Tensor:
        if torch.jit.is_tracing() or not torch.is_grad_enabled():
            return self._posterior.rsample(sample_shape)
        eps = self._posterior.base_dist.sample(torch.Size(sample_shape))
        if (eps.shape[-1] + 1) * eps[..., 0].numel() <= JACOBIAN_MAX_ROWS:
            return self._draw_with_score(eps)
        draw, log_q = self._posterior.push_forward(eps)
        if not self._always:  # the plain gradient: the flow's own log q of its draw
            self._plain = (draw, draw._version, log_q)
        return draw  # else log_prob inverts the flow

    def _draw_with_score(self, eps: Tensor) -> Tensor:
        """The draws of base values ``eps``, remembering ``log q`` and ``grad_z log q``."""
        dim = eps.shape[-1]
        copies = eps.expand(dim + 1, *eps.shape).clone().requires_grad_()
        z, log_q = self._posterior.push_forward(copies)
        rows = z[:dim].diagonal(dim1=0, dim2=-1)  # rows[..., i] = z_i of copy i
        (grads,) = torch.autograd.grad(rows.sum() + log_q[dim].sum(), copies, retain_graph=True)
        jacobian = grads[:dim].movedim(0, -2)  # [..., i, j] = dz_i / deps_j
        score = torch.linalg.solve(jacobian.mT, grads[dim].unsqueeze(-1)).squeeze(-1)
        draw = z[dim]
        self._draw = (draw, draw._version, log_q[dim].detach(), score)
        return draw

    def sample(self, sample_shape: Sequence[int] = ()) -> Tensor:
        return self._posterior.sample(sample_shape)

    def log_prob(self, value: Tensor) -> Tensor:
        drawn, plain = self._draw, self._plain
        if plain is not None and value is plain[0] and value._version == plain[1]:
            log_q = plain[2]
        elif drawn is not None and value is drawn[0] and value._version == drawn[1]:
            log_q = drawn[2] + ((value - value.detach()) * drawn[3]).sum(-1)
        elif torch.jit.is_tracing():  # torch.jit cannot swap a module's parameters
            warnings.warn(
                "AutoFlow: under a JIT ELBO the guide's own log q is used (the total "
                "gradient); pass stick_the_landing=False to silence this",
                stacklevel=2,
            )
            return self._posterior.log_prob(value)
        else:
            stopped = {name: p.detach() for name, p in self._flow.named_parameters()}
            log_q = torch.func.functional_call(_Scorer(self._flow), _prefixed(stopped), (value,))
        return log_q.expand(torch.broadcast_shapes(log_q.shape, self.batch_shape))


class _Scorer(torch.nn.Module):
    """``x -> flow().log_prob(x)`` as a module call, so `functional_call` can swap weights."""

    def __init__(self, flow: Flow):
        super().__init__()
        self.flow = flow

    def forward(self, value: Tensor) -> Tensor:
        return self.flow().log_prob(value)


def _prefixed(params: dict[str, Tensor]) -> dict[str, Tensor]:
    return {f"flow.{name}": p for name, p in params.items()}


def _constraint_tensors(constraint: Any) -> Iterator[Tensor]:
    """Tensors inside a (possibly nested) constraint: its bounds."""
    for value in vars(constraint).values():
        if isinstance(value, Tensor):
            yield value
        elif isinstance(value, constraints.Constraint):
            yield from _constraint_tensors(value)


def _subsampled(trace) -> bool:
    """Whether any site of ``trace`` lies in a subsampled plate or is rescaled."""
    for site in trace.nodes.values():
        if site["type"] != "sample":
            continue
        if site["scale"] != 1 or any(
            f.full_size is not None and f.size != f.full_size for f in site["cond_indep_stack"]
        ):
            return True
    return False
