"""Base classes shared by every pyroflows layer.

* `FlowTransform` is a light `torch.distributions.Transform` on vectors
  (``event_dim = 1``) with a fused "call and log-det" primitive in both directions.
* `FlowModule` is the learnable layer: a Pyro ``TransformModule`` *and*
  ``ConditionalTransformModule``. ``layer.condition(context)`` returns a light
  `FlowTransform`; used directly (no context) the module is itself that transform, so
  it plugs into `pyro.distributions.TransformedDistribution` unchanged.
* `Inverse` swaps the two directions of any layer and still exposes its parameters.

Direction convention (Pyro's): a transform maps the base side to the data side,
``x = f(z)``. Sampling calls the forward map, scoring calls the inverse.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

import torch
from pyro.distributions import TransformModule
from pyro.distributions.conditional import ConditionalTransformModule
from torch import Tensor, nn
from torch.distributions import Transform, constraints

from ..checks import check_int
from ..transformers import Transformer

__all__ = [
    "FlowTransform",
    "FlowModule",
    "BoundTransform",
    "Structure",
    "ContextFree",
    "Inverse",
    "check_event",
    "check_context",
    "check_sizes",
    "as_rows",
    "parameters_first",
    "parameter_major",
]


def check_event(x: Tensor, input_dim: int, what: str = "input") -> None:
    """Raise a `ValueError` unless ``x`` has shape ``(..., input_dim)``."""
    if x.dim() == 0 or x.shape[-1] != input_dim:
        raise ValueError(f"expected {what} of shape (..., {input_dim}), got shape {tuple(x.shape)}")


def check_context(context: Tensor | None, context_dim: int, owner: str) -> None:
    """Raise a `ValueError` if ``context`` does not suit a layer of ``context_dim``."""
    if context_dim == 0:
        if context is not None:
            raise ValueError(
                f"{owner} is unconditional (context_dim=0) but was given a context of "
                f"shape {tuple(context.shape)}"
            )
        return
    if context is None:
        raise ValueError(
            f"{owner} is conditional and needs a context of shape (..., {context_dim}); "
            "call .condition(context)"
        )
    if not isinstance(context, Tensor):
        raise ValueError(f"context must be a torch.Tensor, got {type(context).__name__}")
    if context.dim() == 0 or context.shape[-1] != context_dim:
        raise ValueError(
            f"{owner} expects a context of shape (..., {context_dim}), "
            f"got shape {tuple(context.shape)}"
        )


def broadcast_context(x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Expand ``x`` and ``context`` to their common batch shape, with a clear error."""
    if context is None:
        return x, None
    try:
        shape = torch.broadcast_shapes(x.shape[:-1], context.shape[:-1])
    except RuntimeError:
        raise ValueError(
            f"the context batch shape {tuple(context.shape[:-1])} does not broadcast with "
            f"the input batch shape {tuple(x.shape[:-1])}"
        ) from None
    return x.expand(shape + x.shape[-1:]), context.expand(shape + context.shape[-1:])


def check_sizes(input_dim: int, context_dim: int) -> tuple[int, int]:
    """``(input_dim, context_dim)`` as ints, checked to be integers ``>= 1`` and ``>= 0``."""
    return check_int("input_dim", input_dim), check_int("context_dim", context_dim, low=0)


def as_rows(
    v: Tensor, context: Tensor | None, input_dim: int
) -> tuple[Tensor, Tensor | None, torch.Size]:
    """Check ``v``, broadcast it with ``context`` and flatten both to rows.

    Returns ``v`` as ``(N, input_dim)``, the context as ``(N, C)`` (or ``None``) and the batch
    shape to restore the results with.
    """
    check_event(v, input_dim)
    v, context = broadcast_context(v, context)
    batch = v.shape[:-1]
    rows = v.reshape(-1, input_dim)
    if context is not None:
        context = context.reshape(-1, context.shape[-1])
    return rows, context, batch


def parameters_first(params: Tensor, features: int, num_params: int) -> Tensor:
    """A conditioner's output as a transformer's parameters: ``(N, P * F)`` -> ``(P, N, F)``.

    The output is parameter-major: output ``p * F + f`` is parameter ``p`` of feature ``f``
    (what `MLP` and `MADE` are read as), so in every row each parameter of the ``F`` features
    is one contiguous block, and the result is a view whose slabs ``[p]`` line up with the
    rows ``(N, F)`` they transform.
    """
    if params.dim() != 2 or params.shape[1] != features * num_params:
        raise ValueError(
            f"the conditioner must return shape (N, {features * num_params}) ({num_params} "
            f"parameters x {features} features), got {tuple(params.shape)}"
        )
    return params.reshape(-1, num_params, features).transpose(0, 1)


