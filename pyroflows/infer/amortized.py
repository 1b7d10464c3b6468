"""Amortized flow guides ``q(z | x)`` for local latent variables (VAEs)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from .. import flows
from ..checks import check_int
from ..conditioners import MLP
from ..distribution import Flow, FlowDistribution
from ..transformers import Affine
from ..transforms import Coupling

__all__ = ["AmortizedFlow"]


class AmortizedFlow(nn.Module):
    """A conditional flow ``q(z | x)`` whose context is computed from ``x`` by an encoder.

    The setting of Rezende & Mohamed (2015): an encoder maps each observation to a context
    vector; a diagonal Gaussian whose mean and scale depend on that context (the usual VAE
    posterior) is refined by flow layers that also see the context. The flow layers run in
    the cheap-sampling IAF direction and start as the identity, so a fresh guide is a plain
    diagonal-Gaussian encoder.

    ``guide(x)`` returns a `FlowDistribution` with batch shape ``x.shape[:-k]`` and event
    shape ``(latent_dim,)``, ready for ``pyro.sample`` inside a plate (with subsampling: pass
    the subsampled rows).

    Args:
        latent_dim: size of ``z``.
        encoder: ``nn.Module`` mapping ``x`` to a context of shape ``(..., context_dim)``;
            default an MLP on flat inputs of size ``input_dim``.
        context_dim: size of the encoder's output.
        input_dim: size of flat observations, for the default encoder.
        hidden_dims: hidden widths of the default encoder and of the flow conditioners.
        num_layers: flow layers on top of the Gaussian (0 gives a Gaussian encoder).
        layers: ``"affine"`` (IAF) or ``"spline"`` flow layers.
        activation: activation of the default networks.

    Example:
        >>> import torch, pyro, pyro.distributions as dist
        >>> from pyroflows.infer import AmortizedFlow
        >>> q = AmortizedFlow(latent_dim=2, input_dim=5, context_dim=8)
        >>> def guide(x):
        ...     pyro.module("q", q)
        ...     with pyro.plate("rows", x.shape[0]):
        ...         return pyro.sample("z", q(x))
        >>> guide(torch.randn(10, 5)).shape
        torch.Size([10, 2])
    """

    def __init__(
        self,
        latent_dim: int,
        encoder: nn.Module | None = None,
        *,
        context_dim: int = 32,
        input_dim: int | None = None,
        hidden_dims: Sequence[int] = (64, 64),
        num_layers: int = 2,
        layers: str = "affine",
        activation: Callable[[], nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__()
        #: Width of the observations the default encoder takes (``None``: a custom encoder).
        self.input_dim = input_dim if encoder is None else None
        if encoder is None:
            if input_dim is None:
                raise ValueError("give an encoder, or input_dim for the default MLP encoder")
            encoder = MLP(
                input_dim, context_dim, hidden_dims, activation=activation, zero_init=False
            )
        if layers not in ("affine", "spline"):
            raise ValueError(f"layers must be 'affine' or 'spline', got {layers!r}")
        num_layers = check_int("num_layers", num_layers, low=0)
        self.encoder = encoder
        self.latent_dim, self.context_dim = latent_dim, context_dim
        self.flow = _conditional_flow(
            latent_dim, context_dim, num_layers, layers, hidden_dims, activation
        )

    def forward(self, x: Tensor) -> FlowDistribution:
        """``q(z | x)`` for a batch of observations."""
        if self.input_dim is not None and (x.dim() == 0 or x.shape[-1] != self.input_dim):
            given = "a scalar" if x.dim() == 0 else f"width {x.shape[-1]}"
            raise ValueError(
                f"AmortizedFlow expects observations of width input_dim={self.input_dim} "
                f"(shape (..., {self.input_dim})), got {given} (shape {tuple(x.shape)})"
            )
        context = self.encoder(x)
        if context.shape[-1] != self.context_dim:
            raise ValueError(
                f"the encoder returned contexts of size {context.shape[-1]}, "
                f"expected context_dim={self.context_dim}"
            )
        return self.flow.condition(context)


def _conditional_flow(
    latent_dim: int,
    context_dim: int,
    num_layers: int,
    layers: str,
    hidden_dims: Sequence[int],
    activation: Callable[[], nn.Module],
) -> Flow:
    """The flow of `AmortizedFlow`: ``num_layers`` IAF or spline layers, then the Gaussian."""
    if num_layers == 0:
        flow = Flow([], latent_dim, context_dim)
    elif layers == "affine":
        flow = flows.iaf(
            latent_dim,
            context_dim,
            num_layers=num_layers,
            hidden_dims=hidden_dims,
            activation=activation,
        )
    else:
        flow = flows.nsf(
            latent_dim,
            context_dim,
            num_layers=num_layers,
            hidden_dims=hidden_dims,
            invert=False,
            activation=activation,
        )
    # Data end: a diagonal affine map whose shift and log-scale come from the context
    # alone (a coupling layer with nothing passed through): the Gaussian encoder.
    gaussian = Coupling(
        latent_dim,
        Affine(log_scale_bound=10.0),
        context_dim=context_dim,
        hidden_dims=hidden_dims,
        mask=torch.zeros(latent_dim, dtype=torch.bool),
        activation=activation,
    )
    flow.layers.append(gaussian)
    return flow
