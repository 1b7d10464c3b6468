"""Known defects of Pyro's built-in flows, each pinned by a test that pyroflows passes."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyroflows import Coupling, flows
from pyroflows.testing import randomize_
from pyroflows.transformers import RationalQuadraticSpline


@pytest.mark.parametrize("builder", [flows.maf, flows.iaf, flows.nsf, flows.realnvp])
def test_training_loop_on_the_same_tensor_needs_no_clear_cache(builder):
    """Pyro issue 2545: scoring one data tensor every step must not reuse a stale graph."""
    flow = builder(3, num_layers=2, hidden_dims=(8,))
    data = torch.randn(64, 3)
    opt = torch.optim.Adam(flow.parameters(), lr=1e-2)
    # Also through Pyro's own TransformedDistribution with pyroflows layers.
    plain = dist.TransformedDistribution(
        dist.Normal(torch.zeros(3), 1.0).to_event(1), list(flow.layers)
    )
    losses = []
    for _ in range(5):
        for d in (flow(), plain):
            loss = -d.log_prob(data).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_inverse_layer_exposes_parameters_to_pyro():
    """Pyro issue 2543: ``transform.inv`` must still expose ``parameters()``."""
    layer = flows.maf(3).layers[0]
    inverse = layer.inv
    assert len(list(inverse.parameters())) == len(list(layer.parameters())) > 0
    pyro.clear_param_store()
    pyro.module("inverse", inverse)
    assert len(pyro.get_param_store()) == len(list(layer.parameters()))


@pytest.mark.parametrize("builder", [flows.maf, flows.iaf, flows.nsf])
def test_double_precision_flow_works_in_both_directions(builder):
    """Pyro's AffineAutoregressive._inverse allocates in the default dtype."""
    flow = randomize_(builder(3, 2, num_layers=2, hidden_dims=(8,)), scale=0.1).double()
    context = torch.randn(4, 2, dtype=torch.float64)
    d = flow.condition(context)
    x = d.sample((5,))  # MAF: sequential forward; IAF: one pass
    assert x.dtype == torch.float64
    lp = d.log_prob(x.clone())  # IAF: sequential inverse; MAF: one pass
    assert lp.dtype == torch.float64 and torch.isfinite(lp).all()
    assert d.base_dist.mean.dtype == torch.float64


def test_base_distribution_moves_with_the_flow():
    """Pyro issue 2761: ``.to(device)`` must move the base distribution too."""
    flow = flows.nsf(2)
    names = {name for name, _ in flow.named_buffers()}
    assert {"base.loc", "base.scale"} <= names
    flow = flow.to(torch.float64)
    assert flow().base_dist.mean.dtype == torch.float64


@pytest.mark.gpu
def test_flow_moves_to_cuda():
    flow = flows.nsf(2, 3).to("cuda")
    d = flow.condition(torch.randn(4, 3, device="cuda"))
    assert d.base_dist.mean.device.type == "cuda"
    assert d.sample((2,)).device.type == "cuda"


def test_conditional_flow_samples_a_context_batch_without_expanding_the_base():
    flow = flows.nsf(2, 3, num_layers=2)
    d = flow.condition(torch.randn(6, 3))
    assert d.sample().shape == (6, 2)
    assert d.sample((4,)).shape == (4, 6, 2)
    # The same through Pyro's ConditionalTransformedDistribution with pyroflows layers.
    pyro_dist = dist.ConditionalTransformedDistribution(
        dist.Normal(torch.zeros(2), 1.0).to_event(1), list(flow.layers)
    ).condition(torch.randn(6, 3))
    assert pyro_dist.log_prob(torch.randn(6, 2)).shape == (6,)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-3), (torch.float64, 1e-9)])
def test_spline_layer_inverse_with_large_conditioner_outputs(dtype, tol):
    """Pyro and nflows raise on a negative discriminant; zuko can return NaN in float32."""
    torch.manual_seed(0)
    layer = Coupling(
        8, RationalQuadraticSpline(count_bins=8), hidden_dims=(32,), mask=torch.arange(8) < 4
    )
    # Conditioner outputs of size ~ 5 * randn: zero the network and put the scale in the bias.
    with torch.no_grad():
        for p in layer.conditioner.parameters():
            p.zero_()
        last = layer.conditioner.net[-1]
        last.bias.copy_(5 * torch.randn(last.bias.shape))
        last.weight.copy_(0.5 * torch.randn(last.weight.shape))
    layer = layer.to(dtype)
    y = torch.randn(10_000, 8, dtype=dtype) * 3
    x, ladj_inv = layer.inv_and_ladj(y)
    y_back, ladj = layer.call_and_ladj(x)
    assert torch.isfinite(x).all() and torch.isfinite(ladj_inv).all()
    assert (y_back - y).abs().max() <= tol
