"""Autoregressive layers: MAF (Papamakarios et al., 2017) and IAF (Kingma et al., 2016)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor, nn

from ..conditioners import MADE
from ..transformers import Transformer
from .base import FlowModule, FlowTransform, broadcast_context, check_context, check_event

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
        self.conditioner = MADE(
            input_dim,
            transformer.num_params,
            hidden_dims,
            context_features=context_dim,
            order=order,
            residual=residual,
            activation=activation,
        )

    def extra_repr(self) -> str:
        return (
            f"input_dim={self.input_dim}, context_dim={self.context_dim}, "
            f"invert={self.invert}, transformer={self.transformer!r}"
        )

    def condition(self, context: Tensor | None = None) -> FlowTransform:
        check_context(context, self.context_dim, type(self).__name__)
        return _AutoregressiveTransform(self, context)


class _AutoregressiveTransform(FlowTransform):
    def __init__(self, layer: Autoregressive, context: Tensor | None):
        super().__init__()
        self.layer, self.context = layer, context

    def _prepare(self, v: Tensor) -> tuple[Tensor, Tensor | None]:
        check_event(v, self.layer.input_dim)
        return broadcast_context(v, self.context)

    def _params(self, v: Tensor, context: Tensor | None) -> Tensor:
        return self.layer.conditioner(v, context)

    def _solve(self, u: Tensor, context: Tensor | None, inverse: bool) -> tuple[Tensor, Tensor]:
        """The expensive direction: ``D`` passes, fixing one more feature each pass."""
        step = self.layer.transformer.inverse if inverse else self.layer.transformer.forward
        v = u.new_zeros(u.shape)
        for _ in range(self.layer.input_dim):
            v, ladj = step(self._params(v, context), u)
        return v, ladj.sum(-1)

    def call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x, context = self._prepare(x)
        if self.layer.invert:  # MAF: parameters come from the output
            return self._solve(x, context, inverse=False)
        y, ladj = self.layer.transformer.forward(self._params(x, context), x)
        return y, ladj.sum(-1)

    def inv_and_ladj(self, y: Tensor) -> tuple[Tensor, Tensor]:
        y, context = self._prepare(y)
        if not self.layer.invert:  # IAF: parameters come from the input
            return self._solve(y, context, inverse=True)
        x, ladj = self.layer.transformer.inverse(self._params(y, context), y)
        return x, ladj.sum(-1)

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        x, context = self._prepare(x)
        params = self._params(y if self.layer.invert else x, context)
        return self.layer.transformer.forward(params, x)[1].sum(-1)
