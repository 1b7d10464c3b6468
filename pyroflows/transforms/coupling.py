"""Coupling layers (Dinh et al., 2015, 2017; Durkan et al., 2019)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..conditioners import MLP
from ..transformers import Transformer
from .base import (
    BoundTransform,
    Structure,
    as_rows,
    parameters_first,
)
from .config import decode_network_args, encode_activation, encode_transformer

__all__ = ["Coupling"]


class _CouplingTransform(BoundTransform):
    layer: Coupling

    def apply(self, x: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        layer, transformer = self.layer, self.layer.transformer
        rows, context, batch = as_rows(x, self.context, layer.input_dim)
        params = layer.conditioner(rows.index_select(1, layer.idx_id), context)
        theta = parameters_first(params, layer.num_transformed, transformer.num_params)
        step = transformer.inverse if inverse else transformer.forward
        y_tr, ladj = step(theta, rows.index_select(1, layer.idx_tr))
        y = rows.index_copy(1, layer.idx_tr, y_tr)
        return y.reshape(batch + (layer.input_dim,)), ladj.sum(-1).reshape(batch)


class Coupling(Structure):
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
        conditioner: a custom network replacing the default MLP: ``net(x_id, context)``
            maps rows ``(N, D_id)`` (and ``(N, C)`` contexts, or ``None``) to
            ``(N, num_params * n_tr)``, parameter-major: the first parameter of every
            transformed feature, then the second, and so on.
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

    bound_type = _CouplingTransform

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
        super().__init__(input_dim, context_dim, transformer, conditioner)
        if mask is None:
            mask = torch.arange(input_dim) < input_dim // 2
        mask = torch.as_tensor(mask, dtype=torch.bool)
        if mask.shape != (input_dim,):
            raise ValueError(f"mask must have shape ({input_dim},), got {tuple(mask.shape)}")
        if bool(mask.all()):
            raise ValueError("mask leaves no feature to transform; some entries must be False")
        idx_id, idx_tr = mask.nonzero().squeeze(-1), (~mask).nonzero().squeeze(-1)
        self.register_buffer("mask", mask)
        self.register_buffer("idx_id", idx_id)
        self.register_buffer("idx_tr", idx_tr)
        self.num_transformed = len(idx_tr)
        self.hidden_dims, self.activation = tuple(hidden_dims), activation
        if conditioner is None:
            conditioner = MLP(
                len(idx_id),
                self.num_transformed * transformer.num_params,
                hidden_dims,
                context_features=context_dim,
                activation=activation,
            )
        self.conditioner = conditioner

    def get_config(self) -> dict[str, Any]:
        self.check_savable()
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
