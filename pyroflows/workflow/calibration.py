"""Checks of an amortised posterior ``q(theta | x)``: coverage, SBC ranks and C2ST.

Both take pairs ``(theta_i, x_i)`` simulated from the joint (``theta_i`` from the prior,
``x_i`` from the simulator) that the flow was not trained on. For a calibrated posterior:

* **expected coverage**: the true ``theta_i`` lies inside the ``alpha`` highest-density
  region of ``q(. | x_i)`` for a fraction ``alpha`` of the pairs, at every level ``alpha``
  (Hermans et al. 2022). Coverage below the diagonal means overconfident posteriors.
* **SBC ranks**: the rank of each coordinate of ``theta_i`` among draws from ``q(. | x_i)``
  is uniform over ``0..num_samples`` (Talts et al. 2018).

Against reference posterior draws (when they exist, e.g. from MCMC or a benchmark), `c2st`
is the classifier two-sample test of the simulation-based inference benchmarks: the
cross-validated accuracy of a classifier telling the two sets apart (0.5: indistinguishable).

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

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from ..checks import check_int
from ..distribution import Flow

__all__ = ["Coverage", "expected_coverage", "sbc_ranks", "c2st"]


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
            (_scores(flow, c, num_samples) > flow.condition(c).log_prob(t)).double().mean(0)
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


def _scores(flow: Flow, x: Tensor, num_samples: int) -> Tensor:
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


def c2st(
    samples: Tensor,
    reference: Tensor,
    *,
    folds: int = 5,
    max_epochs: int = 1000,
    seed: int = 0,
) -> float:
    """Classifier two-sample test: cross-validated accuracy of telling the sets apart.

    The protocol of the sbibm benchmark (Lueckmann et al. 2021), whose classifier is
    scikit-learn's ``MLPClassifier``: both sets are z-scored with the reference's mean and
    standard deviation; a network with two hidden ReLU layers of width ``10 D`` is trained
    with Adam (learning rate 1e-3, minibatches of 200) on ``folds - 1`` folds until its
    training loss has not improved by 1e-4 for 10 epochs, after at least 100 epochs (a
    classifier can sit on the flat start of its loss for longer than 10 epochs before it
    finds thin structure), or ``max_epochs``; it is scored on the held-out fold. Returns the
    mean accuracy over the folds: 0.5 means the classifier cannot tell the sets apart, 1.0
    that it always can. On two-moons posteriors it reads like sbibm's scikit-learn version
    (0.71 against 0.72 on the same sets). Use sets of equal size (the benchmark uses 10,000
    each). The global random state is not touched.

    Example:
        >>> import torch
        >>> a, b = torch.randn(1000, 2), torch.randn(1000, 2)
        >>> 0.4 < c2st(a, b, max_epochs=30) < 0.6
        True
    """
    check_int("folds", folds, 2)
    check_int("max_epochs", max_epochs)
    if samples.dim() != 2 or reference.dim() != 2 or samples.shape[1] != reference.shape[1]:
        raise ValueError(
            f"samples and reference must be (N, D) and (M, D), got {tuple(samples.shape)} "
            f"and {tuple(reference.shape)}"
        )
    ref = reference.detach().double().cpu()
    mean, sd = ref.mean(0), ref.std(0).clamp_min(1e-12)
    x = ((torch.cat([samples.detach().double().cpu(), ref]) - mean) / sd).float()
    y = torch.cat([torch.zeros(len(samples)), torch.ones(len(ref))])
    gen = torch.Generator().manual_seed(seed)
    fold_of = torch.randperm(len(x), generator=gen) % folds
    scores = [
        _held_out_accuracy(x, y, fold_of != k, fold_of == k, max_epochs, gen) for k in range(folds)
    ]
    return float(sum(scores) / folds)


def _held_out_accuracy(
    x: Tensor, y: Tensor, train: Tensor, test: Tensor, max_epochs: int, gen: torch.Generator
) -> float:
    """Accuracy on the ``test`` rows of a classifier trained on the ``train`` rows."""
    net = _classifier(x.shape[1], gen)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    xt, yt = x[train], y[train]
    best, stalled = math.inf, 0
    with torch.enable_grad():
        for epoch in range(max_epochs):
            total = 0.0
            for rows in torch.randperm(len(xt), generator=gen).split(200):
                optimizer.zero_grad(set_to_none=True)
                logits = net(xt[rows]).squeeze(-1)
                loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, yt[rows])
                loss.backward()
                optimizer.step()
                total += float(loss.detach()) * len(rows)
            total /= len(xt)
            stalled = 0 if total < best - 1e-4 else stalled + 1
            best = min(best, total)
            if stalled >= 10 and epoch >= min(100, max_epochs // 2):
                break
    with torch.no_grad():
        predicted = net(x[test]).squeeze(-1) > 0
    return float((predicted == y[test].bool()).double().mean())


def _classifier(dim: int, gen: torch.Generator) -> torch.nn.Module:
    """Two hidden ReLU layers of width ``10 dim``, initialised from ``gen``."""
    width = 10 * dim
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(2**31, (), generator=gen)))
        return torch.nn.Sequential(
            torch.nn.Linear(dim, width),
            torch.nn.ReLU(),
            torch.nn.Linear(width, width),
            torch.nn.ReLU(),
            torch.nn.Linear(width, 1),
        )
