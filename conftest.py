"""Root conftest: settings that apply to doctests of the package and docs too."""

import torch


def pytest_configure(config) -> None:
    # Small tensors: one thread is faster and immune to oversubscription on shared CI cores.
    torch.set_num_threads(1)
