"""`examples/energy_2d.py`: smoke test with tiny settings, and checks of its KL machinery."""

from __future__ import annotations

import math

import pyro
import pytest
import torch
from _scripts import load_script
from pyro.infer.autoguide import init_to_value

from pyroflows.infer import AutoFlow


@pytest.fixture(scope="module")
def energy_2d():
    return load_script("examples/energy_2d.py")


@pytest.fixture(autouse=True)
def _clean_param_store():
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


def test_smoke_all_guides(energy_2d, tmp_path):
    threads = torch.get_num_threads()
    table = energy_2d.main(
        [
            *("--steps", "3", "--particles", "2", "--energies", "U3"),
            *("--eval-samples", "2000", "--grid", "200", "--out", str(tmp_path)),
        ]
    )
    assert list(table) == ["U3"]
    assert sorted(table["U3"]) == sorted(energy_2d.GUIDES)
    for row in table["U3"].values():
        assert math.isfinite(row["kl"]) and row["kl"] > -5 * row["kl_se"]
        assert math.isfinite(row["kl_se"]) and row["kl_se"] >= 0
    assert (tmp_path / "energy_2d.png").stat().st_size > 0
    assert torch.get_num_threads() == threads


def test_log_normaliser_of_a_correlated_gaussian(energy_2d):
    cov = torch.tensor([[1.0, 0.6], [0.6, 0.8]], dtype=torch.float64)
    precision = torch.linalg.inv(cov)
    shift = torch.tensor([0.5, -1.0], dtype=torch.float64)

    def energy(z):
        d = z - shift
        return 0.5 * torch.einsum("...i,ij,...j->...", d, precision, d) - 3.0

    exact = math.log(2 * math.pi) + 0.5 * math.log(torch.linalg.det(cov)) + 3.0
    assert energy_2d.log_normaliser(energy) == pytest.approx(exact, abs=1e-3)
    assert energy_2d.log_normaliser(energy, num=400) == pytest.approx(exact, abs=1e-6)


def test_log_normaliser_of_the_walled_energies(energy_2d):
    # Integrating z2 first gives a constant c for every z1; the z1 integral is then
    # 2 * WALL (flat part) + sqrt(2 pi) * WALL_WIDTH (two Gaussian half-shoulders).
    root = math.sqrt(2 * math.pi)
    length = 2 * energy_2d.WALL + root * energy_2d.WALL_WIDTH
    z2_integral = {"U2": root * 0.4, "U3": root * 2 * 0.35, "U4": root * (0.4 + 0.35)}
    for name, c in z2_integral.items():
        log_z = energy_2d.log_normaliser(energy_2d.ENERGIES[name], num=400)
        assert log_z == pytest.approx(math.log(c * length), abs=1e-6), name


def test_kl_of_an_exact_guide_is_zero(energy_2d):
    scale = 0.7

    def energy(z):
        return 0.5 * (z / scale).pow(2).sum(-1)

    model = energy_2d.make_model(energy)
    guide = AutoFlow(
        model,
        num_layers=0,
        precondition="off",  # the guide is then exactly N(init, init_scale^2 I)
        init_scale=scale,
        init_loc_fn=init_to_value(values={"z": torch.zeros(2)}),
        model_args=(),
    )
    log_z = energy_2d.log_normaliser(energy, num=400)
    assert log_z == pytest.approx(math.log(2 * math.pi * scale**2), abs=1e-6)
    z, terms = energy_2d.elbo_draws(guide, energy, 5000, chunk=2000)
    assert z.shape == (5000, 2) and terms.shape == (5000,)
    torch.testing.assert_close(terms, torch.full_like(terms, log_z), atol=1e-4, rtol=0)
