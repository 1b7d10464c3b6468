"""The one calling convention between conditioners, structures and transformers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pyroflows import Autoregressive, Coupling
from pyroflows.conditioners import MADE, MLP
from pyroflows.testing import check_jacobian_structure
from pyroflows.transformers import (
    Additive,
    Affine,
    BoundedRationalQuadraticSpline,
    CircularRationalQuadraticSpline,
    RationalQuadraticSpline,
)

TRANSFORMERS = [
    Affine(),
    Additive(),
    RationalQuadraticSpline(4),
    BoundedRationalQuadraticSpline(4, low=-6.0, high=6.0),
    CircularRationalQuadraticSpline(4, bound=6.0),
]


@pytest.mark.parametrize("t", TRANSFORMERS, ids=lambda t: type(t).__name__)
def test_transformer_reads_parameters_first_and_inverts(t):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(5, 3, generator=g) * 4 - 2
    params = torch.randn(t.num_params, 5, 3, generator=g)
    y, ladj = t.forward(params, x)
    x2, ladj_inv = t.inverse(params, y)
    torch.testing.assert_close(x2, x, atol=1e-4, rtol=0)
    torch.testing.assert_close(ladj + ladj_inv, torch.zeros_like(ladj), atol=1e-4, rtol=0)
    # element (i, j) uses only params[:, i, j]
    y_one, _ = t.forward(params[:, 1:2, 2:3], x[1:2, 2:3])
    torch.testing.assert_close(y_one, y[1:2, 2:3])


@pytest.mark.parametrize("t", TRANSFORMERS, ids=lambda t: type(t).__name__)
def test_transformer_refuses_parameters_last(t):
    x = torch.zeros(5, 3)
    with pytest.raises(ValueError, match="parameters first"):
        t.forward(torch.zeros(5, 3, t.num_params + 1), x)


class _Shuffled(nn.Module):
    """A MADE behind a plain module, standing in for a user's own network."""

    def __init__(self, made: MADE):
        super().__init__()
        self.made = made

    def forward(self, v, context=None):
        return self.made(v, context).contiguous()  # row-major, unlike the built-in layout


@pytest.mark.parametrize("invert", [False, True])
def test_autoregressive_takes_a_custom_conditioner(invert):
    torch.manual_seed(0)
    t = RationalQuadraticSpline(4)
    made = MADE(3, t.num_params, (16,), context_features=2, order=[2, 0, 1], zero_init=False)
    default = Autoregressive(3, t, context_dim=2, hidden_dims=(16,), order=[2, 0, 1], invert=invert)
    default.conditioner.load_state_dict(made.state_dict())
    custom = Autoregressive(
        3, t, context_dim=2, order=[2, 0, 1], invert=invert, conditioner=_Shuffled(made)
    )
    x, c = torch.randn(6, 3), torch.randn(6, 2)
    for a, b in zip(
        default.condition(c).call_and_ladj(x), custom.condition(c).call_and_ladj(x), strict=True
    ):
        torch.testing.assert_close(a, b)
    check_jacobian_structure(custom, custom.condition(c[:2]), x[:2])
    with pytest.raises(TypeError, match="custom conditioner"):
        custom.get_config()


def test_custom_conditioner_of_the_wrong_size_is_named():
    layer = Coupling(4, Affine(), conditioner=MLP(2, 3))
    with pytest.raises(ValueError, match=r"conditioner must return shape \(N, 4\)"):
        layer(torch.zeros(5, 4))
    layer = Autoregressive(3, Affine(), conditioner=MLP(3, 5))
    with pytest.raises(ValueError, match=r"conditioner must return shape \(N, 6\)"):
        layer(torch.zeros(5, 3))


@pytest.mark.parametrize("cls", [MLP, MADE])
def test_conditioner_output_is_batch_innermost_with_the_same_values(cls):
    torch.manual_seed(0)
    net = cls(3, 4, (8,), zero_init=False)
    x = torch.randn(7, 3)
    out = net(x)
    assert out.shape == (7, 12 if cls is MADE else 4)
    assert out.stride() == (1, 7)  # each output contiguous over the batch
    torch.testing.assert_close(out, net(x[None])[0])  # the 3-D path computes it row-major
