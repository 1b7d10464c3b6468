"""`to_inference_data` and `diagnose`: ArviZ export and PSIS diagnostics of guides."""

from __future__ import annotations

import functools
import math
import warnings

import matplotlib
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import (
    AutoDelta,
    AutoDiagonalNormal,
    AutoIAFNormal,
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
    AutoNormal,
)

from pyroflows import diagnose, to_inference_data
from pyroflows.infer import AutoFlow
from pyroflows.workflow import import_arviz, psis_spread

matplotlib.use("Agg")
az = import_arviz()


# --- a conjugate model with a known posterior and evidence -----------------------------------

A, B = 3.0, 2.0  # Gamma(shape, rate) prior on a Poisson rate
COUNTS = torch.tensor([2.0, 5.0, 3.0, 4.0, 1.0, 6.0], dtype=torch.float64)


def poisson_model(counts):
    rate = pyro.sample("rate", dist.Gamma(torch.tensor(A, dtype=counts.dtype), B))
    with pyro.plate("obs", len(counts)):
        pyro.sample("y", dist.Poisson(rate), obs=counts)


def exact_guide(counts, shift=0.0, widen=1.0):
    """The exact posterior Gamma(A + sum y, B + n), optionally moved and widened (log scale)."""
    post = dist.Gamma(A + counts.sum(), B + len(counts))
    if shift == 0.0 and widen == 1.0:
        pyro.sample("rate", post)
        return
    # a log-normal moment-matched to the posterior, then perturbed
    mean, var = post.mean, post.variance
    s2 = torch.log1p(var / mean**2)
    loc = torch.log(mean) - s2 / 2 + shift * s2.sqrt()
    pyro.sample("rate", dist.LogNormal(loc, widen * s2.sqrt()))


def log_evidence(counts) -> float:
    """log p(y) of the Gamma-Poisson model in closed form."""
    n, total = len(counts), float(counts.sum())
    return (
        A * math.log(B)
        - math.lgamma(A)
        + math.lgamma(A + total)
        - (A + total) * math.log(B + n)
        - sum(math.lgamma(float(c) + 1) for c in counts)
    )


def test_exact_guide_has_constant_weights_equal_to_the_evidence():
    result = diagnose(poisson_model, exact_guide, COUNTS, num_samples=2000, seed=0)
    expected = log_evidence(COUNTS)
    torch.testing.assert_close(
        result.log_weights, torch.full((2000,), expected, dtype=torch.float64), rtol=0, atol=1e-9
    )
    assert result.log_evidence == pytest.approx(expected, abs=1e-9)
    assert result.elbo == pytest.approx(expected, abs=1e-9)
    assert result.ess == pytest.approx(2000, rel=1e-6)
    assert result.trustworthy


def test_seed_reproduces_draws_and_leaves_the_global_generators_alone():
    import random

    torch.manual_seed(123)
    before = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    guide = functools.partial(exact_guide, shift=0.5)
    first = diagnose(poisson_model, guide, COUNTS, num_samples=200, seed=7)
    second = diagnose(poisson_model, guide, COUNTS, num_samples=200, seed=7)
    torch.testing.assert_close(first.log_weights, second.log_weights, rtol=0, atol=0)
    assert torch.equal(torch.get_rng_state(), before[0])
    assert np.array_equal(np.random.get_state()[1], before[1]) and random.getstate() == before[2]


def test_parallel_and_sequential_draws_score_alike():
    """Vectorised and one-at-a-time drawing give the same weights for the exact guide."""
    seq = diagnose(poisson_model, exact_guide, COUNTS, num_samples=50, parallel=False, seed=1)
    torch.testing.assert_close(
        seq.log_weights, torch.full((50,), log_evidence(COUNTS), dtype=torch.float64)
    )
    assert seq.samples["rate"].shape == (50,)


def test_too_narrow_guide_is_flagged():
    guide = functools.partial(exact_guide, shift=1.5, widen=0.3)
    result = diagnose(poisson_model, guide, COUNTS, num_samples=4000, seed=0)
    assert result.khat > 0.7
    assert not result.trustworthy
    assert "do not trust" in result.verdict
    assert "do not trust" in str(result)


