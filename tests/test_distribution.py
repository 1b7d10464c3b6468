"""Flow distributions and builders: shapes, densities, validation, Pyro integration."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import ClippedAdam

from pyroflows import Flow, FlowDistribution, flows
from pyroflows.testing import randomize_

BUILDERS = {
    "nsf": lambda d, c: flows.nsf(d, c, num_layers=2, hidden_dims=(16,)),
    "nsf_coupling": lambda d, c: flows.nsf(d, c, coupling=True, num_layers=2, hidden_dims=(16,)),
    "nsf_iaf": lambda d, c: flows.nsf(d, c, invert=False, num_layers=2, hidden_dims=(16,)),
    "maf": lambda d, c: flows.maf(d, c, num_layers=2, hidden_dims=(16,)),
    "iaf": lambda d, c: flows.iaf(d, c, num_layers=2, hidden_dims=(16,)),
    "realnvp": lambda d, c: flows.realnvp(d, c, num_layers=2, hidden_dims=(16,)),
    "nice": lambda d, c: flows.nice(d, c, num_layers=2, hidden_dims=(16,)),
}


def build(name, d, c, dtype, device, scale=0.2):
    return randomize_(BUILDERS[name](d, c), scale=scale).to(dtype=dtype, device=device)


@pytest.mark.parametrize("name", BUILDERS)
def test_shapes_follow_sample_batch_event(name, dtype, device):
    flow = build(name, 3, 2, dtype, device)
    context = torch.randn(5, 2, dtype=dtype, device=device)
    d = flow.condition(context)
    assert isinstance(d, FlowDistribution) and isinstance(d, dist.TransformedDistribution)
    assert d.batch_shape == (5,) and d.event_shape == (3,)
    assert d.sample().shape == (5, 3)  # no manual expansion of the base needed
    x = d.sample((4,))
    assert x.shape == (4, 5, 3)
    assert d.log_prob(x).shape == (4, 5)
    x, lp = d.rsample_and_log_prob((4,))
    assert x.shape == (4, 5, 3) and lp.shape == (4, 5)
    # One context (C,) gives batch shape ().
    assert flow.condition(context[0]).sample((4,)).shape == (4, 3)


@pytest.mark.parametrize("name", ["nsf", "nsf_coupling", "maf", "realnvp", "nice"])
def test_density_integrates_to_one(name, device):
    flow = build(name, 2, 0, torch.float64, device, scale=0.15)
    grid = torch.linspace(-9, 9, 361, dtype=torch.float64, device=device)
    xx, yy = torch.meshgrid(grid, grid, indexing="ij")
    points = torch.stack([xx, yy], -1).reshape(-1, 2)
    with torch.no_grad():
        density = flow().log_prob(points).exp()
    mass = float(density.sum()) * float(grid[1] - grid[0]) ** 2
    assert abs(mass - 1.0) < 1e-2, mass


@pytest.mark.parametrize("name", BUILDERS)
def test_rsample_log_prob_matches_log_prob_and_generic_pyro_path(name, dtype, device, tol):
    flow = build(name, 3, 2, dtype, device)
    context = torch.randn(4, 2, dtype=dtype, device=device)
    d = flow.condition(context)
    x, lp = d.rsample_and_log_prob((6,))
    fresh = flow.condition(context)
    torch.testing.assert_close(fresh.log_prob(x.clone()), lp, atol=100 * tol, rtol=100 * tol)
    generic = dist.TransformedDistribution(d.base_dist, d.transforms)
    torch.testing.assert_close(generic.log_prob(x.clone()), lp, atol=100 * tol, rtol=100 * tol)


def _count_conditioner_calls(flow):
    calls = []
    for layer in flow.layers:
        if hasattr(layer, "conditioner"):
            layer.conditioner.register_forward_hook(lambda *a: calls.append(1))
    return calls


@pytest.mark.parametrize("name", ["iaf", "nsf_iaf"])
def test_iaf_scores_its_own_samples_without_sequential_passes(name, dtype, device, tol):
    """Fresh samples are scored from the forward pass, not by a D-pass inversion."""
    d_in = 6
    flow = build(name, d_in, 0, dtype, device)
    calls = _count_conditioner_calls(flow)
    d = flow()
    x = d.rsample((10,))
    assert len(calls) == len(flow.layers)  # one pass per layer to sample
    lp = d.log_prob(x)
    assert len(calls) == len(flow.layers)  # scoring the fresh sample: no pass at all
    # Any other tensor is recomputed, by inversion: D passes per layer, same value.
    lp_recomputed = d.log_prob(x.clone())
    assert len(calls) == len(flow.layers) * (1 + d_in)
    torch.testing.assert_close(lp, lp_recomputed, atol=100 * tol, rtol=100 * tol)


def test_pyro_svi_uses_the_fresh_sample_score(dtype, device):
    flow = build("iaf", 4, 0, dtype, device)
    calls = _count_conditioner_calls(flow)

    def model():
        pyro.sample("z", dist.Normal(torch.ones(4, dtype=dtype, device=device), 1.0).to_event(1))

    def guide():
        pyro.module("flow", flow)
        pyro.sample("z", flow())

    loss = Trace_ELBO().differentiable_loss(model, guide)
    loss.backward()
    assert len(calls) == len(flow.layers)
    assert all(p.grad is not None for p in flow.parameters())


def test_cached_score_respects_grad_mode(dtype, device):
    flow = build("iaf", 3, 0, dtype, device)
    d = flow()
    x = d.sample((5,))  # no_grad sample: not cached
    lp = d.log_prob(x)
    assert lp.requires_grad
    with torch.no_grad():
        x, lp0 = d.rsample_and_log_prob((5,))
    assert d.log_prob(x).requires_grad  # recomputed with grad, not the no-grad cache
    torch.testing.assert_close(d.log_prob(x).detach(), lp0)


def test_maximum_likelihood_recovers_a_correlated_gaussian():
    """MLE with a MAF on samples of a known Gaussian reaches its entropy on held-out data."""
    torch.manual_seed(0)
    cov = torch.tensor([[1.0, 0.8], [0.8, 1.0]]) * 2.0
    target = dist.MultivariateNormal(torch.tensor([1.0, -2.0]), cov)
    train, test = target.sample((4000,)), target.sample((4000,))
    flow = flows.maf(2, num_layers=3, hidden_dims=(32,))
    opt = torch.optim.Adam(flow.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 600)
    for _ in range(600):
        batch = train[torch.randint(len(train), (512,))]
        loss = -flow().log_prob(batch).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        held_out = float(flow().log_prob(test).mean())
        truth = float(target.log_prob(test).mean())
        samples = flow().sample((20000,))
    assert held_out > truth - 0.03, (held_out, truth)
    torch.testing.assert_close(samples.mean(0), target.mean, atol=0.06, rtol=0)
    torch.testing.assert_close(torch.cov(samples.T), cov, atol=0.15, rtol=0)


def test_inside_a_pyro_model_with_a_plate(dtype, device):
    flow = build("nsf_coupling", 2, 3, dtype, device)
    data = torch.randn(8, 2, dtype=dtype, device=device)
    context = torch.randn(8, 3, dtype=dtype, device=device)

    def model():
        pyro.module("flow", flow)
        with pyro.plate("rows", 8):
            pyro.sample("x", flow.condition(context), obs=data)

    trace = pyro.poutine.trace(model).get_trace()
    torch.testing.assert_close(trace.log_prob_sum(), flow.condition(context).log_prob(data).sum())
    # A distribution without context expands to the plate's batch shape.
    unconditional = build("maf", 2, 0, dtype, device)

    def model2():
        with pyro.plate("rows", 8):
            pyro.sample("x", unconditional(), obs=data)

    trace = pyro.poutine.trace(model2).get_trace()
    assert trace.nodes["x"]["fn"].batch_shape == (8,)
    torch.testing.assert_close(trace.log_prob_sum(), unconditional().log_prob(data).sum())


def test_svi_fits_a_normal_posterior():
    """A flow guide recovers the exact posterior of a Normal-Normal model."""
    pyro.clear_param_store()
    torch.manual_seed(0)
    data = torch.randn(20) + 3.0
    # Prior N(0, 10^2) per coordinate, likelihood N(z, 1): posterior is Gaussian.
    post_var = 1.0 / (1.0 / 100.0 + 20.0)
    post_mean = post_var * data.sum()
    flow = flows.iaf(2, num_layers=2, hidden_dims=(16,))

    def model():
        z = pyro.sample("z", dist.Normal(torch.zeros(2), 10.0).to_event(1))
        with pyro.plate("data", 20):
            pyro.sample("obs", dist.Normal(z, 1.0).to_event(1), obs=data[:, None].expand(20, 2))

    def guide():
        pyro.module("flow", flow)
        pyro.sample("z", flow())

    optim = ClippedAdam({"lr": 0.02, "lrd": 0.05 ** (1 / 1500)})
    svi = SVI(model, guide, optim, Trace_ELBO(num_particles=8, vectorize_particles=True))
    for _ in range(1500):
        svi.step()
    with torch.no_grad():
        z = flow().sample((20000,))
    post_sd = math.sqrt(post_var)  # SGD noise of the final iterates is ~0.15 sd
    torch.testing.assert_close(z.mean(0), post_mean.expand(2), atol=0.25 * post_sd, rtol=0)
    torch.testing.assert_close(z.std(0), torch.full((2,), post_sd), atol=0.1 * post_sd, rtol=0)


class TestBadInput:
    def test_wrong_event_size(self, dtype, device):
        flow = build("maf", 3, 0, dtype, device)
        with pytest.raises(ValueError, match=r"shape \(\.\.\., 3\)"):
            flow().log_prob(torch.zeros(5, 4, dtype=dtype, device=device))

    def test_context_for_unconditional_flow(self, dtype, device):
        flow = build("maf", 3, 0, dtype, device)
        with pytest.raises(ValueError, match="unconditional"):
            flow.condition(torch.zeros(5, 2, dtype=dtype, device=device))

    def test_missing_context(self, dtype, device):
        flow = build("maf", 3, 2, dtype, device)
        with pytest.raises(ValueError, match="needs a context"):
            flow()

    def test_mis_shaped_context(self, dtype, device):
        flow = build("maf", 3, 2, dtype, device)
        with pytest.raises(ValueError, match=r"context of shape \(\.\.\., 2\)"):
            flow.condition(torch.zeros(5, 3, dtype=dtype, device=device))

    def test_context_batch_not_broadcasting_with_values(self, dtype, device):
        flow = build("maf", 3, 2, dtype, device)
        d = flow.condition(torch.zeros(5, 2, dtype=dtype, device=device))
        with pytest.raises(ValueError, match="do not broadcast"):
            d.log_prob(torch.zeros(4, 3, dtype=dtype, device=device))

    def test_nan_values_and_context_follow_validate_args(self, dtype, device):
        flow = build("maf", 3, 2, dtype, device)
        context = torch.zeros(5, 2, dtype=dtype, device=device)
        x = torch.zeros(5, 3, dtype=dtype, device=device)
        x[2, 1] = float("nan")
        bad_context = context.clone()
        bad_context[0, 0] = float("inf")
        with pytest.raises(ValueError, match="NaN or Inf"):
            flow.condition(context).log_prob(x)
        with pytest.raises(ValueError, match="NaN or Inf"):
            flow.condition(bad_context)
        pyro.enable_validation(False)
        try:
            assert torch.isnan(flow.condition(context).log_prob(x)[2])
            flow.condition(bad_context)
        finally:
            pyro.enable_validation(True)

    def test_integer_context(self, device):
        flow = flows.maf(3, 2)
        with pytest.raises(ValueError, match="floating point"):
            flow.condition(torch.zeros(5, 2, dtype=torch.long, device=device))

    @pytest.mark.parametrize(
        "kwargs, match",
        [
            ({"count_bins": 0}, "count_bins"),
            ({"num_layers": 0}, "num_layers"),
            ({"hidden_dims": (0,)}, "hidden_dims"),
            ({"bound": 0.0}, "bound"),
        ],
    )
    def test_bad_hyper_parameters(self, kwargs, match):
        with pytest.raises(ValueError, match=match):
            flows.nsf(3, **kwargs)

    def test_bad_dimensions(self):
        with pytest.raises(ValueError, match="input_dim"):
            flows.maf(0)
        with pytest.raises(ValueError, match="context_dim"):
            flows.realnvp(2, -1)

    def test_layers_must_fit_the_flow(self):
        layer = flows.maf(3).layers[0]
        with pytest.raises(ValueError, match="input_dim"):
            Flow([layer], 4)
        with pytest.raises(TypeError, match="FlowModule"):
            Flow([torch.distributions.transforms.ExpTransform()], 3)


class TestMoreBadInput:
    def test_dtype_mismatch(self):
        flow = flows.maf(3, 2)
        with pytest.raises(ValueError, match="dtype torch.float64 but the flow computes in"):
            flow.condition(torch.zeros(2)).log_prob(torch.zeros(3, dtype=torch.float64))
        with pytest.raises(ValueError, match="context has dtype torch.float64"):
            flow.condition(torch.zeros(2, dtype=torch.float64))

    def test_base_must_be_a_module(self):
        with pytest.raises(TypeError, match="nn.Module"):
            Flow([], 2, base=dist.Normal(torch.zeros(2), 1.0).to_event(1))

    def test_coupling_rejects_autoregressive_options(self):
        with pytest.raises(ValueError, match="autoregressive"):
            flows.nsf(3, coupling=True, invert=False)

    def test_empty_hidden_dims(self):
        with pytest.raises(ValueError, match="hidden_dims"):
            flows.maf(3, hidden_dims=())


def test_in_place_change_invalidates_the_fresh_sample_score():
    flow = build("iaf", 3, 0, torch.float32, "cpu")
    d = flow()
    x, lp = d.rsample_and_log_prob((4,))
    with torch.no_grad():
        x.add_(1.0)
    torch.testing.assert_close(d.log_prob(x), flow().log_prob(x.clone()), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(d.log_prob(x), lp)
