"""Calibration of a conditional flow ``q(theta | x)``: expected coverage and SBC ranks.

Both take pairs ``(theta_i, x_i)`` simulated from the joint (``theta_i`` from the prior,
``x_i`` from the simulator) that the flow was not trained on. For a calibrated posterior:

* **expected coverage**: the true ``theta_i`` lies inside the ``alpha`` highest-density
  region of ``q(. | x_i)`` for a fraction ``alpha`` of the pairs, at every level ``alpha``
  (Hermans et al. 2022). Coverage below the diagonal means overconfident posteriors.
* **SBC ranks**: the rank of each coordinate of ``theta_i`` among draws from ``q(. | x_i)``
  is uniform over ``0..num_samples`` (Talts et al. 2018).

Example:
    >>> import torch
    >>> from pyroflows import flows
    >>> from pyroflows.workflow.calibration import expected_coverage
    >>> flow = flows.maf(1, 1, num_layers=1, hidden_dims=(8,))
    >>> theta, x = torch.randn(50, 1), torch.randn(50, 1)
    >>> result = expected_coverage(flow, theta, x, num_samples=100)
    >>> result.credibility.shape, result.coverage.shape
    (torch.Size([50]), torch.Size([21]))
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from ..checks import check_int
from ..distribution import Flow

__all__ = ["Coverage", "expected_coverage", "sbc_ranks"]


@dataclass(frozen=True)
class Coverage:
    """Expected coverage of a conditional flow (see `expected_coverage`).

    Attributes:
        levels: credibility levels ``alpha``, increasing from 0 to 1.
        coverage: fraction of pairs whose true parameters lie inside the ``alpha``
            highest-density region, one per level.
        credibility: per pair, the smallest level whose region contains the true
            parameters (uniform on ``[0, 1]`` for a calibrated posterior).
    """

    levels: Tensor
    coverage: Tensor
    credibility: Tensor

    @property
    def max_gap(self) -> float:
        """Largest ``|coverage - level|``: 0 for perfect calibration."""
        return float((self.coverage - self.levels).abs().max())

    def sampling_error(self) -> float:
        """Two standard errors of a coverage fraction at level 0.5 with this many pairs: a
        calibrated posterior's ``max_gap`` stays within about this band."""
        return 2.0 * (0.25 / len(self.credibility)) ** 0.5


@torch.no_grad()
def expected_coverage(
    flow: Flow,
    theta: Tensor,
    x: Tensor,
    *,
    num_samples: int = 1000,
    levels: int = 21,
    chunk_size: int = 100,
    seed: int | None = 0,
) -> Coverage:
    """Expected coverage of the highest-density regions of ``flow.condition(x_i)``.

    For each pair, ``num_samples`` draws of ``q(. | x_i)`` are scored; the credibility of
    ``theta_i`` is the fraction of draws denser than it.

    Args:
        flow: a conditional flow ``q(theta | x)``.
        theta: true parameters, ``(N, D)``.
        x: their simulated observations, ``(N, C)``.
        num_samples: posterior draws per pair.
        levels: number of evenly spaced levels from 0 to 1.
        chunk_size: pairs drawn for at once (memory: ``chunk_size * num_samples`` rows).
        seed: seeds the draws (the caller's random state is restored); ``None``: global.
    """
    check_int("levels", levels, 2)
    credibility = torch.cat(
        [
            (_scores(flow, t, c, num_samples) > flow.condition(c).log_prob(t)).double().mean(0)
            for t, c in _chunks(flow, theta, x, num_samples, chunk_size, seed)
        ]
    )
    grid = torch.linspace(0.0, 1.0, levels, dtype=torch.float64)
    coverage = (credibility[None, :] <= grid[:, None]).double().mean(1)
    return Coverage(grid, coverage, credibility)


@torch.no_grad()
def sbc_ranks(
    flow: Flow,
    theta: Tensor,
    x: Tensor,
    *,
    num_samples: int = 1000,
    chunk_size: int = 100,
    seed: int | None = 0,
) -> Tensor:
    """Simulation-based calibration ranks: for each pair and coordinate, the number of
    posterior draws below the true value; shape ``(N, D)``, values in ``0..num_samples``.

    Arguments as in `expected_coverage`.
    """
    return torch.cat(
        [
            (flow.condition(c).sample((num_samples,)) < t).sum(0)
            for t, c in _chunks(flow, theta, x, num_samples, chunk_size, seed)
        ]
    )


def _scores(flow: Flow, theta: Tensor, x: Tensor, num_samples: int) -> Tensor:
    """Log-densities of ``num_samples`` draws of ``q(. | x_i)`` for each row, ``(S, n)``."""
    posterior = flow.condition(x)
    return posterior.log_prob(posterior.sample((num_samples,)))


def _chunks(
    flow: Flow, theta: Tensor, x: Tensor, num_samples: int, chunk_size: int, seed: int | None
) -> Iterator[tuple[Tensor, Tensor]]:
    """Checked pairs in chunks, drawn under a private seed; yields ``(theta, x)`` pieces."""
    check_int("num_samples", num_samples)
    check_int("chunk_size", chunk_size)
    if theta.dim() != 2 or x.dim() != 2 or len(theta) != len(x):
        raise ValueError(
            f"theta and x must be (N, D) and (N, C) with the same N, got {tuple(theta.shape)} "
            f"and {tuple(x.shape)}"
        )
    device = next(flow.parameters()).device
    forked = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(enabled=seed is not None, devices=forked):
        if seed is not None:
            torch.manual_seed(seed)
        for t, c in zip(theta.split(chunk_size), x.split(chunk_size), strict=True):
            yield t.to(device), c.to(device)