def test_slightly_wide_guide_is_trusted_and_reweighting_fixes_its_bias():
    post = dist.Gamma(A + COUNTS.sum(), B + len(COUNTS))
    guide = functools.partial(exact_guide, shift=0.5, widen=1.3)
    result = diagnose(poisson_model, guide, COUNTS, num_samples=20000, seed=0)
    assert result.khat < 0.5 and result.trustworthy
    raw_error = abs(float(result.samples["rate"].mean() - post.mean))
    sd = float(post.variance.sqrt())
    assert raw_error > 0.3 * sd  # the guide is visibly off ...
    reweighted = result.posterior["rate"]
    # ... and PSIS resampling recovers the posterior mean and sd (MC error ~ sd / sqrt(ESS))
    tol = 5 * sd / math.sqrt(result.ess)
    assert abs(float(reweighted.mean() - post.mean)) < tol
    assert float(reweighted.std()) == pytest.approx(sd, rel=0.05)


# --- log p and log q against direct computation, for Pyro's autoguides and AutoFlow ----------


def regression_model(x, y):
    w = pyro.sample("w", dist.Normal(torch.zeros(2, dtype=x.dtype), 1.0).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfNormal(torch.tensor(1.0, dtype=x.dtype)))
    with pyro.plate("groups", 3, dim=-2):
        offset = pyro.sample("offset", dist.Normal(torch.tensor(0.0, dtype=x.dtype), 1.0))
        with pyro.plate("data", x.shape[0], dim=-1):
            mean = offset + x[:, 0] * w[..., 0] + x[:, 1] * w[..., 1]
            pyro.sample("y", dist.Normal(mean, sigma), obs=y)


def regression_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 2, generator=g, dtype=torch.float64)
    y = torch.randn(3, 10, generator=g, dtype=torch.float64) + x @ torch.tensor(
        [1.0, -0.5], dtype=torch.float64
    )
    return x, y


GUIDES = {
    "AutoNormal": lambda m: AutoNormal(m),
    "AutoDiagonalNormal": lambda m: AutoDiagonalNormal(m),
    "AutoMultivariateNormal": lambda m: AutoMultivariateNormal(m),
    "AutoLowRank": lambda m: AutoLowRankMultivariateNormal(m),
    "AutoIAFNormal": lambda m: AutoIAFNormal(m, hidden_dim=[8]),
    "AutoFlow": lambda m: AutoFlow(m, num_layers=1, hidden_dims=(8,)),
}


@pytest.mark.parametrize("name", list(GUIDES))
def test_log_weights_match_a_direct_computation(name):
    x, y = regression_data()
    guide = GUIDES[name](regression_model)
    guide(x, y)  # create parameters
    if name != "AutoFlow":
        guide.double()
    with warnings.catch_warnings():
        # Pyro's AutoIAFNormal cannot score new points after .double() (its masks stay
        # float32): the mass check is skipped with a warning, the rest must work
        warnings.simplefilter("ignore" if name == "AutoIAFNormal" else "error")
        result = diagnose(regression_model, guide, x, y, num_samples=30, chunk_size=7, seed=0)
    if name in ("AutoDiagonalNormal", "AutoMultivariateNormal", "AutoLowRank", "AutoFlow"):
        assert result.mass_check is not None and math.isfinite(result.mass_check.gap)
    if name == "AutoNormal":
        assert result.mass_check is None  # no packed latent to widen
    samples = result.samples
    assert samples["w"].shape == (30, 2)
    assert samples["offset"].shape == (30, 3, 1)
    assert samples["sigma"].shape == (30,)
    for i in [0, 13, 29]:
        values = {k: v[i] for k, v in samples.items()}
        conditioned = pyro.poutine.condition(regression_model, data=values)
        log_p = pyro.poutine.trace(conditioned).get_trace(x, y).log_prob_sum()
        torch.testing.assert_close(result._draws.log_p[i].double(), log_p.double())
    # log q: the guide's density of the unconstrained values, plus the Jacobian of
    # sigma = exp(u), recomputed from the guide's own parameters
    for i in [0, 29]:
        w, sigma, offset = samples["w"][i], samples["sigma"][i], samples["offset"][i]
        u = {"w": w, "sigma": sigma.log(), "offset": offset}
        if name == "AutoNormal":
            log_q = sum(
                dist.Normal(getattr(guide.locs, k), getattr(guide.scales, k)).log_prob(v).sum()
                for k, v in u.items()
            )
        elif name in ("AutoMultivariateNormal", "AutoFlow"):
            packed = torch.cat([u["w"], u["sigma"].reshape(1), u["offset"].reshape(-1)])
            log_q = guide.get_posterior().log_prob(packed)
        else:
            continue
        torch.testing.assert_close(
            result._draws.log_q[i].double(), (log_q - sigma.log()).double(), rtol=1e-5, atol=1e-5
        )
    assert torch.isfinite(result.log_weights).all()
    assert math.isfinite(result.khat)


