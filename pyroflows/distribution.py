"""Flow distributions: the `Flow` module and the distribution it returns."""

from __future__ import annotations

from collections.abc import Sequence

import pyro.distributions as dist
import torch
from torch import Tensor, nn
from torch.distributions import Distribution, constraints

from .checks import check_int, check_real
from .transforms.base import FlowModule, FlowTransform, check_context, check_event, check_sizes

__all__ = ["DiagNormal", "Flow", "FlowDistribution"]


def _refuse_non_finite(t: Tensor, what: str, validate: bool) -> None:
    """Raise a `ValueError` if ``validate`` and ``t`` holds NaN or Inf.

    The check needs the host; like torch's own validation it is skipped when compiling.
    """
    if validate and not torch.compiler.is_compiling() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{what} NaN or Inf (disable with pyro.enable_validation(False))")


class DiagNormal(nn.Module):
    """Diagonal normal base distribution whose ``loc`` and ``scale`` are buffers.

    Calling it returns ``Normal(loc, scale).to_event(1)`` expanded to a batch shape. Being a
    module, it moves with ``.to(device)`` and ``.double()`` and is saved in ``state_dict``.

    Args:
        input_dim: size ``D`` of the event.
        loc: mean of every coordinate.
        scale: standard deviation of every coordinate.
    """

    def __init__(self, input_dim: int, loc: float = 0.0, scale: float = 1.0):
        super().__init__()
        input_dim = check_int("input_dim", input_dim)
        check_real("scale", scale, positive=True)
        self.register_buffer("loc", torch.full((input_dim,), float(loc)))
        self.register_buffer("scale", torch.full((input_dim,), float(scale)))

    def forward(self, batch_shape: Sequence[int] = ()) -> dist.TorchDistribution:
        """The distribution, with batch shape ``batch_shape`` and event shape ``(D,)``."""
        # Base values are computed by the flow, never given by a user: the flow validates the
        # user's values, so the base skips its own checks (and their host synchronisation).
        normal = dist.Normal(self.loc, self.scale, validate_args=False)
        return dist.Independent(normal, 1, validate_args=False).expand(torch.Size(batch_shape))


