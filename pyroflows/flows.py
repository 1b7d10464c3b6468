"""Builders: thin functions that assemble the standard flows as `Flow`s.

Every builder takes ``input_dim`` and ``context_dim`` and the common keywords
``num_layers``, ``hidden_dims`` and, where relevant, ``count_bins``, ``bound`` and
``invert``. All layers start as the identity (zero-initialised conditioners), so a fresh flow
is its standard normal base.

Which direction is cheap (``D`` is the event size):

| builder | sample (forward) | log_prob (inverse) |
| --- | --- | --- |
| ``nsf(coupling=True)``, ``realnvp``, ``nice`` | 1 pass | 1 pass |
| ``nsf()``, ``maf()`` (``invert=True``) | ``D`` passes | 1 pass |
| ``nsf(invert=False)``, ``iaf`` | 1 pass | ``D`` passes (0 for its own fresh samples) |

Example:
    >>> import torch
    >>> from pyroflows import flows
    >>> flow = flows.nsf(3, num_layers=3, hidden_dims=(32, 32))
    >>> x = torch.randn(100, 3)
    >>> loss = -flow().log_prob(x).mean()
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .checks import check_int
from .distribution import Flow
from .transformers import Additive, Affine, RationalQuadraticSpline, Transformer
from .transforms import ActNorm, Autoregressive, Coupling, FlowModule
from .transforms.base import check_sizes
from .transforms.config import encode_activation, encode_transformer

__all__ = ["nsf", "maf", "iaf", "realnvp", "nice", "autoregressive_flow", "coupling_flow"]


def _encode_argument(value: Any) -> Any:
    """A builder argument as JSON, for the record in ``flow.config``."""
    if isinstance(value, Transformer):
        return encode_transformer(value)
    if inspect.isclass(value) and issubclass(value, nn.Module):
        return {"activation": encode_activation(value)}
    if isinstance(value, tuple):
        return list(value)
    return value


def _records_config(builder: Callable[..., Flow]) -> Callable[..., Flow]:
    """Make ``builder`` store its name and arguments in ``flow.config``."""
    signature = inspect.signature(builder)

    @functools.wraps(builder)
    def wrapper(*args: Any, **kwargs: Any) -> Flow:
        flow = builder(*args, **kwargs)
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        try:
            encoded = {k: _encode_argument(v) for k, v in bound.arguments.items()}
            flow.config = {"builder": builder.__name__, "kwargs": encoded}
        except ValueError:
            flow.config = None  # e.g. a custom activation: no record of the builder call
        return flow

    return wrapper


def _check_common(input_dim: int, context_dim: int, num_layers: int) -> None:
    check_sizes(input_dim, context_dim)
    check_int("num_layers", num_layers)


@_records_config
def autoregressive_flow(
    input_dim: int,
    transformer: Transformer,
    context_dim: int = 0,
    *,
    num_layers: int = 5,
    hidden_dims: Sequence[int] = (64, 64),
    invert: bool = True,
    residual: bool = False,
    activation: Callable[[], nn.Module] = nn.ReLU,
) -> Flow:
    """A stack of `Autoregressive` layers with alternating orders.

    Consecutive layers use the natural and the reversed feature order, so no permutation
    layers are needed.

    Args:
        input_dim: event size ``D``.
        transformer: the elementwise map of every layer.
        context_dim: context size (0 for an unconditional flow).
        num_layers: number of autoregressive layers.
        hidden_dims: hidden widths of each MADE.
        invert: ``True`` for a cheap ``log_prob`` (MAF direction, density estimation),
            ``False`` for cheap sampling (IAF direction, variational guides).
        residual: residual MADE blocks.
        activation: activation of each MADE.
    """
    _check_common(input_dim, context_dim, num_layers)
    natural = torch.arange(input_dim)
    layers: list[FlowModule] = [
        Autoregressive(
            input_dim,
            transformer,
            context_dim=context_dim,
            hidden_dims=hidden_dims,
            order=natural if i % 2 == 0 else natural.flip(0),
            invert=invert,
            residual=residual,
            activation=activation,
        )
        for i in range(num_layers)
    ]
    return Flow(layers, input_dim, context_dim)


@_records_config
def coupling_flow(
    input_dim: int,
    transformer: Transformer,
    context_dim: int = 0,
    *,
    num_layers: int = 5,
    hidden_dims: Sequence[int] = (64, 64),
    activation: Callable[[], nn.Module] = nn.ReLU,
    seed: int = 0,
) -> Flow:
    """A stack of `Coupling` layers with complementary random masks.

    Layers come in pairs: a random half of the features passes through the first layer of a
    pair and the other half through the second, so every feature is transformed once per
    pair and the mixing across pairs costs nothing. With ``D = 1`` the single feature is
    transformed by parameters that depend only on the context.

    Args:
        input_dim: event size ``D``.
        transformer: the elementwise map of every layer.
        context_dim: context size (0 for an unconditional flow).
        num_layers: number of coupling layers.
        hidden_dims: hidden widths of each MLP conditioner.
        activation: activation of each MLP.
        seed: seed of the random masks (the flow's structure is reproducible).
    """
    _check_common(input_dim, context_dim, num_layers)
    generator = torch.Generator().manual_seed(seed)
    layers: list[FlowModule] = []
    mask = torch.zeros(input_dim, dtype=torch.bool)
    for i in range(num_layers):
        if i % 2 == 0:
            kept = torch.randperm(input_dim, generator=generator, device="cpu")[: input_dim // 2]
            mask = torch.zeros(input_dim, dtype=torch.bool)
            mask[kept] = True
        else:
            mask = ~mask if input_dim > 1 else mask
        layers.append(
            Coupling(
                input_dim,
                transformer,
                context_dim=context_dim,
                hidden_dims=hidden_dims,
                mask=mask,
                activation=activation,
            )
        )
    return Flow(layers, input_dim, context_dim)


@_records_config
def nsf(
    input_dim: int,
    context_dim: int = 0,
    *,
    coupling: bool = False,
    num_layers: int = 5,
    hidden_dims: Sequence[int] = (64, 64),
    count_bins: int = 8,
    bound: float = 5.0,
    invert: bool = True,
    residual: bool = False,
    activation: Callable[[], nn.Module] = nn.ReLU,
) -> Flow:
    """Neural spline flow (Durkan et al., 2019): rational-quadratic spline layers.

    Args:
        input_dim: event size ``D``.
        context_dim: context size (0 for an unconditional flow).
        coupling: coupling layers (both directions cheap) instead of autoregressive ones.
        num_layers: number of spline layers.
        hidden_dims: hidden widths of each conditioner.
        count_bins: number of spline bins.
        bound: splines act on ``[-bound, bound]``, identity outside.
        invert: autoregressive only: ``True`` for a cheap ``log_prob`` (MAF direction),
            ``False`` for cheap sampling (IAF direction).
        residual: autoregressive only: residual MADE blocks.
        activation: activation of the conditioners.

    Example:
        >>> from pyroflows import flows
        >>> flow = flows.nsf(4, coupling=True, count_bins=16)
        >>> flow().sample((3,)).shape
        torch.Size([3, 4])
    """
    transformer = RationalQuadraticSpline(count_bins=count_bins, bound=bound)
    if coupling:
        if not invert or residual:
            raise ValueError("invert and residual apply to autoregressive flows, not coupling=True")
        return coupling_flow(
            input_dim,
            transformer,
            context_dim,
            num_layers=num_layers,
            hidden_dims=hidden_dims,
            activation=activation,
        )
    return autoregressive_flow(
        input_dim,
        transformer,
        context_dim,
        num_layers=num_layers,
        hidden_dims=hidden_dims,
        invert=invert,
        residual=residual,
        activation=activation,
    )


@_records_config
def maf(
    input_dim: int,
    context_dim: int = 0,
    *,
    num_layers: int = 5,
    hidden_dims: Sequence[int] = (64, 64),
    invert: bool = True,
    residual: bool = False,
    log_scale_bound: float = 3.0,
    activation: Callable[[], nn.Module] = nn.ReLU,
) -> Flow:
    """Masked autoregressive flow (Papamakarios et al., 2017): affine autoregressive layers.

    Args:
        input_dim: event size ``D``.
        context_dim: context size (0 for an unconditional flow).
        num_layers: number of layers.
        hidden_dims: hidden widths of each MADE.
        invert: ``True`` (default) for a cheap ``log_prob``; ``False`` gives an IAF.
        residual: residual MADE blocks.
        log_scale_bound: largest log-scale one layer applies.
        activation: activation of each MADE.
    """
    return autoregressive_flow(
        input_dim,
        Affine(log_scale_bound),
        context_dim,
        num_layers=num_layers,
        hidden_dims=hidden_dims,
        invert=invert,
        residual=residual,
        activation=activation,
    )


@_records_config
def iaf(
    input_dim: int,
    context_dim: int = 0,
    *,
    num_layers: int = 5,
    hidden_dims: Sequence[int] = (64, 64),
    residual: bool = False,
    log_scale_bound: float = 3.0,
    activation: Callable[[], nn.Module] = nn.ReLU,
) -> Flow:
    """Inverse autoregressive flow (Kingma et al., 2016): ``maf(..., invert=False)``.

    Sampling is one pass per layer and fresh samples are scored without inversion: the
    direction a variational guide wants. For a spline IAF use ``nsf(..., invert=False)``.

    Args:
        input_dim: event size ``D``.
        context_dim: context size (0 for an unconditional flow).
        num_layers: number of layers.
        hidden_dims: hidden widths of each MADE.
        residual: residual MADE blocks.
        log_scale_bound: largest log-scale one layer applies.
        activation: activation of each MADE.
    """
    return maf(
        input_dim,
        context_dim,
        num_layers=num_layers,
        hidden_dims=hidden_dims,
        invert=False,
        residual=residual,
        log_scale_bound=log_scale_bound,
        activation=activation,
    )


@_records_config
def realnvp(
    input_dim: int,
    context_dim: int = 0,
    *,
    num_layers: int = 5,
    hidden_dims: Sequence[int] = (64, 64),
    log_scale_bound: float = 3.0,
    activation: Callable[[], nn.Module] = nn.ReLU,
) -> Flow:
    """Real NVP (Dinh et al., 2017): affine coupling layers; both directions cheap.

    Args:
        input_dim: event size ``D``.
        context_dim: context size (0 for an unconditional flow).
        num_layers: number of coupling layers.
        hidden_dims: hidden widths of each MLP.
        log_scale_bound: largest log-scale one layer applies.
        activation: activation of each MLP.
    """
    return coupling_flow(
        input_dim,
        Affine(log_scale_bound),
        context_dim,
        num_layers=num_layers,
        hidden_dims=hidden_dims,
        activation=activation,
    )


@_records_config
def nice(
    input_dim: int,
    context_dim: int = 0,
    *,
    num_layers: int = 4,
    hidden_dims: Sequence[int] = (64, 64),
    activation: Callable[[], nn.Module] = nn.ReLU,
) -> Flow:
    """NICE (Dinh et al., 2015): additive coupling layers and a final diagonal scaling.

    The coupling layers preserve volume; the last layer is an `ActNorm`
    (learnable per-feature scale and shift) on the data side.

    Args:
        input_dim: event size ``D``.
        context_dim: context size (0 for an unconditional flow).
        num_layers: number of additive coupling layers.
        hidden_dims: hidden widths of each MLP.
        activation: activation of each MLP.
    """
    flow = coupling_flow(
        input_dim,
        Additive(),
        context_dim,
        num_layers=num_layers,
        hidden_dims=hidden_dims,
        activation=activation,
    )
    flow.layers.append(ActNorm(input_dim))
    return flow