# --- ArviZ export ---------------------------------------------------------------------------


def schools_model(y, sigma):
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("school", len(y)):
        theta_trans = pyro.sample("theta_trans", dist.Normal(0.0, 1.0))
        theta = pyro.deterministic("theta", mu + tau * theta_trans)
        pyro.sample("obs", dist.Normal(theta, sigma), obs=y)


Y = torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
SIGMA = torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])


@pytest.fixture(scope="module")
def schools_idata():
    pyro.set_rng_seed(0)
    guide = AutoFlow(schools_model, model_args=(Y, SIGMA), layers="affine", num_layers=1)
    svi = pyro.infer.SVI(
        schools_model, guide, pyro.optim.Adam({"lr": 0.02}), pyro.infer.Trace_ELBO()
    )
    for _ in range(100):
        svi.step(Y, SIGMA)
    return guide, to_inference_data(schools_model, guide, Y, SIGMA, num_samples=800)


def test_inference_data_groups_shapes_and_dims(schools_idata):
    _, idata = schools_idata
    for group in ["posterior", "posterior_predictive", "log_likelihood", "observed_data"]:
        assert group in idata.groups()
    post = idata.posterior
    assert post["mu"].dims == ("chain", "draw") and post["mu"].shape == (4, 200)
    assert post["theta_trans"].dims == ("chain", "draw", "school")
    assert post["theta"].dims == ("chain", "draw", "school")  # deterministic site
    assert (post["tau"] > 0).all()  # constrained scale
    torch.testing.assert_close(
        torch.as_tensor(post["theta"].values),
        torch.as_tensor((post["mu"] + post["tau"] * post["theta_trans"]).values),
        rtol=1e-5,
        atol=1e-5,
    )
    assert idata.log_likelihood["obs"].dims == ("chain", "draw", "school")
    assert idata.posterior_predictive["obs"].shape == (4, 200, 8)
    assert idata.observed_data["obs"].dims == ("school",)
    assert list(idata.sample_stats) == ["log_importance_weight", "log_p", "log_q"]


def test_pointwise_log_likelihood_is_the_normal_density(schools_idata):
    _, idata = schools_idata
    theta = torch.as_tensor(idata.posterior["theta"].values)
    expected = dist.Normal(theta, SIGMA.double()).log_prob(Y.double())
    torch.testing.assert_close(
        torch.as_tensor(idata.log_likelihood["obs"].values), expected, rtol=1e-5, atol=1e-5
    )
    # the sample stats add up: log_p = prior terms + sum of the pointwise log-likelihood
    post = idata.posterior
    prior = (
        dist.Normal(0.0, 5.0).log_prob(torch.as_tensor(post["mu"].values))
        + dist.HalfCauchy(5.0).log_prob(torch.as_tensor(post["tau"].values))
        + dist.Normal(0.0, 1.0).log_prob(torch.as_tensor(post["theta_trans"].values)).sum(-1)
    )
    torch.testing.assert_close(
        torch.as_tensor(idata.sample_stats["log_p"].values),
        prior + expected.sum(-1),
        rtol=1e-5,
        atol=1e-4,
    )