class FlowDistribution(dist.TransformedDistribution):
    """A base distribution pushed through flow transforms, scored in one pass.

    A `pyro.distributions.TransformedDistribution` (so Pyro treats it as one) whose
    `log_prob` runs the inverse maps and their log-dets together, and which adds
    `rsample_and_log_prob`. Usually obtained from `Flow.condition`.

    Scoring a fresh sample: the distribution keeps the log-density of its latest
    `rsample` and returns it when `log_prob` is called on that very tensor (the
    same identity test as torch's ``cache_size=1``). This is what lets an IAF-direction guide
    in SVI score its own samples without inverting them. Any other tensor, including data
    scored at every step of a training loop, is recomputed, so there is nothing to clear.

    Precision: a flow whose last transforms are fixed data maps (`Standardize`,
    `SupportMap`, counted by ``num_data_transforms``) accepts float64 values even when it
    computes in float32: `log_prob` runs those maps on the float64 values and casts to the
    flow's dtype only before the learned layers, so data such as ``1.7e9 + 100 * noise`` is
    scored without rounding (the log-density has the flow's dtype). Without data maps the
    values must have the flow's dtype. ``sample(shape, dtype=torch.float64)`` runs the maps
    the other way and returns float64 values. Float32 values in give float32 results.

    Args:
        base_dist: base distribution with event shape ``(D,)``.
        transforms: `FlowTransform`s, applied base to data.
        validate_args: Pyro/torch argument validation (checks values for NaN/Inf).
        num_data_transforms: how many of the last ``transforms`` are fixed data maps that
            compute in float64 (set by `Flow.condition`).
    """

    arg_constraints: dict = {}
    support = constraints.independent(constraints.real, 1)
    has_rsample = True

    def __init__(
        self,
        base_dist: dist.TorchDistribution,
        transforms: Sequence[FlowTransform],
        validate_args: bool | None = None,
        *,
        num_data_transforms: int = 0,
    ):
        for t in transforms:
            if not isinstance(t, FlowTransform):
                raise TypeError(
                    f"FlowDistribution needs FlowTransforms, got {type(t).__name__}; use "
                    "pyro.distributions.TransformedDistribution for other transforms"
                )
        if not 0 <= num_data_transforms <= len(transforms):
            raise ValueError(
                f"num_data_transforms must be in [0, {len(transforms)}], got {num_data_transforms}"
            )
        super().__init__(base_dist, list(transforms), validate_args=validate_args)
        self._last_draw: tuple[Tensor, int, Tensor, bool] | None = None
        self._num_data = num_data_transforms

    def expand(self, batch_shape: Sequence[int], _instance=None) -> FlowDistribution:
        new = self._get_checked_instance(FlowDistribution, _instance)
        new = super().expand(batch_shape, _instance=new)
        new._last_draw = None
        new._num_data = self._num_data
        return new

    @property
    def _dtype(self) -> torch.dtype:
        return self.base_dist.mean.dtype

    def _check_value(self, value: Tensor) -> None:
        if not isinstance(value, Tensor):
            raise ValueError(f"values must be a torch.Tensor, got {type(value).__name__}")
        check_event(value, self.event_shape[0], "values")
        expected = self._dtype
        if value.dtype != expected and not (self._num_data and _wider(value.dtype, expected)):
            raise ValueError(
                f"values have dtype {value.dtype} but the flow computes in {expected}; "
                f"convert the values (e.g. x.to({expected})) or the flow (e.g. flow.double())"
            )
        try:
            torch.broadcast_shapes(value.shape[:-1], self.batch_shape)
        except RuntimeError:
            raise ValueError(
                f"values of batch shape {tuple(value.shape[:-1])} do not broadcast with the "
                f"distribution's batch shape {tuple(self.batch_shape)} (set by the context)"
            ) from None
        _refuse_non_finite(value, "values contain", self._validate_args)

    def log_prob(self, value: Tensor) -> Tensor:
        """Log-density of ``value`` (shape ``sample + batch + (D,)``): one inverse pass."""
        last = self._last_draw
        if (
            last is not None
            and value is last[0]
            and value._version == last[1]  # not modified in place since it was drawn
            and (last[3] or not torch.is_grad_enabled())
        ):
            return last[2]
        self._check_value(value)
        dtype = self._dtype
        shape = torch.broadcast_shapes(value.shape[:-1], self.batch_shape)
        if shape.numel() == 0:  # an empty batch: nothing to score
            return value.new_empty(shape, dtype=dtype)
        learned, maps = self._split()
        z, total = value, None
        for t in reversed(maps):  # on the values as given (float64 data stays float64)
            z, ladj = t.inv_and_ladj(z)
            total = ladj.to(dtype) if total is None else total + ladj.to(dtype)
        z = z.to(dtype)  # the learned layers compute in the flow's dtype
        for t in reversed(learned):
            z, ladj = t.inv_and_ladj(z)
            total = ladj if total is None else total + ladj
        log_prob = self.base_dist.log_prob(z)
        return log_prob if total is None else log_prob + total

    def rsample_and_log_prob(
        self, sample_shape: Sequence[int] = (), *, dtype: torch.dtype | None = None
    ) -> tuple[Tensor, Tensor]:
        """Reparameterised sample and its log-density from one forward pass.

        ``dtype`` (e.g. ``torch.float64``): the dtype of the returned sample; the fixed data
        maps then compute in it, so a float32 flow yields float64 values of full precision.
        The log-density keeps the flow's dtype.
        """
        x, log_prob = self.push_forward(self.base_dist.rsample(torch.Size(sample_shape)), dtype)
        self._last_draw = (x, x._version, log_prob, torch.is_grad_enabled())
        return x, log_prob

    def push_forward(
        self, base_values: Tensor, dtype: torch.dtype | None = None
    ) -> tuple[Tensor, Tensor]:
        """Base values (shape ``(..., D)``) through the transforms, with their log-density.

        One forward pass, differentiable in the values and the parameters; the values' batch
        shape may extend the distribution's on the left. ``dtype`` as in
        `rsample_and_log_prob`.
        """
        _check_sample_dtype(dtype)
        x = base_values
        if not x.numel():  # torch's Independent cannot sum an empty batch
            return x.to(dtype or x.dtype), x.new_empty(x.shape[:-1])
        log_prob = self.base_dist.log_prob(x)
        learned, maps = self._split()
        for t in learned:
            x, ladj = t.call_and_ladj(x)
            log_prob = log_prob - ladj
        x = x.to(dtype or x.dtype)
        for t in maps:
            x, ladj = t.call_and_ladj(x)
            log_prob = log_prob - ladj.to(log_prob.dtype)
        return x, log_prob

    def rsample(
        self, sample_shape: Sequence[int] = (), *, dtype: torch.dtype | None = None
    ) -> Tensor:
        """Reparameterised sample (``dtype`` as in `rsample_and_log_prob`)."""
        return self.rsample_and_log_prob(sample_shape, dtype=dtype)[0]

    def sample(
        self, sample_shape: Sequence[int] = (), *, dtype: torch.dtype | None = None
    ) -> Tensor:
        """Sample without gradients (``dtype`` as in `rsample_and_log_prob`)."""
        _check_sample_dtype(dtype)
        with torch.no_grad():
            x = self.base_dist.sample(torch.Size(sample_shape))
            if not x.numel():
                return x.to(dtype or x.dtype)
            learned, maps = self._split()
            for t in learned:
                x = t._call(x)
            x = x.to(dtype or x.dtype)
            for t in maps:
                x = t._call(x)
        return x

    def _split(self) -> tuple[list[FlowTransform], list[FlowTransform]]:
        """The learned transforms and the trailing fixed data maps, base to data."""
        first_map = len(self.transforms) - self._num_data
        return self.transforms[:first_map], self.transforms[first_map:]


