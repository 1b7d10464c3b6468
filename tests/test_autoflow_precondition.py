"""`AutoFlow`'s preconditioning, its start points, the sticking-the-landing estimator and the
set-up checks, against posteriors known in closed form."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions import constraints
from pyro.infer import Trace_ELBO

from pyroflows.infer import AutoFlow, train_guide
from pyroflows.infer.autoflow import init_to_median_or_zero
from pyroflows.infer.laplace import laplace_preconditioner

F64 = torch.float64


@pytest.fixture(autouse=True)
def _clean_param_store():
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


# -- the Laplace preconditioner on its own -------------------------------------------------


def _gaussian(mean: torch.Tensor, cov: torch.Tensor):
    precision = torch.linalg.inv(cov)
    return lambda u: 0.5 * (u - mean) @ precision @ (u - mean)


def test_full_preconditioner_is_the_exact_gaussian():
    sd = torch.tensor([30.0, 1.0, 1e-3], dtype=F64)
    corr = torch.tensor([[1.0, -0.999, 0.02], [-0.999, 1.0, 0.0], [0.02, 0.0, 1.0]], dtype=F64)
    cov = sd[:, None] * corr * sd
    mean = torch.tensor([100.0, -3.0, 0.5], dtype=F64)
    centre, scale, record = laplace_preconditioner(_gaussian(mean, cov), torch.zeros(3, dtype=F64))
    assert record.form == "full" and record.centre == "mode" and record.iterations <= 5
    torch.testing.assert_close(centre, mean)
    torch.testing.assert_close(scale @ scale.T, cov, rtol=1e-6, atol=1e-12)
    assert bool((scale.triu(1) == 0).all())


def test_diagonal_preconditioner_finds_the_mode_and_the_diagonal():
    var = torch.tensor([1e-4, 1.0, 25.0, 4.0], dtype=F64)
    mean = torch.tensor([1.0, -2.0, 3.0, 0.0], dtype=F64)
    f = _gaussian(mean, torch.diag(var))
    centre, scale, record = laplace_preconditioner(f, torch.zeros(4, dtype=F64), form="diagonal")
    assert record.form == "diagonal" and record.centre == "mode"
    torch.testing.assert_close(centre, mean, rtol=0, atol=1e-5)
    torch.testing.assert_close(scale, var.sqrt())  # random-sign probes are exact on a diagonal


def test_no_finite_mode_keeps_the_start_and_gives_flat_directions_unit_scale():
    # a centred hierarchy (x_j ~ N(0, e^v), half-Cauchy scale, on log scale): the density
    # grows without bound as v -> -inf at x = 0
    def funnel(u):
        v, x = u[0], u[1:]
        return (
            0.5 * (x**2).sum() * torch.exp(-2 * v)
            + (len(x) - 1) * v
            + torch.log1p(torch.exp(2 * v) / 25)
        )

    start = torch.tensor([1.0, 0.3, -0.2], dtype=F64)
    centre, scale, record = laplace_preconditioner(funnel, start, max_iter=30)
    assert record.centre == "start" and "kept the start point" in record.message
    torch.testing.assert_close(centre, start)
    torch.testing.assert_close(scale, torch.eye(3, dtype=F64))
    # a saddle: one direction of negative curvature gets unit scale
    centre, scale, record = laplace_preconditioner(
        lambda u: u[0] ** 2 - 0.25 * u[1] ** 2, torch.zeros(2, dtype=F64), search=False
    )
    assert "1 of 2 directions" in record.message
    torch.testing.assert_close(scale @ scale.T, torch.diag(torch.tensor([0.5, 1.0], dtype=F64)))


def _two_lobes(gap: float):
    """Two Gaussian lobes of sd 0.4 at (+-2, 0); the left one ``gap`` nats lower."""
    centres = torch.tensor([[2.0, 0.0], [-2.0, 0.0]], dtype=F64)
    offsets = torch.tensor([0.0, -gap], dtype=F64)

    def f(u):
        return -torch.logsumexp(offsets - 0.5 * ((u - centres) / 0.4).pow(2).sum(-1), 0)

    return f


def test_several_modes_of_comparable_mass_keep_the_start():
    """Two lobes: one Laplace approximation would pin the guide to one of them, so the start
    point is kept with L = I; a lobe 8 nats lower is negligible and the higher mode is used."""
    start = torch.zeros(2, dtype=F64)  # a saddle between the lobes: its own search fails
    centre, scale, record = laplace_preconditioner(_two_lobes(0.0), start, starts=4)
    assert record.centre == "start" and "2 distinct modes" in record.message
    torch.testing.assert_close(centre, start)
    torch.testing.assert_close(scale, torch.eye(2, dtype=F64))
    centre, scale, record = laplace_preconditioner(_two_lobes(8.0), start, starts=4)
    assert record.centre == "mode"
    torch.testing.assert_close(centre, torch.tensor([2.0, 0.0], dtype=F64))
    torch.testing.assert_close(scale @ scale.T, 0.16 * torch.eye(2, dtype=F64))


def test_bad_preconditioner_options():
    f = _gaussian(torch.zeros(2), torch.eye(2))
    with pytest.raises(ValueError, match="form"):
        laplace_preconditioner(f, torch.zeros(2), form="lowrank")
    with pytest.raises(ValueError, match="max_iter must be an integer >= 1, got 0"):
        laplace_preconditioner(f, torch.zeros(2), max_iter=0)
    with pytest.raises(ValueError, match="starts must be an integer >= 1, got True"):
        laplace_preconditioner(f, torch.zeros(2), starts=True)
    with pytest.raises(ValueError, match="vector"):
        laplace_preconditioner(f, torch.zeros(2, 1))


@pytest.mark.parametrize("form", ["full", "diagonal"])
def test_preconditioner_leaves_the_global_rng_alone(form):
    f = _gaussian(torch.zeros(3), torch.eye(3))
    torch.manual_seed(0)
    expected = torch.rand(4)
    torch.manual_seed(0)
    laplace_preconditioner(f, torch.ones(3), form=form, starts=3)
    assert torch.equal(torch.rand(4), expected)


# -- AutoFlow on posteriors known in closed form -------------------------------------------


def _ill_conditioned_regression(seed: int = 0):
    """Linear regression with known noise and a wide normal prior: an exact Gaussian
    posterior whose sds span about 1e-3 to 30, with a -0.99 correlation."""
    g = torch.Generator().manual_seed(seed)
    n = 40
    t = torch.randn(n, generator=g, dtype=F64)
    X = torch.stack(
        [
            300.0 * t,  # sd ~ 1e-3
            1.0 + 0.01 * torch.randn(n, generator=g, dtype=F64),  # ~ intercept: correlated
            torch.ones(n, dtype=F64),
            0.05 * torch.randn(n, generator=g, dtype=F64),  # sd ~ 30
        ],
        -1,
    )
    beta = torch.tensor([0.5, 2.0, -1.0, 10.0], dtype=F64)
    y = X @ beta + 1.0 * torch.randn(n, generator=g, dtype=F64)
    prior_sd = 100.0

    def model(X, y):
        b = pyro.sample("b", dist.Normal(torch.zeros(4, dtype=F64), prior_sd).to_event(1))
        with pyro.plate("n", len(y)):
            pyro.sample("y", dist.Normal((X * b).sum(-1), 1.0), obs=y)

    precision = X.T @ X + torch.eye(4, dtype=F64) / prior_sd**2
    cov = torch.linalg.inv(precision)
    return model, (X, y), cov @ (X.T @ y), cov


def test_ill_conditioned_regression_is_recovered():
    model, args, mean, cov = _ill_conditioned_regression()
    sd = cov.diagonal().sqrt()
    assert float(sd.max() / sd.min()) > 1e4
    torch.manual_seed(0)
    guide = AutoFlow(model, model_args=args)
    assert guide.preconditioning.form == "full" and guide.preconditioning.centre == "mode"
    # 500 steps: at 300 the mean error over seeds 0-3 ranged 0.005-0.056 sd (Adam's first
    # steps turn rounding-level gradients at the mode into full-size moves); at 500, <= 0.013
    train_guide(model, guide, *args, max_steps=500, progress=False)
    b = guide.sample_posterior(20_000)["b"]
    assert float(((b.mean(0) - mean) / sd).abs().max()) < 0.05
    assert float((b.std(0) / sd).log().abs().max()) < 0.05
    corr = torch.corrcoef(b.T)[0, 1]
    assert abs(float(corr) - float(cov[0, 1] / (sd[0] * sd[1]))) < 0.02


def test_flat_prior_regression_works_with_the_defaults():
    """Flat priors on the coefficients and on sigma > 0 (improper): the marginal posterior of
    the coefficients is a Student t with n - p - 1 degrees of freedom around least squares."""
    g = torch.Generator().manual_seed(1)
    n, p = 30, 2
    X = torch.stack([torch.ones(n), 50.0 + 10.0 * torch.randn(n, generator=g)], -1)
    y = X @ torch.tensor([1000.0, 3.0]) + 20.0 * torch.randn(n, generator=g)

    def model(X, y):
        b = pyro.sample("b", dist.ImproperUniform(constraints.real_vector, (), (p,)))
        sigma = pyro.sample("sigma", dist.ImproperUniform(constraints.positive, (), ()))
        with pyro.plate("n", n):
            pyro.sample("y", dist.Normal((X * b).sum(-1), sigma), obs=y)

    ols = torch.linalg.lstsq(X, y[:, None]).solution[:, 0]
    rss = float(((y - X @ ols) ** 2).sum())
    nu = n - p - 1
    t_cov = torch.linalg.inv(X.T @ X) * rss / nu * nu / (nu - 2)
    torch.manual_seed(0)
    guide = AutoFlow(model, model_args=(X, y))
    record = guide.preconditioning
    assert record.centre == "mode", record
    # the start was the unconstrained zero; the guide now sits at the mode
    torch.testing.assert_close(guide.flow.layers[-1].loc[:p], ols, rtol=1e-3, atol=1e-2)
    train_guide(model, guide, X, y, max_steps=400, progress=False)
    b = guide.sample_posterior(20_000)["b"]
    sd = t_cov.diagonal().sqrt()
    assert float(((b.mean(0) - ols) / sd).abs().max()) < 0.1
    assert float((b.std(0) / sd).log().abs().max()) < 0.1


def test_init_to_median_or_zero_handles_flat_sites():
    def model():
        pyro.sample("a", dist.ImproperUniform(constraints.real, (3,), ()))
        pyro.sample("s", dist.ImproperUniform(constraints.positive, (), ()))
        pyro.sample("m", dist.Normal(5.0, 0.001))

    trace = pyro.poutine.trace(
        pyro.infer.autoguide.initialization.InitMessenger(init_to_median_or_zero)(model)
    ).get_trace()
    assert trace.nodes["a"]["value"].tolist() == [0.0, 0.0, 0.0]
    assert float(trace.nodes["s"]["value"]) == 1.0
    assert float(trace.nodes["m"]["value"]) == pytest.approx(5.0, abs=0.01)


def _eight_schools_centred():
    y = torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
    sigma = torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])

    def model(y, sigma):
        mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
        tau = pyro.sample("tau", dist.HalfCauchy(5.0))
        with pyro.plate("schools", len(y)):
            theta = pyro.sample("theta", dist.Normal(mu, tau))
            pyro.sample("y", dist.Normal(theta, sigma), obs=y)

    return model, (y, sigma)


def test_funnel_trains_and_is_no_worse_than_without_preconditioning():
    """The centred eight schools: a funnel whose density is unbounded towards its neck
    (the search may stop at a local mode); the guide must train and end no worse (ELBO) than
    the unpreconditioned guide with the same budget."""
    model, args = _eight_schools_centred()
    final = {}
    for precondition in ("auto", "off"):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        guide = AutoFlow(model, model_args=args, precondition=precondition)
        history = train_guide(model, guide, *args, max_steps=600, progress=False)
        assert history.nonfinite_steps == 0
        final[precondition] = history.final_loss
    assert final["auto"] <= final["off"] + 0.3, final


# -- the sticking-the-landing estimator -----------------------------------------------------


def _conjugate_normal():
    data = torch.tensor([0.3, 1.2, -0.4, 2.0, 0.9])

    def model(data):
        mu = pyro.sample("mu", dist.Normal(torch.zeros(2), 2.0).to_event(1))
        with pyro.plate("n", len(data)):
            pyro.sample(
                "x",
                dist.Normal(mu[..., :1] + 0.5 * mu[..., 1:], 1.0).to_event(1),
                obs=data[:, None],
            )

    return model, data


@pytest.mark.parametrize("stl", [True, False])
def test_path_derivative_vanishes_at_the_exact_posterior(stl):
    """A Gaussian posterior and a Gaussian guide at it (Laplace is exact): the
    sticking-the-landing gradient is zero for every draw; the total gradient is not."""
    model, data = _conjugate_normal()
    guide = AutoFlow(model, model_args=(data,), num_layers=0, stick_the_landing=stl)
    assert guide.preconditioning.centre == "mode"
    elbo = Trace_ELBO(num_particles=8, vectorize_particles=True, max_plate_nesting=1)
    elbo.loss_and_grads(model, guide, data)
    grads = torch.cat([p.grad.flatten() for p in guide.parameters()])
    if stl:
        assert float(grads.abs().max()) < 1e-4
    else:
        assert float(grads.abs().max()) > 1e-2


@pytest.mark.parametrize("layers", ["spline", "affine"])
def test_path_derivative_of_own_draws_equals_the_inverted_one(layers):
    """Own draws are scored through the Jacobian of one batched pass; any other value by
    inverting the flow with its parameters stopped. Same value, same gradient."""
    model, data = _conjugate_normal()
    guide = AutoFlow(model, model_args=(data,), layers=layers, stick_the_landing=True)
    with torch.no_grad():  # away from the optimum, so the path derivative is not zero
        for p in guide.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    posterior = guide.get_posterior().expand((8,))
    z = posterior.rsample((3,))  # shape (3, 8, D): sample and batch dims
    results = []
    for value in (z, z * 1.0):  # the draw itself, then a copy (the inverted path)
        log_q = posterior.log_prob(value)
        grads = torch.autograd.grad(log_q.sum(), list(guide.parameters()), retain_graph=True)
        results.append((log_q, torch.cat([g.flatten() for g in grads])))
    (fast, fast_grad), (inverted, inverted_grad) = results
    torch.testing.assert_close(fast, inverted, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast_grad, inverted_grad, rtol=1e-4, atol=1e-5)
    assert float(fast_grad.abs().max()) > 1e-3


def test_path_derivative_of_many_draws_inverts_the_flow(monkeypatch):
    """Beyond `JACOBIAN_MAX_ROWS` own draws are scored by the inversion: same draws (same
    seed), same log q and gradient as through the Jacobian."""
    from pyroflows.infer import autoflow as autoflow_module

    model, data = _conjugate_normal()
    guide = AutoFlow(model, model_args=(data,), stick_the_landing=True)
    results = []
    for max_rows in (autoflow_module.JACOBIAN_MAX_ROWS, 0):
        monkeypatch.setattr(autoflow_module, "JACOBIAN_MAX_ROWS", max_rows)
        posterior = guide.get_posterior()
        torch.manual_seed(3)
        z = posterior.rsample((5,))
        assert (posterior._draw is None) == (max_rows == 0)
        log_q = posterior.log_prob(z)
        grads = torch.autograd.grad(log_q.sum(), list(guide.parameters()))
        results.append((z, log_q, torch.cat([g.flatten() for g in grads])))
    for jacobian, inverted in zip(*results, strict=True):
        torch.testing.assert_close(jacobian, inverted, rtol=1e-4, atol=1e-5)


def test_default_path_derivative_gives_way_to_the_plain_gradient_for_many_draws(monkeypatch):
    """By default, draws beyond `JACOBIAN_MAX_ROWS` get the plain gradient (the flow's own
    log q): the same value and gradient as ``stick_the_landing=False`` on the same draws."""
    from pyroflows.infer import autoflow as autoflow_module

    model, data = _conjugate_normal()
    monkeypatch.setattr(autoflow_module, "JACOBIAN_MAX_ROWS", 0)
    results = []
    for stl in (None, False):
        torch.manual_seed(0)
        guide = AutoFlow(model, model_args=(data,), stick_the_landing=stl)
        assert guide.stick_the_landing == (stl is None)
        posterior = guide.get_posterior()
        torch.manual_seed(3)
        z = posterior.rsample((5,))
        log_q = posterior.log_prob(z)
        params = list(guide.parameters())
        grads = torch.autograd.grad(log_q.sum(), params, allow_unused=True)
        pairs = zip(params, grads, strict=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in pairs]
        results.append((z, log_q, torch.cat([g.flatten() for g in grads])))
    for default, plain in zip(*results, strict=True):
        torch.testing.assert_close(default, plain)
    assert float(results[0][2].abs().max()) > 1e-3  # not the (zero-mean) stopped score alone


def test_path_derivative_is_the_default_only_at_a_mode_in_small_dimensions():
    model, data = _conjugate_normal()
    assert AutoFlow(model, model_args=(data,)).stick_the_landing
    assert not AutoFlow(model, model_args=(data,), precondition="off").stick_the_landing
    wide = AutoFlow(model, model_args=(data,), mode_iterations=0)  # not at a mode
    assert wide.preconditioning.centre != "mode" and not wide.stick_the_landing


# -- set-up: records, forms, refusals -------------------------------------------------------


def test_record_and_repr():
    model, data = _conjugate_normal()
    guide = AutoFlow(model, model_args=(data,))
    text = repr(guide)
    assert "preconditioning: full preconditioner at the mode" in text
    assert guide.preconditioning.seconds >= 0 and guide.preconditioning.iterations >= 1
    assert "not set up" in repr(AutoFlow(model))
    off = AutoFlow(model, model_args=(data,), precondition="off")
    assert off.preconditioning.form == "off"
    torch.testing.assert_close(off.flow.layers[-1].log_scale.exp(), torch.full((2,), 0.1))
    diagonal = AutoFlow(model, model_args=(data,), precondition="diagonal")
    assert diagonal.flow.layers[-1].scale.shape == (2,)


def test_subsampled_model_is_not_preconditioned():
    data = torch.randn(100)

    def model(data):
        mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        with pyro.plate("n", len(data), subsample_size=10) as idx:
            pyro.sample("x", dist.Normal(mu, 1.0), obs=data[idx])

    guide = AutoFlow(model, model_args=(data,))
    assert guide.preconditioning.form == "off"
    assert "subsamples" in guide.preconditioning.message


def test_dependent_support_is_refused_at_setup():
    def model():
        a = pyro.sample("a", dist.Gamma(2.0, 1.0))
        pyro.sample("b", dist.Uniform(0.0, a))

    with pytest.raises(ValueError, match="support of latent site 'b' depends on other latent"):
        AutoFlow(model, model_args=())


def test_load_state_dict_before_setup_says_how():
    model, data = _conjugate_normal()
    state = AutoFlow(model, model_args=(data,)).state_dict()
    with pytest.raises(RuntimeError, match=r"model_args=.*guide.setup"):
        AutoFlow(model).load_state_dict(state)
    fresh = AutoFlow(model, model_args=(data,))
    fresh.load_state_dict(state)


def test_bad_autoflow_options():
    with pytest.raises(ValueError, match="precondition"):
        AutoFlow(lambda: None, precondition="yes")
    with pytest.raises(ValueError, match="mode_iterations must be an integer >= 0, got -1"):
        AutoFlow(lambda: None, mode_iterations=-1)
    with pytest.raises(ValueError, match="mode_starts must be an integer >= 1, got 0"):
        AutoFlow(lambda: None, mode_starts=0)
    with pytest.raises(ValueError, match="init_scale"):
        AutoFlow(lambda: None, init_scale=math.inf)
