"""Autoregressive layers: MAF (Papamakarios et al., 2017) and IAF (Kingma et al., 2016)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..conditioners import MADE
from ..transformers import Transformer
from .base import FlowModule, FlowTransform, broadcast_context, check_context, check_event
from .config import decode_network_args, encode_activation, encode_transformer

__all__ = ["Autoregressive"]


class Autoregressive(FlowModule):
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
    ):
        super().__init__()
        if input_dim < 1:
            raise ValueError(f"input_dim must be >= 1, got {input_dim}")
        if context_dim < 0:
            raise ValueError(f"context_dim must be >= 0, got {context_dim}")
        self.input_dim, self.context_dim = input_dim, context_dim
        self.transformer = transformer
        self.invert = bool(invert)
        self.hidden_dims, self.residual = tuple(hidden_dims), bool(residual)
        self.activation = activation
        self.conditioner = MADE(
            input_dim,
            transformer.num_params,
            hidden_dims,
            context_features=context_dim,
            order=order,
            residual=residual,
            activation=activation,
        )
        self.conditioner.batch_innermost = transformer.prefers_params_first

    def extra_repr(self) -> str:
        return (
            f"input_dim={self.input_dim}, context_dim={self.context_dim}, "
            f"invert={self.invert}, transformer={self.transformer!r}"
        )

    def condition(self, context: Tensor | None = None) -> FlowTransform:
        check_context(context, self.context_dim, type(self).__name__)
        return _AutoregressiveTransform(self, context)

    def get_config(self) -> dict[str, Any]:
        return {
            "input_dim": self.input_dim,
            "transformer": encode_transformer(self.transformer),
            "context_dim": self.context_dim,
            "hidden_dims": list(self.hidden_dims),
            "order": self.conditioner.order.tolist(),
            "invert": self.invert,
            "residual": self.residual,
            "activation": encode_activation(self.activation),
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Autoregressive:
        return cls(**decode_network_args(config))


class _AutoregressiveTransform(FlowTransform):
    def __init__(self, layer: Autoregressive, context: Tensor | None):
        super().__init__()
        self.layer, self.context = layer, context

    def _rows(self, v: Tensor) -> tuple[Tensor, Tensor | None, torch.Size]:
        """``v`` and the context as rows ``(N, D)``/``(N, C)``, and the batch shape."""
        check_event(v, self.layer.input_dim)
        v, context = broadcast_context(v, self.context)
        batch = v.shape[:-1]
        rows = v.reshape(-1, self.layer.input_dim)
        if context is not None:
            context = context.reshape(-1, context.shape[-1])
        return rows, context, batch

    def _step(
        self, source: Tensor, target: Tensor, context: Tensor | None, inverse: bool
    ) -> tuple[Tensor, Tensor]:
        """Transform ``target`` (rows) with parameters computed from ``source`` (rows).

        For a transformer that prefers it (the splines), the MADE writes each parameter as a
        contiguous ``(D, N)`` slab and the transformer works on ``(D, N)`` columns; others
        (affine maps, two parameters) work on rows, where the network's matrix products are
        fastest. Either way the results come back as rows and ``(N,)`` log-dets.
        """
        layer = self.layer
        params = layer.conditioner(source, context)
        if not layer.transformer.prefers_params_first:  # rows, parameters last
            step = layer.transformer.inverse if inverse else layer.transformer.forward
            out, ladj = step(params, target)
            return out, ladj.sum(-1)
        theta = params.permute(2, 1, 0)  # (P, D, N): a view of the MADE's output, no copy
        # Columns (D, N): free when the input came from a previous layer as a transposed view.
        out, ladj = layer.transformer.call_params_first(theta, target.t().contiguous(), inverse)
        return out.t(), ladj.sum(0)

    def _solve(self, u: Tensor, context: Tensor | None, inverse: bool) -> tuple[Tensor, Tensor]:
        """The expensive direction: ``D`` passes, fixing one more feature each pass."""
        v = torch.zeros_like(u)
        for _ in range(self.layer.input_dim):
            v, ladj = self._step(v, u, context, inverse)
        return v, ladj

    def _apply(self, v: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        rows, context, batch = self._rows(v)
        if self.layer.invert != inverse:  # parameters come from the output: D passes
            out, ladj = self._solve(rows, context, inverse)
        else:  # parameters come from the input: one pass
            out, ladj = self._step(rows, rows, context, inverse)
        return out.reshape(batch + (self.layer.input_dim,)), ladj.reshape(batch)

    def call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self._apply(x, inverse=False)

    def inv_and_ladj(self, y: Tensor) -> tuple[Tensor, Tensor]:
        return self._apply(y, inverse=True)

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        rows, context, batch = self._rows(x)
        source = self._rows(y)[0] if self.layer.invert else rows
        return self._step(source, rows, context, inverse=False)[1].reshape(batch)