def test_arviz_functions_work(schools_idata):
    _, idata = schools_idata
    summary = az.summary(idata, var_names=["mu", "tau"])
    assert set(summary.index) == {"mu", "tau"}
    assert (summary["r_hat"] < 1.02).all()  # chains of independent draws agree
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loo = az.loo(idata)
        waic = az.waic(idata)
    assert math.isfinite(loo.elpd_loo) and math.isfinite(waic.elpd_waic)
    assert loo.n_data_points == 8
    az.plot_posterior(idata, var_names=["mu", "tau"])
    az.plot_pair(idata, var_names=["mu", "tau"])
    az.plot_ppc(idata, num_pp_samples=20)
    matplotlib.pyplot.close("all")


def test_reweighted_posterior_exports_like_the_guide(schools_idata):
    guide, _ = schools_idata
    result = diagnose(
        schools_model, guide, Y, SIGMA, num_samples=1000, seed=0, posterior_predictive=True
    )
    idata = result.to_inference_data()
    assert idata.posterior_predictive["obs"].shape == (4, 250, 8)
    assert idata.posterior["theta"].shape == (4, 250, 8)
    assert idata.attrs["psis_khat"] == pytest.approx(result.khat)
    # resampled rows are rows of the guide's draws, scored consistently
    mu = torch.as_tensor(idata.posterior["mu"].values).reshape(-1)
    assert torch.isin(mu, result.samples["mu"].double()).all()
    raw = result.to_inference_data(reweighted=False, num_chains=2)
    assert raw.posterior["mu"].shape == (2, 500)
    torch.testing.assert_close(
        torch.as_tensor(raw.sample_stats["log_importance_weight"].values).reshape(-1),
        result.log_weights,
    )


