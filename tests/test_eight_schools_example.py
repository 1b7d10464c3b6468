"""`examples/eight_schools.py`: the workflow tutorial runs end to end (tiny settings)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from _scripts import load_script

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = (
    ROOT.parent / "shared" / "data" / "posteriordb" / "eight_schools-eight_schools_noncentered"
)


@pytest.fixture(scope="module")
def eight_schools():
    return load_script("examples/eight_schools.py")


def test_smoke(eight_schools, tmp_path):
    args = ["--steps", "20", "--particles", "2", "--num-samples", "400", "--out", str(tmp_path)]
    if REFERENCE.is_dir():
        args += ["--reference", str(REFERENCE)]
    results = eight_schools.main(args)
    assert set(results) == {"noncentered", "centered"}
    for result in results.values():
        assert math.isfinite(result["khat"]) and math.isfinite(result["elpd_loo"])
        if REFERENCE.is_dir():
            assert math.isfinite(result["guide_vs_reference"]["max_z_mean"])
            assert set(result["moments"]) == {"mu", "tau", "theta[0]", "theta[6]"}
    assert (tmp_path / "centered_pair.png").is_file()
    record = json.loads((tmp_path / "results.json").read_text())
    assert set(record["models"]) == {"noncentered", "centered"}
    if REFERENCE.is_dir():  # two halves of 10,000 NUTS draws agree closely, but not exactly
        assert 0.0 < record["reference"]["halves"]["max_z_mean"] < 0.2


def test_moments_are_those_of_the_draws(eight_schools):
    rng = np.random.default_rng(1)
    draws = {"mu": rng.normal(2.0, 3.0, 4000), "tau": rng.gamma(2.0, size=4000)}
    draws["theta"] = rng.normal(size=(4000, 8)) * np.arange(1, 9)
    got = eight_schools.moments(draws)
    assert got["mu"] == pytest.approx([draws["mu"].mean(), draws["mu"].std(ddof=1)])
    assert got["theta[6]"][1] == pytest.approx(draws["theta"][:, 6].std(ddof=1))


def test_compare_is_zero_for_the_reference_itself(eight_schools):
    rng = np.random.default_rng(0)
    ref = {
        "mu": rng.normal(size=500),
        "tau": rng.gamma(2.0, size=500),
        "theta": rng.normal(size=(500, 8)),
    }
    assert eight_schools.compare(ref, ref) == {"max_z_mean": 0.0, "max_abs_log_sd_ratio": 0.0}
    shifted = dict(ref, mu=ref["mu"] + ref["mu"].std(ddof=1))
    assert eight_schools.compare(shifted, ref)["max_z_mean"] == pytest.approx(1.0)


@pytest.mark.skipif(not REFERENCE.is_dir(), reason="needs ../shared/data/posteriordb")
def test_both_parameterisations_have_the_same_density(eight_schools):
    """Port check: centred and non-centred log joints differ by the Jacobian log(tau)."""
    import pyro
    import torch

    ref = eight_schools.load_reference(REFERENCE)
    diffs = []
    for i in [0, 1234, 9999]:
        mu, tau = torch.tensor(ref["mu"][i]), torch.tensor(ref["tau"][i])
        theta = torch.tensor(ref["theta"][i])
        args = (eight_schools.Y, eight_schools.SIGMA)
        cen = pyro.poutine.condition(eight_schools.centered, {"mu": mu, "tau": tau, "theta": theta})
        non = pyro.poutine.condition(
            eight_schools.noncentered, {"mu": mu, "tau": tau, "theta_trans": (theta - mu) / tau}
        )
        lp_c = pyro.poutine.trace(cen).get_trace(*args).log_prob_sum()
        lp_n = pyro.poutine.trace(non).get_trace(*args).log_prob_sum()
        diffs.append(float(lp_c - (lp_n - 8 * torch.log(tau))))
    np.testing.assert_allclose(diffs, 0.0, atol=1e-9)
