"""Coupling layers (Dinh et al., 2015, 2017; Durkan et al., 2019)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..conditioners import MLP
from ..transformers import Transformer
from .base import FlowModule, FlowTransform, broadcast_context, check_context, check_event
from .config import decode_network_args, encode_activation, encode_transformer

__all__ = ["Coupling"]


class Coupling(FlowModule):
    """Coupling layer: some features pass through unchanged and parameterise the rest.

    ``y[id] = x[id]`` and ``y[tr] = T(x[tr]; net(x[id], context))`` for an elementwise
    `Transformer` ``T`` and a conditioner network ``net``.
    **Both directions are cheap** (one network pass each), so a coupling flow samples and
    scores equally fast. The Jacobian is block triangular with an identity block on ``id``.

    Args:
        input_dim: size ``D`` of the vectors transformed.
        transformer: the elementwise map applied to the transformed features.
        context_dim: size of the context (0 for an unconditional layer).
        hidden_dims: hidden widths of the default `MLP`.
        mask: boolean tensor of shape ``(D,)``, ``True`` where a feature passes through
            unchanged. Default: the first ``D // 2`` features.
        conditioner: a custom network ``net(x_id, context) -> (..., n_tr * num_params)``
            replacing the default MLP.
        activation: activation of the default MLP.

    Example:
        >>> import torch
        >>> from pyroflows import Coupling
        >>> from pyroflows.transformers import RationalQuadraticSpline
        >>> layer = Coupling(4, RationalQuadraticSpline(count_bins=8), context_dim=2)
        >>> y = layer.condition(torch.randn(2))(torch.randn(10, 4))
        >>> y.shape
        torch.Size([10, 4])
    """

    def __init__(
        self,
        input_dim: int,
        transformer: Transformer,
        *,
        context_dim: int = 0,
        hidden_dims: Sequence[int] = (64, 64),
        mask: Tensor | Sequence[bool] | None = None,
        conditioner: nn.Module | None = None,
        activation: Callable[[], nn.Module] = nn.ReLU,
    ):
        super().__init__()
        if input_dim < 1:
            raise ValueError(f"input_dim must be >= 1, got {input_dim}")
        if context_dim < 0:
            raise ValueError(f"context_dim must be >= 0, got {context_dim}")
        if mask is None:
            mask = torch.arange(input_dim) < input_dim // 2
        mask = torch.as_tensor(mask, dtype=torch.bool)
        if mask.shape != (input_dim,):
            raise ValueError(f"mask must have shape ({input_dim},), got {tuple(mask.shape)}")
        if bool(mask.all()):
            raise ValueError("mask leaves no feature to transform; some entries must be False")
        self.input_dim, self.context_dim = input_dim, context_dim
        self.transformer = transformer
        idx_id, idx_tr = mask.nonzero().squeeze(-1), (~mask).nonzero().squeeze(-1)
        self.register_buffer("mask", mask)
        self.register_buffer("idx_id", idx_id)
        self.register_buffer("idx_tr", idx_tr)
        self.num_transformed = len(idx_tr)
        self.hidden_dims, self.activation = tuple(hidden_dims), activation
        self.custom_conditioner = conditioner is not None
        if conditioner is None:
            conditioner = MLP(
                len(idx_id),
                self.num_transformed * transformer.num_params,
                hidden_dims,
                context_features=context_dim,
                activation=activation,
            )
            conditioner.batch_innermost = transformer.prefers_params_first
        self.conditioner = conditioner

    def extra_repr(self) -> str:
        return (
            f"input_dim={self.input_dim}, context_dim={self.context_dim}, "
            f"transformer={self.transformer!r}"
        )

    def condition(self, context: Tensor | None = None) -> FlowTransform:
        check_context(context, self.context_dim, type(self).__name__)
        return _CouplingTransform(self, context)

    def get_config(self) -> dict[str, Any]:
        if self.custom_conditioner:
            raise TypeError("a Coupling layer with a custom conditioner cannot be saved by config")
        return {
            "input_dim": self.input_dim,
            "transformer": encode_transformer(self.transformer),
            "context_dim": self.context_dim,
            "hidden_dims": list(self.hidden_dims),
            "mask": self.mask.tolist(),
            "activation": encode_activation(self.activation),
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Coupling:
        return cls(**decode_network_args(config))

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any) -> None:
        # Files written before 0.2 hold a "merge_index" buffer this layer no longer has.
        state_dict.pop(prefix + "merge_index", None)
        super()._load_from_state_dict(state_dict, prefix, *args)


class _CouplingTransform(FlowTransform):
    def __init__(self, layer: Coupling, context: Tensor | None):
        super().__init__()
        self.layer, self.context = layer, context

    def _apply(self, x: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        layer = self.layer
        check_event(x, layer.input_dim)
        x, context = broadcast_context(x, self.context)
        batch = x.shape[:-1]
        rows = x.reshape(-1, layer.input_dim)  # (N, D) rows and (N, C) contexts
        context = None if context is None else context.reshape(-1, context.shape[-1])
        x_id = rows.index_select(1, layer.idx_id)
        params = layer.conditioner(x_id, context)
        if layer.transformer.prefers_params_first:
            # Parameters first, (P, n_tr, N), and columns (n_tr, N): how a spline reads them
            # fastest. The default MLP returns a transposed view, so this is not a copy.
            theta = params.t().view(layer.num_transformed, -1, rows.shape[0]).transpose(0, 1)
            x_tr = rows.t().index_select(0, layer.idx_tr)
            y_tr, ladj = layer.transformer.call_params_first(theta, x_tr, inverse)
            y_tr, ladj = y_tr.t(), ladj.sum(0)
        else:
            params = params.unflatten(-1, (layer.num_transformed, -1))
            step = layer.transformer.inverse if inverse else layer.transformer.forward
            y_tr, ladj = step(params, rows.index_select(1, layer.idx_tr))
            ladj = ladj.sum(-1)
        y = rows.index_copy(1, layer.idx_tr, y_tr)
        return y.reshape(batch + (layer.input_dim,)), ladj.reshape(batch)

    def call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self._apply(x, inverse=False)

    def inv_and_ladj(self, y: Tensor) -> tuple[Tensor, Tensor]:
        return self._apply(y, inverse=True)
