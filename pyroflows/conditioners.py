"""Conditioner networks: plain ``nn.Module``s that know nothing of flows.

A conditioner maps ``input ⊕ context`` to the raw parameters of a transformer. Two are
provided:

* `MLP`, a dense network, used by coupling layers;
* `MADE`, a masked autoregressive network (Germain et al., 2015) whose output for
  feature ``i`` depends only on the inputs that come before ``i`` in a given order (and on the
  context), optionally with masked residual blocks. Used by autoregressive layers.

Both zero-initialise their last layer by default, so the transformer starts at the identity.
Both return ``(..., out_features)``. The structures read that output **parameter-major**: for
``F`` transformed features and ``P`` parameters each, output ``p * F + f`` is parameter ``p``
of feature ``f``, so each parameter of all the features is one contiguous block of every row
(and `MADE` orders its outputs that way).

Both see a bounded copy of their input: each value (context included) is clamped to
``[-INPUT_LIMIT, INPUT_LIMIT]`` (1e6, far outside any spline interval or standardised data).
A huge but finite input (1e20, 3e38) would otherwise drive the network to ``inf``/NaN
parameters that poison features well inside the spline's range. The clamp is a function of
the conditioning features, so the coupling/autoregressive structure, the bijection and its
log-determinant stay exact; it only makes the parameters constant beyond the limit.

Example:
    >>> import torch
    >>> from pyroflows.conditioners import MADE
    >>> net = MADE(3, num_params=2, hidden_dims=(16,), zero_init=False)
    >>> net(torch.randn(5, 3)).shape  # parameter 0 of the 3 features, then parameter 1
    torch.Size([5, 6])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from .checks import check_int

__all__ = ["MLP", "MADE", "MaskedLinear", "join_context", "check_order", "INPUT_LIMIT"]

#: Conditioner inputs are clamped to ``[-INPUT_LIMIT, INPUT_LIMIT]`` (see the module docstring).
INPUT_LIMIT = 1e6


def _bounded(h: Tensor) -> Tensor:
    """``h`` clamped to the conditioners' input range (lower for half precision, whose
    network products would overflow)."""
    limit = min(INPUT_LIMIT, torch.finfo(h.dtype).max ** 0.5) if h.is_floating_point() else None
    return h if limit is None else h.clamp(-limit, limit)


def _run(net: nn.Module, x: Tensor, context: Tensor | None) -> Tensor:
    """``net`` on the bounded ``x ⊕ context``."""
    return net(_bounded(join_context(x, context)))


def join_context(x: Tensor, context: Tensor | None) -> Tensor:
    """Concatenate ``x`` and ``context`` along the last dimension, broadcasting batch dims."""
    if context is None:
        return x
    shape = torch.broadcast_shapes(x.shape[:-1], context.shape[:-1])
    return torch.cat(
        [x.expand(shape + x.shape[-1:]), context.expand(shape + context.shape[-1:])], dim=-1
    )


def _activation(activation: Callable[[], nn.Module], inplace: bool = True) -> nn.Module:
    """An activation module; a plain ``nn.ReLU`` works in place (its input is a fresh layer
    output that nothing else reads), which saves an allocation per layer and call."""
    module = activation()
    if inplace and type(module) is nn.ReLU:
        module.inplace = True
    return module


def _check_dims(hidden_dims: Sequence[int]) -> tuple[int, ...]:
    if isinstance(hidden_dims, int):
        hidden_dims = (hidden_dims,)
    hidden_dims = tuple(hidden_dims)
    # Python ints only (not NumPy's): the widths are saved as JSON by the layers' configs.
    if not hidden_dims or any(type(h) is not int or h < 1 for h in hidden_dims):
        raise ValueError(f"hidden_dims must be one or more positive integers, got {hidden_dims!r}")
    return hidden_dims


class _Bias(nn.Module):
    """The network of a conditioner with no inputs at all: a learnable constant."""

    def __init__(self, out_features: int, zero_init: bool):
        super().__init__()
        init = torch.zeros(out_features) if zero_init else 0.1 * torch.randn(out_features)
        self.bias = nn.Parameter(init)

    def forward(self, x: Tensor) -> Tensor:
        return self.bias.expand(x.shape[:-1] + self.bias.shape)


class MLP(nn.Module):
    """Dense network ``in_features (+ context_features) -> hidden_dims -> out_features``.

    Args:
        in_features: size of the input (may be 0 when only a context is given).
        out_features: size of the output.
        hidden_dims: widths of the hidden layers (an int means one hidden layer).
        context_features: size of the context concatenated to the input (0 for none).
        activation: constructor of the activation module.
        zero_init: zero the last layer so the output starts at exactly 0.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        hidden_dims: Sequence[int] = (64, 64),
        context_features: int = 0,
        activation: Callable[[], nn.Module] = nn.ReLU,
        zero_init: bool = True,
    ):
        super().__init__()
        hidden_dims = _check_dims(hidden_dims)
        self.context_features = context_features
        sizes = (in_features + context_features, *hidden_dims, out_features)
        if sizes[0] == 0:  # nothing to condition on (e.g. a 1-D coupling without context)
            self.net = _Bias(out_features, zero_init)
            return
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=False)):
            if i:
                layers.append(_activation(activation))
            layers.append(nn.Linear(a, b))
        self.net = nn.Sequential(*layers)
        if zero_init:
            nn.init.zeros_(self.net[-1].weight)
            nn.init.zeros_(self.net[-1].bias)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """Evaluate on ``x`` (shape ``(..., in_features)``) and an optional context."""
        return _run(self.net, x, context)