def parameter_major(rows: Tensor, features: int, num_params: int) -> Tensor:
    """The rows of a conditioner's output layer (its weight, bias or mask) reordered from the
    feature-major layout of files written before format 3 (row ``f * P + p``) to today's
    parameter-major one (row ``p * F + f``)."""
    shape = rows.shape
    return rows.reshape(features, num_params, *shape[1:]).transpose(0, 1).reshape(shape)


class FlowTransform(Transform):
    """A bijection of vectors (``event_dim = 1``) with fused value-and-log-det calls.

    Subclasses implement `call_and_ladj` and `inv_and_ladj`; the plain
    ``Transform`` methods are derived from them. ``log_abs_det_jacobian(x, y)`` returns the
    log-det of the forward map with the event dimension summed out (shape ``x.shape[:-1]``).
    No value is cached (``cache_size=0``), so repeated calls on the same tensor recompute.
    """

    domain = constraints.independent(constraints.real, 1)
    codomain = constraints.independent(constraints.real, 1)
    bijective = True

    __hash__ = object.__hash__

    @abstractmethod
    def call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Forward map: ``(y, log|det dy/dx|)``."""

    @abstractmethod
    def inv_and_ladj(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """Inverse map: ``(x, log|det dx/dy|)``."""

    def _call(self, x: Tensor) -> Tensor:
        return self.call_and_ladj(x)[0]

    def _inverse(self, y: Tensor) -> Tensor:
        return self.inv_and_ladj(y)[0]

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        return self.call_and_ladj(x)[1]

    @property
    def inv(self) -> FlowTransform:
        return _InverseFlowTransform(self)

    def with_cache(self, cache_size: int = 1) -> FlowTransform:
        """Returns ``self``: pyroflows transforms never cache; fused calls replace caching."""
        if cache_size not in (0, 1):
            raise ValueError(f"cache_size must be 0 or 1, got {cache_size!r}")
        return self


class _InverseFlowTransform(FlowTransform):
    def __init__(self, base: FlowTransform):
        super().__init__()
        self._base = base

    @property
    def inv(self) -> FlowTransform:
        return self._base

    def call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self._base.inv_and_ladj(x)

    def inv_and_ladj(self, y: Tensor) -> tuple[Tensor, Tensor]:
        return self._base.call_and_ladj(y)

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        return -self._base.log_abs_det_jacobian(y, x)


class BoundTransform(FlowTransform):
    """A layer bound to a context: both directions go through one `apply`.

    The structures (`Coupling`, `Autoregressive`) return one from ``condition(context)``.
    """

    def __init__(self, layer: FlowModule, context: Tensor | None):
        super().__init__()
        self.layer, self.context = layer, context

    @abstractmethod
    def apply(self, v: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        """The forward map of ``v`` (or the inverse) and its log-det, summed over the event."""

    def call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.apply(x, inverse=False)

    def inv_and_ladj(self, y: Tensor) -> tuple[Tensor, Tensor]:
        return self.apply(y, inverse=True)


class FlowModule(FlowTransform, TransformModule, ConditionalTransformModule):
    """A learnable flow layer, conditional or not.

    Subclasses set ``input_dim`` and ``context_dim`` and implement `condition`. Called
    directly (as a ``Transform``) the module acts as ``self.condition(None)``, so an
    unconditional layer works wherever a Pyro ``TransformModule`` does, and a conditional one
    raises a clear error asking for a context.
    """

    input_dim: int
    context_dim: int = 0

    __hash__ = TransformModule.__hash__

    @abstractmethod
    def condition(self, context: Tensor | None = None) -> FlowTransform:
        """The transform for one context (``None`` for an unconditional layer)."""

    def call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.condition(None).call_and_ladj(x)

    def inv_and_ladj(self, y: Tensor) -> tuple[Tensor, Tensor]:
        return self.condition(None).inv_and_ladj(y)

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        return self.condition(None).log_abs_det_jacobian(x, y)

    @property
    def inv(self) -> FlowModule:
        """The inverse layer, a module that shares (and exposes) this layer's parameters."""
        return Inverse(self)

    def get_config(self) -> dict[str, Any]:
        """The JSON arguments from which `from_config` rebuilds this layer (weights aside).

        `pyroflows.save` stores it for every layer. Layers that cannot be described (a
        custom network, a subclass of your own) raise a `TypeError`.
        """
        raise TypeError(f"{type(self).__name__} layers cannot be saved by configuration")

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> FlowModule:
        """A fresh layer (initial weights) with the structure ``config`` describes."""
        return cls(**config)


