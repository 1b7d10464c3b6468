"""Neural posterior estimation (`pyroflows.infer.npe`) and calibration checks."""

from __future__ import annotations

import math

import pyro.distributions as dist
import pytest
import torch

import pyroflows
from pyroflows import flows
from pyroflows.infer import fit_posterior, prior_bounds, simulate
from pyroflows.workflow import c2st, expected_coverage, sbc_ranks


def _box_prior():
    return dist.Uniform(torch.tensor([-1.0, 0.0]), torch.tensor([1.0, 2.0])).to_event(1)


def _noisy(theta):
    return theta + 0.1 * torch.randn_like(theta)


# -- priors and simulations -------------------------------------------------------------------


@pytest.mark.parametrize(
    "prior, expected",
    [
        (_box_prior(), [(-1.0, 1.0), (0.0, 2.0)]),
        (dist.Normal(torch.zeros(2), 1.0).to_event(1), [(None, None), (None, None)]),
        (dist.LogNormal(torch.zeros(3), 1.0).to_event(1), [(0.0, None)] * 3),
        (dist.Exponential(1.0), [(0.0, None)]),
        (dist.Uniform(0.0, 5.0), [(0.0, 5.0)]),
        (dist.Uniform(torch.zeros(2), torch.tensor([1.0, 2.0])), [(0.0, 1.0), (0.0, 2.0)]),
    ],
)
def test_prior_bounds_read_the_support(prior, expected):
    assert prior_bounds(prior) == expected


def test_prior_bounds_refuse_a_simplex():
    with pytest.raises(ValueError, match="not a product of intervals"):
        prior_bounds(dist.Dirichlet(torch.ones(3)))


def test_simulate_is_reproducible_and_leaves_the_global_generator_alone():
    state = torch.random.get_rng_state()
    first = simulate(_box_prior(), _noisy, 250, seed=3, batch_size=100)
    assert torch.equal(torch.random.get_rng_state(), state)
    second = simulate(_box_prior(), _noisy, 250, seed=3, batch_size=100)
    assert first[0].shape == first[1].shape == (250, 2)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_simulate_names_a_simulator_that_drops_rows():
    with pytest.raises(ValueError, match="returned 5 rows for 10 parameters"):
        simulate(_box_prior(), lambda theta: theta[:5], 10)
    with pytest.raises(TypeError, match="must return a tensor"):
        simulate(_box_prior(), lambda theta: theta.tolist(), 10)


# -- the fitted posterior ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def box_posterior():
    theta, x = simulate(_box_prior(), _noisy, 2000, seed=0)
    posterior, history = fit_posterior(theta, x, prior=_box_prior(), epochs=30, progress=False)
    return posterior, history


def test_posterior_has_no_mass_outside_the_prior_support(box_posterior):
    posterior, _ = box_posterior
    observations = torch.tensor([[0.95, 1.9], [-0.99, 0.05], [3.0, -2.0]])  # near and off the box
    with torch.no_grad():
        draws = posterior.condition(observations).sample((2000,))  # (2000, 3, 2)
        outside = posterior.condition(observations[0]).log_prob(torch.tensor([[1.01, 1.0]]))
    assert draws.shape == (2000, 3, 2)
    assert bool((draws[..., 0] > -1).all() and (draws[..., 0] < 1).all())
    assert bool((draws[..., 1] > 0).all() and (draws[..., 1] < 2).all())
    assert float(outside) == -math.inf


def test_posterior_concentrates_on_the_observation(box_posterior):
    posterior, history = box_posterior
    assert history.standardized == "fitted"
    with torch.no_grad():
        draws = posterior.condition(torch.tensor([0.3, 1.2])).sample((4000,))
    torch.testing.assert_close(draws.mean(0), torch.tensor([0.3, 1.2]), atol=0.05, rtol=0)
    assert float(draws.std(0).max()) < 0.3  # the prior's sds are 0.58


def test_posterior_saves_and_loads_like_a_flow(box_posterior, tmp_path):
    posterior, _ = box_posterior
    pyroflows.save(posterior, tmp_path / "posterior.pt")
    loaded = pyroflows.load(tmp_path / "posterior.pt")
    theta = torch.tensor([[0.2, 1.0], [0.5, 0.5]])
    x = torch.tensor([[0.25, 1.1], [0.4, 0.6]])
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.condition(x).log_prob(theta), posterior.condition(x).log_prob(theta)
        )


def test_one_parameter_and_one_output_may_be_vectors():
    prior = dist.Uniform(0.0, 1.0)
    theta, x = simulate(prior, lambda t: t[:, 0] + 0.05 * torch.randn(len(t)), 300)
    assert theta.shape == x.shape == (300, 1)
    posterior, _ = fit_posterior(theta[:, 0], x[:, 0], prior=prior, epochs=2, progress=False)
    with torch.no_grad():
        draws = posterior.condition(torch.tensor([0.5])).sample((200,))
    assert draws.shape == (200, 1) and bool(((draws > 0) & (draws < 1)).all())
    with pytest.raises(ValueError, match=r"theta must have shape \(N, D\)"):
        fit_posterior(torch.zeros(5, 2, 2), x[:5], progress=False)