class MaskedLinear(nn.Linear):
    """Linear layer whose weight is multiplied by a fixed 0/1 mask (a buffer)."""

    def __init__(self, mask: Tensor, bias: bool = True):
        out_features, in_features = mask.shape
        super().__init__(in_features, out_features, bias=bias)
        self.register_buffer("mask", mask.to(self.weight.dtype))

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(x, self.weight * self.mask, self.bias)


class _MaskedResidualBlock(nn.Module):
    def __init__(self, mask: Tensor, activation: Callable[[], nn.Module]):
        super().__init__()
        # act1 must not work in place: its input h is also the residual.
        self.act1, self.lin1 = _activation(activation, inplace=False), MaskedLinear(mask)
        self.act2, self.lin2 = _activation(activation), MaskedLinear(mask)

    def forward(self, h: Tensor) -> Tensor:
        return h + self.lin2(self.act2(self.lin1(self.act1(h))))


class MADE(nn.Module):
    """Masked autoregressive network with optional context and residual blocks.

    The output has shape ``(..., num_params * features)``, parameter-major: output
    ``p * features + i`` is parameter ``p`` of feature ``i``. The parameters of feature ``i``
    depend only on inputs ``j`` with ``rank[j] < rank[i]`` (and on the context), where
    ``rank`` is the position of each feature in ``order``.

    Args:
        features: number of input features ``D``.
        num_params: parameters produced per feature.
        hidden_dims: hidden widths; with ``residual=True`` all must be equal and each one
            becomes a residual block. Widths below ``D - 1`` leave some connections out.
        context_features: size of the context, connected to every hidden unit.
        order: a permutation of ``range(D)`` giving the autoregressive order (default
            ``0, 1, ..., D - 1``).
        residual: use masked residual blocks.
        activation: constructor of the activation module.
        zero_init: zero the output layer so the output starts at exactly 0.
    """

    def __init__(
        self,
        features: int,
        num_params: int,
        hidden_dims: Sequence[int] = (64, 64),
        context_features: int = 0,
        order: Sequence[int] | Tensor | None = None,
        residual: bool = False,
        activation: Callable[[], nn.Module] = nn.ReLU,
        zero_init: bool = True,
    ):
        super().__init__()
        hidden_dims = _check_dims(hidden_dims)
        check_int("features", features)
        check_int("num_params", num_params)
        check_int("context_features", context_features, low=0)
        if residual and len(set(hidden_dims)) != 1:
            raise ValueError(f"residual blocks need equal hidden_dims, got {hidden_dims}")
        order = check_order(order, features)
        self.features, self.num_params = features, num_params
        self.context_features = context_features
        self.register_buffer("order", order.clone())
        if features == 1 and not context_features:  # nothing to condition on
            self.net = _Bias(num_params, zero_init)
            return
        in_deg, degs = _made_degrees(order, hidden_dims, context_features)
        out_deg = in_deg[:features].repeat(num_params)  # parameter-major
        self.net = _masked_network(in_deg, degs, out_deg, residual, activation)
        if zero_init:
            nn.init.zeros_(self.net[-1].weight)
            nn.init.zeros_(self.net[-1].bias)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """Parameters of shape ``x.shape[:-1] + (num_params * features,)``, parameter-major."""
        return _run(self.net, x, context)


def check_order(order: Sequence[int] | Tensor | None, features: int) -> Tensor:
    """``order`` as a CPU ``long`` tensor (default ``0, ..., features - 1``), checked to be a
    permutation of ``range(features)``."""
    if order is None:
        return torch.arange(features)
    order = torch.as_tensor(order, device="cpu").long()  # indexes CPU tensors while building
    if sorted(order.tolist()) != list(range(features)):
        raise ValueError(f"order must be a permutation of range({features}), got {order.tolist()}")
    return order


def _made_degrees(
    order: Tensor, hidden_dims: tuple[int, ...], context_features: int
) -> tuple[Tensor, list[Tensor]]:
    """The degrees of a MADE's inputs (features, then context) and of its hidden units.

    Input feature ``order[k]`` has degree ``k + 1`` and the context degree 0. A unit of
    degree ``m`` may see inputs of degree ``<= m``, and the outputs of a feature of degree
    ``m`` see hidden units of degree ``< m``.
    """
    features = len(order)
    in_deg = torch.empty(features, dtype=torch.long)
    in_deg[order] = torch.arange(1, features + 1)
    in_deg = torch.cat([in_deg, in_deg.new_zeros(context_features)])
    if context_features:  # degree-0 units see only the context, so feature 1 can too
        return in_deg, [torch.arange(h) % features for h in hidden_dims]
    low = min(1, features - 1)
    return in_deg, [torch.arange(h) % max(features - 1, 1) + low for h in hidden_dims]


def _sees(d_out: Tensor, d_in: Tensor, strict: bool = False) -> Tensor:
    """The mask of a layer whose units of degree ``d_out`` see inputs of degree ``d_in``."""
    return (d_out[:, None] > d_in[None, :]) if strict else (d_out[:, None] >= d_in[None, :])


def _masked_network(
    in_deg: Tensor,
    degs: list[Tensor],
    out_deg: Tensor,
    residual: bool,
    activation: Callable[[], nn.Module],
) -> nn.Sequential:
    """The MADE's layers: input -> hidden (plain or residual blocks) -> output."""
    layers: list[nn.Module] = [MaskedLinear(_sees(degs[0], in_deg))]
    if residual:
        layers += [_MaskedResidualBlock(_sees(d, d), activation) for d in degs]
    else:
        for d_prev, d in zip(degs[:-1], degs[1:], strict=True):
            layers += [_activation(activation), MaskedLinear(_sees(d, d_prev))]
    layers.append(_activation(activation))
    layers.append(MaskedLinear(_sees(out_deg, degs[-1], strict=True)))
    return nn.Sequential(*layers)