class Structure(FlowModule):
    """What `Coupling` and `Autoregressive` share: sizes, a transformer and a conditioner.

    Subclasses set ``self.conditioner`` after calling ``__init__`` and name the
    `BoundTransform` that ``condition(context)`` returns in ``bound_type``.
    """

    bound_type: type[BoundTransform]
    #: Number of features the transformer maps (what the conditioner gives parameters for).
    num_transformed: int
    #: State-dict version: 2 reads the conditioner's output parameter-major; 1 (state dicts
    #: saved before model format 3) feature-major, converted on load (`load_feature_major`).
    _version = 2

    def __init__(
        self,
        input_dim: int,
        context_dim: int,
        transformer: Transformer,
        conditioner: nn.Module | None,
    ):
        super().__init__()
        self.input_dim, self.context_dim = check_sizes(input_dim, context_dim)
        self.transformer = transformer
        self.custom_conditioner = conditioner is not None

    def extra_repr(self) -> str:
        return (
            f"input_dim={self.input_dim}, context_dim={self.context_dim}, "
            f"transformer={self.transformer!r}"
        )

    def condition(self, context: Tensor | None = None) -> FlowTransform:
        check_context(context, self.context_dim, type(self).__name__)
        return self.bound_type(self, context)

    def load_feature_major(self, state: dict[str, Tensor], prefix: str) -> None:
        """Convert, in ``state``, this layer's output-layer rows from feature-major order.

        For state dicts and model files written before the outputs became parameter-major; a
        custom conditioner's rows are the user's to order and are left alone.
        """
        if self.custom_conditioner:
            return
        net = self.conditioner.net
        where = f"{prefix}conditioner.net." + (
            f"{len(net) - 1}." if isinstance(net, nn.Sequential) else ""
        )
        for name in ("weight", "bias", "mask"):
            if where + name in state:
                state[where + name] = parameter_major(
                    state[where + name], self.num_transformed, self.transformer.num_params
                )

    def _load_from_state_dict(
        self, state_dict: dict, prefix: str, local_metadata: dict, *args: Any
    ) -> None:
        state_dict.pop(prefix + "merge_index", None)  # a retired Coupling buffer (format-1 files)
        if local_metadata.get("version", self._version) < 2:
            self.load_feature_major(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)

    def check_savable(self) -> None:
        """Raise a `TypeError` for a custom conditioner, which a config cannot describe."""
        if self.custom_conditioner:
            raise TypeError(
                f"a {type(self).__name__} layer with a custom conditioner cannot be saved by config"
            )


class ContextFree(FlowModule):
    """A layer whose map does not depend on a context: it is its own transform.

    Given a context (inside a conditional flow), it ignores it; mixing layers and the fixed
    data maps are of this kind.
    """

    def condition(self, context: Tensor | None = None) -> FlowTransform:
        return self


class Inverse(FlowModule):
    """The inverse of a `FlowModule`: forward and inverse swapped, same parameters.

    Unlike ``Transform.inv`` this is itself an ``nn.Module``, so ``layer.inv.parameters()``
    lists the parameters of ``layer`` and ``pyro.module`` registers them.

    Args:
        layer: the layer to invert.
    """

    def __init__(self, layer: FlowModule):
        super().__init__()
        if not isinstance(layer, FlowModule):
            raise TypeError(f"Inverse expects a FlowModule, got {type(layer).__name__}")
        self.layer = layer
        self.input_dim = layer.input_dim
        self.context_dim = layer.context_dim

    @property
    def inv(self) -> FlowModule:
        return self.layer

    def get_config(self) -> dict[str, Any]:
        return {"layer": {"type": type(self.layer).__name__, **self.layer.get_config()}}

    def condition(self, context: Tensor | None = None) -> FlowTransform:
        return _InverseFlowTransform(self.layer.condition(context))