def test_prior_and_bounds_together_are_refused():
    theta, x = simulate(_box_prior(), _noisy, 50)
    with pytest.raises(ValueError, match="either prior or bounds"):
        fit_posterior(theta, x, prior=_box_prior(), bounds=[(None, None)] * 2, progress=False)


# -- calibration ------------------------------------------------------------------------------


def _prior_as_posterior():
    """A freshly built flow is the identity: ``q(theta | x) = N(0, I)`` whatever ``x``, which
    is the exact posterior of a prior N(0, I) and an uninformative ``x``."""
    flow = flows.nsf(2, 1, num_layers=2, hidden_dims=(8,))
    gen = torch.Generator().manual_seed(0)
    return flow, torch.randn(400, 2, generator=gen), torch.randn(400, 1, generator=gen)


def test_coverage_of_an_exact_posterior_is_the_diagonal():
    flow, theta, x = _prior_as_posterior()
    result = expected_coverage(flow, theta, x, num_samples=500)
    assert result.levels[0] == 0 and result.levels[-1] == 1
    assert result.max_gap < 1.5 * result.sampling_error()


def test_coverage_of_an_overconfident_posterior_is_below_the_diagonal():
    flow, theta, x = _prior_as_posterior()
    result = expected_coverage(flow, 2.0 * theta, x, num_samples=500)  # truth twice as wide
    middle = (result.levels > 0.2) & (result.levels < 0.8)
    assert bool((result.coverage[middle] < result.levels[middle] - 0.15).all())


def test_sbc_ranks_are_uniform_for_an_exact_posterior_and_not_for_a_shifted_one():
    flow, theta, x = _prior_as_posterior()
    ranks = sbc_ranks(flow, theta, x, num_samples=99)  # 100 possible ranks
    assert ranks.shape == (400, 2) and int(ranks.min()) >= 0 and int(ranks.max()) <= 99
    counts = torch.stack([torch.histc(r.double(), bins=4, min=0, max=100) for r in ranks.T])
    chi2 = float(((counts - 100.0) ** 2 / 100.0).sum())  # 6 degrees of freedom
    assert chi2 < 22.5  # the 0.999 quantile
    shifted = sbc_ranks(flow, theta + 1.0, x, num_samples=99)
    assert float(shifted.double().mean()) > 70  # truth above most draws


def test_calibration_refuses_mismatched_pairs():
    flow, theta, x = _prior_as_posterior()
    with pytest.raises(ValueError, match="same N"):
        expected_coverage(flow, theta, x[:10])


def test_gaussian_linear_posterior_is_calibrated():
    """``theta ~ N(0, I)``, ``x = theta + N(0, 0.5^2 I)`` in 3-D; the fitted posterior's
    coverage on 300 fresh pairs stays within sampling error of the diagonal, and its mean
    matches the exact posterior mean ``0.8 x``."""
    prior = dist.Normal(torch.zeros(3), 1.0).to_event(1)

    def simulator(theta):
        return theta + 0.5 * torch.randn_like(theta)

    theta, x = simulate(prior, simulator, 10_000, seed=0)
    posterior, _ = fit_posterior(theta, x, prior=prior, epochs=40, progress=False)
    test_theta, test_x = simulate(prior, simulator, 300, seed=1)
    result = expected_coverage(posterior, test_theta, test_x, num_samples=500)
    assert result.max_gap < 1.5 * result.sampling_error()
    with torch.no_grad():
        draws = posterior.condition(torch.tensor([1.0, -0.5, 0.0])).sample((4000,))
    torch.testing.assert_close(draws.mean(0), torch.tensor([0.8, -0.4, 0.0]), atol=0.05, rtol=0)
    torch.testing.assert_close(draws.std(0), torch.full((3,), 0.2**0.5), atol=0.03, rtol=0)


def test_c2st_tells_apart_only_different_distributions():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(1000, 2, generator=gen), torch.randn(1000, 2, generator=gen)
    same = c2st(a, b, max_epochs=30)
    shifted = c2st(a + torch.tensor([1.5, 0.0]), b, max_epochs=30)
    assert 0.44 < same < 0.56
    assert shifted > 0.75
    assert c2st(a, b, max_epochs=30) == same  # seeded: the same number again
    with pytest.raises(ValueError, match=r"\(N, D\) and \(M, D\)"):
        c2st(a, b[:, :1])


def test_the_seed_alone_decides_the_fit():
    theta = torch.randn(300, 2, generator=torch.Generator().manual_seed(0))
    x = theta + 0.1
    log_probs = []
    for global_seed in (1, 2):  # the caller's generator in different states
        torch.manual_seed(global_seed)
        state = torch.get_rng_state()
        posterior, _ = fit_posterior(theta, x, seed=3, epochs=1, progress=False)
        assert torch.equal(torch.get_rng_state(), state)  # and left untouched
        with torch.no_grad():
            log_probs.append(posterior.condition(x[:5]).log_prob(theta[:5]))
    torch.testing.assert_close(log_probs[0], log_probs[1], rtol=0, atol=0)
