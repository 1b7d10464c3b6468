"""From a simulator to posterior draws: neural posterior estimation on two moons.

The two-moons simulator of the sbibm benchmark: a parameter ``theta`` uniform on the square
``[-1, 1]^2`` is turned into an observation ``x`` on a noisy half ring whose centre moves with
``|theta_1 + theta_2|`` and ``theta_2 - theta_1``, so the posterior of an observation is
crescent-shaped and bimodal. The script

1. simulates ``(theta, x)`` pairs and fits ``q(theta | x)`` with `fit_posterior` (the prior's
   square becomes the flow's support: no draw can leave it);
2. draws from the posterior of one observation and compares the draws with exact reference
   draws by C2ST (0.5: indistinguishable). The reference is drawn exactly by inverting the
   simulator (the noise has a known law and ``theta`` enters through a two-to-one map);
3. checks calibration on fresh simulations (expected coverage) and draws two figures.

Usage::

    python examples/two_moons_npe.py --out figures            # 10,000 simulations
    python examples/two_moons_npe.py --simulations 2000 --epochs 30 --out figures  # quick

Prints the C2ST, the coverage gap and the wall time; writes ``two_moons_posterior.png`` and
``two_moons_coverage.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import pyro.distributions as dist
import torch
from torch import Tensor

from pyroflows.infer import fit_posterior, simulate
from pyroflows.utils import torch_threads
from pyroflows.workflow import c2st, expected_coverage

#: The observation of sbibm's two_moons task, observation 1.
OBSERVATION = torch.tensor([-0.6397, 0.1623])
PRIOR = dist.Uniform(-torch.ones(2), torch.ones(2)).to_event(1)


def simulator(theta: Tensor) -> Tensor:
    """Two moons: ``x = p + (-|t1 + t2| / sqrt 2, (t2 - t1) / sqrt 2)``, ``p`` on a ring."""
    n = len(theta)
    angle = math.pi * (torch.rand(n) - 0.5)
    radius = 0.1 + 0.01 * torch.randn(n)
    p = torch.stack([radius * torch.cos(angle) + 0.25, radius * torch.sin(angle)], -1)
    shift = torch.stack(
        [-(theta[:, 0] + theta[:, 1]).abs(), theta[:, 1] - theta[:, 0]], -1
    ) / math.sqrt(2)
    return p + shift


def reference_draws(x: Tensor, n: int, generator: torch.Generator) -> Tensor:
    """Exact posterior draws for observation ``x``: draw the ring noise ``p``, solve
    ``x = p + shift(theta)`` for ``theta`` (two solutions, one taken at random) and keep the
    solutions inside the prior's square (rejection: the prior is uniform and the map's
    Jacobian constant, so the kept draws follow the posterior)."""
    kept: list[Tensor] = []
    while sum(len(k) for k in kept) < n:
        m = 4 * n
        angle = math.pi * (torch.rand(m, generator=generator) - 0.5)
        radius = 0.1 + 0.01 * torch.randn(m, generator=generator)
        shift_1 = x[0] - (radius * torch.cos(angle) + 0.25)  # = -|t1 + t2| / sqrt 2
        shift_2 = x[1] - radius * torch.sin(angle)  # = (t2 - t1) / sqrt 2
        sign = torch.randint(0, 2, (m,), generator=generator) * 2 - 1
        total = sign * (-shift_1) * math.sqrt(2)
        difference = shift_2 * math.sqrt(2)
        theta = torch.stack([(total - difference) / 2, (total + difference) / 2], -1)
        inside = (shift_1 <= 0) & (theta.abs() < 1).all(-1)
        kept.append(theta[inside])
    return torch.cat(kept)[:n]


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--simulations", type=int, default=10_000)
    parser.add_argument(
        "--epochs", type=int, default=None, help="at most (default: the library's rule)"
    )
    parser.add_argument("--draws", type=int, default=10_000, help="posterior draws for C2ST")
    parser.add_argument("--coverage-pairs", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, help="folder for the figures (none: no figures)")
    args = parser.parse_args(argv)
    with torch_threads(args.threads):
        start = time.perf_counter()
        theta, x = simulate(PRIOR, simulator, args.simulations, seed=args.seed)
        posterior, history = fit_posterior(
            theta, x, prior=PRIOR, epochs=args.epochs, seed=args.seed, progress=False
        )
        fit_seconds = time.perf_counter() - start
        gen = torch.Generator().manual_seed(args.seed + 1)
        reference = reference_draws(OBSERVATION, args.draws, gen)
        with torch.no_grad(), torch.random.fork_rng(devices=[]):  # caller's generator kept
            torch.manual_seed(args.seed + 2)
            draws = posterior.condition(OBSERVATION).sample((args.draws,))
        accuracy = c2st(draws, reference, seed=args.seed)
        test_theta, test_x = simulate(PRIOR, simulator, args.coverage_pairs, seed=args.seed + 2)
        coverage = expected_coverage(posterior, test_theta, test_x, num_samples=500)
    print(
        f"{args.simulations} simulations, {history.epochs_run} epochs, {fit_seconds:.0f} s; "
        f"C2ST {accuracy:.3f} (0.5 is perfect); coverage gap {coverage.max_gap:.3f} "
        f"(sampling error {coverage.sampling_error():.3f})"
    )
    if args.out is not None:
        _figures(args.out, draws, reference, coverage)
    return {"c2st": accuracy, "max_gap": coverage.max_gap, "fit_seconds": fit_seconds}


def _figures(out: Path, draws: Tensor, reference: Tensor, coverage) -> None:
    """The posterior against the reference, and the coverage curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pyroflows.plot import plot_coverage, plot_samples_2d

    out.mkdir(parents=True, exist_ok=True)
    fig = plot_samples_2d(reference[:2000], draws[:2000], labels=("reference", "pyroflows"))
    fig.savefig(out / "two_moons_posterior.png", dpi=120, bbox_inches="tight")
    ax = plot_coverage(coverage)
    ax.figure.savefig(out / "two_moons_coverage.png", dpi=120, bbox_inches="tight")
    plt.close("all")


if __name__ == "__main__":
    main()