def test_event_dims_and_several_observed_sites():
    """A simplex latent (event dim 1) and a multivariate observation."""
    data = torch.tensor([[0.5, -0.2], [1.0, 0.3], [0.1, 0.1]])
    counts = torch.tensor([3.0, 1.0, 4.0])

    def model():
        probs = pyro.sample("probs", dist.Dirichlet(torch.ones(3)))
        loc = pyro.sample("loc", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        with pyro.plate("rows", 3):
            pyro.sample("x", dist.MultivariateNormal(loc, torch.eye(2)), obs=data)
        pyro.sample("c", dist.Multinomial(8, probs), obs=counts)

    guide = AutoMultivariateNormal(model)
    idata = to_inference_data(model, guide, num_samples=40, num_chains=2)
    assert idata.posterior["probs"].shape == (2, 20, 3)
    torch.testing.assert_close(
        torch.as_tensor(idata.posterior["probs"].values).sum(-1),
        torch.ones(2, 20, dtype=torch.float64),
    )
    assert idata.log_likelihood["x"].dims == ("chain", "draw", "rows")
    assert idata.log_likelihood["c"].shape == (2, 20)
    assert idata.posterior_predictive["x"].shape == (2, 20, 3, 2)
    assert idata.observed_data["x"].shape == (3, 2)


# --- errors ----------------------------------------------------------------------------------


def test_subsampled_plate_is_refused():
    def model(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("n", len(y), subsample_size=3):
            pyro.sample("y", dist.Normal(mu, 1.0), obs=y[:3])

    with pytest.raises(ValueError, match="subsampled plate 'n'"):
        diagnose(model, AutoNormal(model), torch.randn(10), num_samples=10)


def test_guide_missing_a_site_is_refused():
    def model():
        pyro.sample("a", dist.Normal(0.0, 1.0))
        pyro.sample("b", dist.Normal(0.0, 1.0))

    def guide():
        pyro.sample("a", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match=r"does not sample the model's latent sites \['b'\]"):
        diagnose(model, guide, num_samples=10)


def test_point_estimate_guide_is_refused():
    def model():
        pyro.sample("a", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="point estimate"):
        diagnose(model, AutoDelta(model), num_samples=10)


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_samples must be an integer >= 2, got 1"):
        diagnose(poisson_model, exact_guide, COUNTS, num_samples=1)
    with pytest.raises(ValueError, match="chunk_size must be an integer >= 1, got 0"):
        diagnose(poisson_model, exact_guide, COUNTS, num_samples=10, chunk_size=0)
    with pytest.raises(ValueError, match="num_samples must be an integer >= 1, got 0"):
        to_inference_data(poisson_model, exact_guide, COUNTS, num_samples=0)
    with pytest.raises(ValueError, match="num_chains must be an integer >= 1, got 0"):
        to_inference_data(poisson_model, exact_guide, COUNTS, num_samples=10, num_chains=0)


def test_chains_that_do_not_divide_the_draws_are_refused_before_drawing():
    def guide(counts):
        raise AssertionError("drawn")

    with pytest.raises(ValueError, match="num_chains must divide num_samples=10, got 3"):
        to_inference_data(poisson_model, guide, COUNTS, num_samples=10, num_chains=3)
    result = diagnose(poisson_model, exact_guide, COUNTS, num_samples=10)
    with pytest.raises(ValueError, match="num_chains must divide num_samples=10, got 4"):
        result.to_inference_data()


def test_public_api_is_reexported_from_its_modules():
    import pyroflows
    import pyroflows.workflow as workflow
    from pyroflows.workflow import diagnostics, export, mass_check

    assert pyroflows.diagnose is workflow.diagnose is diagnostics.diagnose
    assert workflow.Diagnosis is diagnostics.Diagnosis
    assert pyroflows.to_inference_data is workflow.to_inference_data is export.to_inference_data
    assert workflow.import_arviz is export.import_arviz
    assert workflow.MassCheck is mass_check.MassCheck
    assert (workflow.KHAT_GOOD, workflow.KHAT_OK) == (0.5, 0.7)
    assert all(hasattr(workflow, name) for name in workflow.__all__)


def test_unvectorisable_model_asks_for_parallel_false():
    def model(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        pyro.sample("y", dist.Normal(float(mu), 1.0), obs=y)  # float(): no batching possible

    def guide(y):
        pyro.sample("mu", dist.Normal(0.0, 1.0))

    y = torch.tensor(0.5)
    with pytest.raises(ValueError, match="parallel=False"):
        diagnose(model, guide, y, num_samples=10)
    result = diagnose(model, guide, y, num_samples=10, parallel=False)
    assert result.samples["mu"].shape == (10,)


# --- the mass check ----------------------------------------------------------------------------


def _two_modes():
    """Posterior 0.7 N(0, 1) + 0.3 N(10, 1) (log evidence 0), through a broad prior."""

    def model():
        z = pyro.sample("z", dist.Normal(0.0, 20.0))
        near = math.log(0.7) + dist.Normal(0.0, 1.0).log_prob(z)
        far = math.log(0.3) + dist.Normal(10.0, 1.0).log_prob(z)
        pyro.factor("target", torch.logaddexp(near, far) - dist.Normal(0.0, 20.0).log_prob(z))

    return model


def _guide_on_first_mode(model):
    init = pyro.infer.autoguide.init_to_value(values={"z": torch.tensor(0.0)})
    guide = AutoMultivariateNormal(model, init_loc_fn=init, init_scale=1.0)
    guide()
    return guide


def test_mass_check_finds_a_mode_that_k_hat_cannot_see():
    model = _two_modes()
    guide = _guide_on_first_mode(model)  # exactly the first mode: 30% of the mass is missed
    result = diagnose(model, guide, num_samples=4000, seed=0, widen=5.0)
    assert result.khat < 0.7  # the guide's own draws look fine ...
    assert result.log_evidence == pytest.approx(math.log(0.7), abs=0.05)
    check = result.mass_check
    assert check.significant  # ... but the wider proposal finds the far mode
    assert check.log_evidence == pytest.approx(0.0, abs=4 * check.standard_error + 0.02)
    assert check.missing_mass == pytest.approx(0.3, abs=0.1)
    assert not result.trustworthy
    assert "miss about" in result.verdict and "widened x5" in str(result)


def test_mass_check_is_quiet_for_an_exact_guide():
    def model():
        loc, scale = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 2.0])
        pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    guide = AutoMultivariateNormal(model, init_scale=1.0)
    guide()
    with torch.no_grad():  # make the guide the exact posterior
        guide.loc.copy_(torch.tensor([1.0, -2.0]))
        guide.scale.copy_(torch.tensor([0.5, 2.0]))
    result = diagnose(model, guide, num_samples=4000, seed=0)
    assert not result.mass_check.significant
    assert abs(result.mass_check.gap) < 4 * result.mass_check.standard_error
    assert result.trustworthy


def test_mass_check_options():
    model = _two_modes()
    guide = _guide_on_first_mode(model)
    assert diagnose(model, guide, num_samples=100, widen=None).mass_check is None
    with pytest.raises(ValueError, match="widen"):
        diagnose(model, guide, num_samples=100, widen=0.5)


def test_mass_check_that_fails_warns_at_the_caller(monkeypatch):
    from pyroflows.workflow import mass_check

    def failing(*args, **kwargs):
        raise NotImplementedError("no log_prob")

    monkeypatch.setattr(mass_check, "_mass_check", failing)
    model = _two_modes()
    guide = _guide_on_first_mode(model)
    with pytest.warns(UserWarning, match="mass check skipped.*no log_prob") as record:
        result = diagnose(model, guide, num_samples=100, seed=0)
    assert result.mass_check is None
    assert [w.filename for w in record] == [__file__]


def test_psis_spread_matches_the_spread_over_independent_draws():
    # N(0, 1.3^2) target, N(0, 1) proposal: k-hat = 1 - 1 / 1.3^2 = 0.41; its sd over
    # independent sets of 4,000 draws is about 0.09.
    gen = torch.Generator().manual_seed(1)

    def log_weights() -> torch.Tensor:
        z = torch.randn(4000, generator=gen, dtype=torch.float64)
        return 0.5 * z**2 * (1 - 1 / 1.3**2)

    az = pytest.importorskip("arviz")
    khats = [float(az.psislw(log_weights().numpy(), reff=1.0)[1]) for _ in range(30)]
    independent = float(torch.tensor(khats).std())
    log_w = log_weights()
    khat_sd, ess_sd = psis_spread(log_w, seed=0)
    assert 0.5 * independent < khat_sd < 2.0 * independent, (khat_sd, independent)
    assert ess_sd > 0 and psis_spread(log_w, seed=0) == (khat_sd, ess_sd)  # private seed
    with pytest.raises(ValueError, match="at least 2 log weights"):
        psis_spread(torch.zeros(1))


def _scale_model(scale: float) -> None:
    pyro.sample("z", dist.Normal(0.0, scale))


def _standard_guide(scale: float) -> None:
    pyro.sample("z", dist.Normal(0.0, 1.0))


@pytest.mark.parametrize(
    "scale, borderline",
    [(1 / math.sqrt(1 - 0.7), True), (1.3, False)],  # k-hat = 1 - 1 / scale^2: 0.70 and 0.41
)
def test_verdict_says_borderline_only_near_the_trust_boundary(scale, borderline):
    """A N(0, 1) guide of a N(0, scale^2) posterior: 'Borderline' exactly when k-hat is near 0.7."""
    result = diagnose(_scale_model, _standard_guide, scale, num_samples=2000, seed=0, widen=None)
    near = abs(result.khat - 0.7) <= 2 * result.khat_sd
    assert near == borderline, (result.khat, result.khat_sd)
    assert ("Borderline" in result.verdict) == borderline
    if borderline:
        assert "num_samples=32000" in result.verdict  # 16x the draws halve the sd
