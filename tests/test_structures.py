"""The one calling convention between conditioners, structures and transformers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pyroflows import Autoregressive, Coupling
from pyroflows.conditioners import MADE, MLP
from pyroflows.testing import check_jacobian_structure, randomize_
from pyroflows.transformers import (
    Additive,
    Affine,
    BoundedRationalQuadraticSpline,
    CircularRationalQuadraticSpline,
    RationalQuadraticSpline,
)
from pyroflows.transforms.base import parameters_first

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


@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("broadcast", [False, True])
def test_affine_map_follows_its_formula(inverse, broadcast):
    """``y`` and the log-det of the affine transformer in both directions, with parameters
    broadcast over rows: the formula, and float64 gradcheck through the CPU tanh bound."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    shape = (2, 1, 3) if broadcast else (2, 5, 3)
    params = (2.0 * torch.randn(shape, generator=gen, dtype=torch.float64)).requires_grad_()
    affine = Affine(log_scale_bound=1.5)
    direction = affine.inverse if inverse else affine.forward
    assert torch.autograd.gradcheck(lambda p, v: direction(p, v), (params, x))
    with torch.no_grad():  # and the formula itself
        shift, raw = params
        log_scale = 1.5 * torch.tanh(raw / 1.5)
        y, ladj = direction(params, x)
        expected = (x - shift) * torch.exp(-log_scale) if inverse else shift + log_scale.exp() * x
        torch.testing.assert_close(y, expected)
        torch.testing.assert_close(ladj, (-log_scale if inverse else log_scale).expand_as(x))


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


def test_made_output_is_parameter_major():
    """Output ``p * D + i`` is parameter ``p`` of feature ``i``: it sees only earlier features."""
    torch.manual_seed(0)
    d, p = 4, 3
    net = MADE(d, p, (16, 16), order=[2, 0, 3, 1], zero_init=False)
    x = torch.randn(d, requires_grad=True)
    jac = torch.autograd.functional.jacobian(net, x)  # (p * d, d)
    rank = torch.empty(d, dtype=torch.long)
    rank[net.order] = torch.arange(d)
    for k in range(p * d):
        feature = k % d
        sees = jac[k].abs() > 0
        assert not bool(sees[rank >= rank[feature]].any()), (k, feature)
    # and the structure reads it that way: the layer is triangular in its order
    layer = Autoregressive(d, Affine(), hidden_dims=(16, 16), order=[2, 0, 3, 1])
    randomize_(layer)
    check_jacobian_structure(layer, layer.condition(None), torch.randn(5, d))


def test_parameters_first_is_a_view_of_the_parameter_blocks():
    n, f, p = 5, 3, 2
    params = torch.arange(n * p * f, dtype=torch.float32).reshape(n, p * f)
    theta = parameters_first(params, f, p)
    assert theta.shape == (p, n, f) and theta.data_ptr() == params.data_ptr()
    assert torch.equal(theta[1, 4], params[4, f : 2 * f])  # parameter 1 of row 4's features
