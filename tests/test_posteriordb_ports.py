"""The posteriordb ports of ``benchmarks/posteriordb``: Stan targets, column maps, CI run.

Needs the posteriordb subset at ``../shared/data/posteriordb`` next to the repository;
every test skips without it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from _scripts import load_script
from pyro import poutine

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "posteriordb"

pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"posteriordb data not found at {DATA}")


def _load(name: str):
    """Import ``benchmarks/posteriordb/<name>.py`` by path (registered in ``sys.modules``)."""
    return load_script(f"benchmarks/posteriordb/{name}.py", siblings=True)


models = _load("models")
NAMES = sorted(models.POSTERIORS)
DRAWS = [(0, 17), (3, 512), (9, 999)]  # (chain, draw) pairs


@pytest.fixture(scope="module")
def loaded():
    cache = {}

    def get(name: str):
        if name not in cache:
            post = models.POSTERIORS[name]
            cache[name] = (post, models.load_data(DATA, post), models.load_reference(DATA, post))
        return cache[name]

    return get


def _params_at(post, ref: np.ndarray) -> list[dict[str, torch.Tensor]]:
    rows = torch.as_tensor(np.stack([ref[c, d] for c, d in DRAWS]), dtype=torch.float64)
    sites = post.from_columns(rows)
    return [{k: v[i] for k, v in sites.items()} for i in range(len(DRAWS))]


def _log_joint(post, data, params) -> float:
    conditioned = poutine.condition(post.model, data=params)
    trace = poutine.trace(conditioned).get_trace(data)
    plates = {f.name for s in trace.nodes.values() for f in s.get("cond_indep_stack", ())}
    latent = [n for n in trace.stochastic_nodes if n not in plates]
    assert not latent, f"sites not conditioned: {latent}"
    assert all(trace.nodes[n]["is_observed"] for n in params)
    return float(trace.log_prob_sum())


def test_registry_matches_info():
    assert len(NAMES) == 9
    for name in NAMES:
        info = json.loads((DATA / name / "info.json").read_text())
        assert list(models.POSTERIORS[name].columns) == info["reference_draws"]["column_names"]


@pytest.mark.parametrize("name", NAMES)
def test_pyro_log_joint_is_stan_target(name, loaded):
    """Pyro's log joint minus the hand-written Stan target is one constant across draws."""
    post, data, ref = loaded(name)
    diffs = []
    for params in _params_at(post, ref):
        batched = {k: v.unsqueeze(0) for k, v in params.items()}
        target = float(post.log_density(batched, data)[0])
        diffs.append(_log_joint(post, data, params) - target)
    assert all(math.isfinite(d) for d in diffs)
    np.testing.assert_allclose(diffs, diffs[0], rtol=0, atol=1e-7)


@pytest.mark.parametrize("name", NAMES)
def test_columns_round_trip(name, loaded):
    post, _, ref = loaded(name)
    rows = torch.as_tensor(ref[:, :3].reshape(-1, ref.shape[-1]), dtype=torch.float64)
    sites = post.from_columns(rows)
    assert {k: tuple(v.shape[1:]) for k, v in sites.items()} == post.site_shapes()
    torch.testing.assert_close(post.to_columns(sites), rows, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_init_is_in_support(name, loaded):
    post, data, _ = loaded(name)
    init = post.init_values(data)
    assert {k: tuple(v.shape) for k, v in init.items()} == post.site_shapes()
    assert math.isfinite(_log_joint(post, data, init))


@pytest.mark.parametrize("name", NAMES)
def test_model_vectorises_over_particles(name, loaded):
    """Under an outer particle plate the model scores each draw as it does one at a time."""
    post, data, ref = loaded(name)
    rows = torch.as_tensor(np.stack([ref[c, d] for c, d in DRAWS]), dtype=torch.float64)
    sites = post.from_columns(rows)
    batched = models.vectorized_log_joint(post, data, sites)
    single = [_log_joint(post, data, p) for p in _params_at(post, ref)]
    torch.testing.assert_close(batched, torch.tensor(single, dtype=torch.float64))


def test_eight_schools_parameterisations_agree(loaded):
    """Centred and non-centred eight schools are the same posterior on (theta, mu, tau).

    With ``theta = mu + tau * theta_trans`` the densities satisfy
    ``p_nc(theta_trans, mu, tau) = p_c(theta, mu, tau) * tau^J``.
    """
    nc, data, ref = loaded("eight_schools-eight_schools_noncentered")
    c, _, _ = loaded("eight_schools-eight_schools_centered")
    diffs = []
    rows = torch.as_tensor(np.stack([ref[ch, d] for ch, d in DRAWS]), dtype=torch.float64)
    for i in range(len(DRAWS)):
        p_nc = {k: v[i] for k, v in nc.from_columns(rows).items()}
        p_c = {k: v[i] for k, v in c.from_columns(rows).items()}
        J = len(p_c["theta"])
        lp_nc = _log_joint(nc, data, p_nc) - J * math.log(float(p_nc["tau"]))
        diffs.append(lp_nc - _log_joint(c, data, p_c))
    np.testing.assert_allclose(diffs, diffs[0], rtol=0, atol=1e-8)


def test_hmm_forward_matches_recursion():
    """The pairwise reduction equals the step-by-step forward recursion, batched too."""
    torch.manual_seed(1)
    for T in (1, 2, 7, 16):
        log_trans = torch.randn(3, 2, 2, dtype=torch.float64).log_softmax(-1)
        log_emit = torch.randn(3, T, 2, dtype=torch.float64)
        gamma = log_emit[:, 0]
        for t in range(1, T):
            gamma = torch.logsumexp(gamma[..., :, None] + log_trans, dim=-2) + log_emit[:, t]
        expected = torch.logsumexp(gamma, -1)
        torch.testing.assert_close(models.hmm_forward(log_trans, log_emit), expected)


@pytest.mark.parametrize(
    "name", ["bball_drive_event_0-hmm_drive_0", "kilpisjarvi_mod-kilpisjarvi", "sblrc-blr"]
)
def test_autoflow_preconditioner_whitens_the_reference(name, loaded):
    """AutoFlow's preconditioner (the Laplace approximation at the mode, found from its own
    default start) maps the reference draws to roughly standard normal coordinates
    ``w = L^-1 (u - u0)``, however ill-conditioned the posterior (kilpisjarvi: corr -0.99999)."""
    from pyro.distributions.transforms import biject_to

    from pyroflows.infer import AutoFlow

    post, data, ref = loaded(name)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        guide = AutoFlow(post.model, model_args=(data,))
    finally:
        torch.set_default_dtype(old)
    assert guide.preconditioning.centre == "mode", guide.preconditioning
    rows = torch.as_tensor(ref.reshape(-1, ref.shape[-1])[::10], dtype=torch.float64)
    sites = post.from_columns(rows)
    u = torch.cat(
        [
            biject_to(site["fn"].support).inv(sites[site["name"]]).reshape(len(rows), -1)
            for _, site in guide.prototype_trace.iter_stochastic_nodes()
        ],
        -1,
    )
    layer = guide.flow.layers[-1]
    w = torch.linalg.solve_triangular(layer.scale, (u - layer.loc).T, upper=False).T
    assert float(w.mean(0).abs().max()) < 0.5
    assert 0.7 < float(w.std(0).min()) and float(w.std(0).max()) < 1.6
