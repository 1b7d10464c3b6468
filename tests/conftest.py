"""Shared pytest options: ``--device`` and ``--dtype`` run the same suite on a GPU or in float32."""

from __future__ import annotations

from pathlib import Path

import pyro
import pytest
import torch

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--device", default="cpu", help="device for the tests (cpu, cuda, cuda:1)")
    parser.addoption(
        "--dtype", default="float64", choices=["float64", "float32"], help="floating dtype"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def device(request: pytest.FixtureRequest) -> torch.device:
    name = request.config.getoption("--device")
    if name.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip("--device cuda given but CUDA is not available")
    return torch.device(name)


@pytest.fixture(scope="session")
def dtype(request: pytest.FixtureRequest) -> torch.dtype:
    return getattr(torch, request.config.getoption("--dtype"))


@pytest.fixture
def tol(dtype: torch.dtype) -> float:
    return 1e-8 if dtype == torch.float64 else 2e-3


@pytest.fixture(autouse=True)
def _seed_and_validation() -> None:
    torch.manual_seed(0)
    pyro.clear_param_store()  # autoguides of earlier tests must not lend their parameters
    # Some libraries (zuko, imported by the benchmark smoke test) switch torch's argument
    # validation off at import; every test starts from Pyro's default, validation on.
    pyro.enable_validation(True)