def _check_sample_dtype(dtype: torch.dtype | None) -> None:
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating point dtype, got {dtype!r}")


class Flow(nn.Module):
    """A normalizing flow: flow layers on top of a base distribution.

    ``flow.condition(context)`` (or ``flow(context)``; ``flow()`` when unconditional)
    returns a `FlowDistribution`. With a context batch of shape ``(B, C)`` the
    distribution has batch shape ``(B,)``, so ``sample((n,))`` has shape ``(n, B, D)`` and
    ``log_prob`` accepts values of shape ``(..., B, D)``.

    Layers map base to data (``x = f(z)``): sampling runs them in order, scoring runs their
    inverses in reverse. Everything (layers, base buffers) moves with ``.to()`` /
    ``.double()`` and is saved in ``state_dict``.

    Two optional lists of fixed maps connect the model's internal scale to the user's (see
    `pyroflows.fit`, which fills them from the training data):

    * ``data_transforms``: applied after the layers, base side to data side (e.g.
      `Standardize` then `SupportMap`), so densities are on the user's scale;
    * ``context_transforms``: the same for the context; the flow applies their *inverses* to
      a user's context before the layers see it.

    Args:
        layers: the flow layers, applied base to data.
        input_dim: size ``D`` of the event.
        context_dim: size of the context (0 for an unconditional flow).
        base: a module returning the base distribution for a batch shape (default a
            standard normal `DiagNormal`).
        data_transforms: fixed maps applied after ``layers`` (default none).
        context_transforms: fixed maps from internal to user context (default none).

    Attributes:
        config: the builder call that made this flow (JSON-serialisable), kept in saved
            files for display (`pyroflows.io.describe`); ``None`` for a hand-assembled flow.
            Saving does not need it: each layer describes itself.
        metadata: free-form JSON-serialisable information saved with the model (e.g.
            column names).

    Example:
        >>> import torch
        >>> from pyroflows import flows
        >>> flow = flows.nsf(2, context_dim=3)
        >>> d = flow.condition(torch.randn(5, 3))
        >>> d.sample((4,)).shape, d.log_prob(torch.randn(5, 2)).shape
        (torch.Size([4, 5, 2]), torch.Size([5]))
    """

    def __init__(
        self,
        layers: Sequence[FlowModule],
        input_dim: int,
        context_dim: int = 0,
        base: nn.Module | None = None,
        *,
        data_transforms: Sequence[FlowModule] = (),
        context_transforms: Sequence[FlowModule] = (),
    ):
        super().__init__()
        input_dim, context_dim = check_sizes(input_dim, context_dim)
        self.input_dim, self.context_dim = input_dim, context_dim
        self.layers = nn.ModuleList(_checked(layers, "layer", input_dim, context_dim))
        self.data_transforms = nn.ModuleList(
            _checked(data_transforms, "data transform", input_dim, 0)
        )
        self.context_transforms = nn.ModuleList(
            _checked(context_transforms, "context transform", context_dim, 0)
        )
        if context_transforms and not context_dim:
            raise ValueError("context_transforms given to an unconditional flow")
        if base is not None and not isinstance(base, nn.Module):
            raise TypeError(
                "base must be an nn.Module returning a distribution for a batch shape (e.g. "
                f"pyroflows.DiagNormal), got {type(base).__name__}"
            )
        self.base = DiagNormal(input_dim) if base is None else base
        self.config: dict | None = None
        self.metadata: dict = {}

    def extra_repr(self) -> str:
        return f"input_dim={self.input_dim}, context_dim={self.context_dim}"

    def condition(self, context: Tensor | None = None) -> FlowDistribution:
        """The flow's distribution given ``context`` (shape ``(..., context_dim)``)."""
        check_context(context, self.context_dim, "Flow")
        batch_shape = () if context is None else context.shape[:-1]
        if context is not None:
            expected = self.base.loc.dtype if isinstance(self.base, DiagNormal) else None
            if not torch.is_floating_point(context) or (
                expected
                and context.dtype != expected
                and not (len(self.context_transforms) and _wider(context.dtype, expected))
            ):
                raise ValueError(
                    f"context has dtype {context.dtype}, expected a floating point tensor"
                    + (f" of dtype {expected}" if expected else "")
                )
            _refuse_non_finite(context, "context contains", Distribution._validate_args)
            for t in reversed(self.context_transforms):
                context = t.inv_and_ladj(context)[0]
            if expected is not None:  # a float64 context reaches the layers in their dtype
                context = context.to(expected)
        transforms = [
            layer.condition(context if layer.context_dim else None) for layer in self.layers
        ]
        transforms += [t.condition(None) for t in self.data_transforms]
        base = self.base(batch_shape)
        if base.event_shape != (self.input_dim,):
            raise ValueError(
                f"the base distribution has event shape {tuple(base.event_shape)}, "
                f"expected ({self.input_dim},)"
            )
        return FlowDistribution(base, transforms, num_data_transforms=len(self.data_transforms))

    def forward(self, context: Tensor | None = None) -> FlowDistribution:
        """Same as `condition`."""
        return self.condition(context)


def _wider(dtype: torch.dtype, flow_dtype: torch.dtype) -> bool:
    """Whether ``dtype`` is float64 and ``flow_dtype`` a lower floating precision: such values
    are accepted by a flow with fixed data (context) maps, and cast after those maps."""
    return dtype == torch.float64 and flow_dtype.is_floating_point and flow_dtype != dtype


def _checked(
    modules: Sequence[FlowModule], what: str, input_dim: int, context_dim: int
) -> list[FlowModule]:
    modules = list(modules)
    for i, m in enumerate(modules):
        if not isinstance(m, FlowModule):
            raise TypeError(f"{what} {i} is a {type(m).__name__}, not a FlowModule")
        if m.input_dim != input_dim:
            raise ValueError(f"{what} {i} has input_dim={m.input_dim}, expected {input_dim}")
        if m.context_dim not in (0, context_dim):
            raise ValueError(
                f"{what} {i} has context_dim={m.context_dim}, expected 0 or {context_dim}"
            )
    return modules
