"""Autoregressive layers: MAF (Papamakarios et al., 2017) and IAF (Kingma et al., 2016)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..conditioners import MADE, check_order
from ..transformers import Transformer
from .base import (
    BoundTransform,
    Structure,
    as_rows,
    parameters_first,
)
from .config import decode_network_args, encode_activation, encode_transformer

__all__ = ["Autoregressive"]


class _AutoregressiveTransform(BoundTransform):
    layer: Autoregressive

    def _step(
        self, source: Tensor, target: Tensor, context: Tensor | None, inverse: bool
    ) -> tuple[Tensor, Tensor]:
        """Transform ``target`` (rows) with parameters computed from ``source`` (rows)."""
        layer, transformer = self.layer, self.layer.transformer
        params = layer.conditioner(source, context)
        theta = parameters_first(params, layer.input_dim, transformer.num_params)
        step = transformer.inverse if inverse else transformer.forward
        out, ladj = step(theta, target)
        return out, ladj.sum(-1)

    def _solve(self, u: Tensor, context: Tensor | None, inverse: bool) -> tuple[Tensor, Tensor]:
        """The expensive direction: ``D`` passes, fixing one more feature each pass."""
        v = torch.zeros_like(u)
        for _ in range(self.layer.input_dim):
            v, ladj = self._step(v, u, context, inverse)
        return v, ladj

    def apply(self, v: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        rows, context, batch = as_rows(v, self.context, self.layer.input_dim)
        if self.layer.invert != inverse:  # parameters come from the output: D passes
            out, ladj = self._solve(rows, context, inverse)
        else:  # parameters come from the input: one pass
            out, ladj = self._step(rows, rows, context, inverse)
        return out.reshape(batch + (self.layer.input_dim,)), ladj.reshape(batch)

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        rows, context, batch = as_rows(x, self.context, self.layer.input_dim)
        source = as_rows(y, self.context, self.layer.input_dim)[0] if self.layer.invert else rows
        return self._step(source, rows, context, inverse=False)[1].reshape(batch)


class Autoregressive(Structure):
    """Autoregressive layer: feature ``i`` is transformed with parameters that depend on the
    features before it (in ``order``) and on the context.

    A masked network (`MADE`) computes all parameters in one
    pass, but only from one side of the bijection, so **one direction is cheap and the other
    takes ``D`` sequential passes**:

    * ``invert=False`` (IAF direction): ``x = T(z; net(z))``. Sampling (forward) is one
      pass; scoring arbitrary data (inverse) takes ``D`` passes. Use for variational guides,
      which sample and then score their own samples (the distribution scores a fresh sample
      without inverting it).
    * ``invert=True`` (MAF direction): ``x = T(z; net(x))``. Scoring data (inverse) is one
      pass; sampling takes ``D`` passes. Use for density estimation by maximum likelihood.

    The Jacobian is triangular in ``order``. ``log_abs_det_jacobian(x, y)`` is one pass in
    both cases.

    Args:
        input_dim: size ``D`` of the vectors transformed.
        transformer: the elementwise map applied to each feature.
        context_dim: size of the context (0 for an unconditional layer).
        hidden_dims: hidden widths of the MADE conditioner.
        order: permutation of ``range(D)``: the autoregressive order (default identity).
        invert: choose the cheap direction (see above); ``False`` is IAF, ``True`` is MAF.
        residual: use masked residual blocks in the MADE.
        activation: activation of the MADE.
        conditioner: a custom autoregressive network replacing the MADE: ``net(v, context)``
            maps rows ``(N, D)`` (and ``(N, C)`` contexts, or ``None``) to
            ``(N, num_params * D)``, parameter-major (the first parameter of every feature,
            then the second, ...), where the parameters of feature ``i`` depend only on the
            features before it in the network's order. The layer cannot check that;
            `pyroflows.testing.check_jacobian_structure` can. With a custom conditioner,
            ``order`` names the network's order and ``hidden_dims``, ``residual`` and
            ``activation`` are not used.

    Example:
        >>> import torch
        >>> from pyroflows import Autoregressive
        >>> from pyroflows.transformers import Affine
        >>> maf_layer = Autoregressive(3, Affine(), invert=True)
        >>> x = torch.randn(5, 3)
        >>> z, ladj = maf_layer.inv_and_ladj(x)  # one pass
        >>> z.shape, ladj.shape
        (torch.Size([5, 3]), torch.Size([5]))
    """

    bound_type = _AutoregressiveTransform

    def __init__(
        self,
        input_dim: int,
        transformer: Transformer,
        *,
        context_dim: int = 0,
        hidden_dims: Sequence[int] = (64, 64),
        order: Sequence[int] | Tensor | None = None,
        invert: bool = False,
        residual: bool = False,
        activation: Callable[[], nn.Module] = nn.ReLU,
        conditioner: nn.Module | None = None,
    ):
        super().__init__(input_dim, context_dim, transformer, conditioner)
        self.invert = bool(invert)
        self.hidden_dims, self.residual = tuple(hidden_dims), bool(residual)
        self.activation = activation
        if conditioner is not None:
            self._custom_order = check_order(order, input_dim)
        else:
            conditioner = MADE(
                input_dim,
                transformer.num_params,
                hidden_dims,
                context_features=context_dim,
                order=order,
                residual=residual,
                activation=activation,
            )
        self.conditioner = conditioner

    @property
    def num_transformed(self) -> int:  # type: ignore[override]
        """Every feature is transformed: ``input_dim``."""
        return self.input_dim

    @property
    def order(self) -> Tensor:
        """The autoregressive order: feature ``order[k]`` is the ``k``-th to be transformed."""
        return self._custom_order if self.custom_conditioner else self.conditioner.order

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, invert={self.invert}"

    def get_config(self) -> dict[str, Any]:
        self.check_savable()
        return {
            "input_dim": self.input_dim,
            "transformer": encode_transformer(self.transformer),
            "context_dim": self.context_dim,
            "hidden_dims": list(self.hidden_dims),
            "order": self.order.tolist(),
            "invert": self.invert,
            "residual": self.residual,
            "activation": encode_activation(self.activation),
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Autoregressive:
        return cls(**decode_network_args(config))
