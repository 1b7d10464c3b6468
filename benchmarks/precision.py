"""Held-out log-likelihood of `fit` on columns that float32 standardisation used to ruin.

Two tables of 2,400 rows (2,000 to train, 400 held out): column 0 is ``N(1.7e9, 100^2)``
(float32 rounds it to multiples of 128) or ``N(0, (5e-9)^2)`` (once mistaken for a constant),
column 1 is ``N(0, 1)``. A 2-layer MAF is fitted for 10 epochs and its held-out mean
log-likelihood compared with the true density's: close to 0 is right, far above 0 means the
model fitted rounding spikes, far below means it missed the spread.

Run: ``python benchmarks/precision.py`` (seeds 0-2; prints mean +- sd over seeds).
"""

from __future__ import annotations

import math
import statistics

import torch

from pyroflows import fit, flows
from pyroflows.utils import torch_threads

F64 = torch.float64


def columns(n: int, loc: float, scale: float, seed: int) -> torch.Tensor:
    """Column 0 ~ N(loc, scale^2), column 1 ~ N(0, 1), float64."""
    z = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return torch.stack([loc + scale * z[:, 0], z[:, 1]], 1)


def normal_ll(x: torch.Tensor, loc: float, scale: float) -> torch.Tensor:
    return -0.5 * ((x - loc) / scale) ** 2 - math.log(scale) - 0.5 * math.log(2 * math.pi)


def gap(loc: float, scale: float, seed: int) -> float:
    """Held-out mean log-likelihood minus the true density's, one seed."""
    data = columns(2400, loc, scale, seed)
    train, test = data[:2000], data[2000:]
    torch.manual_seed(seed)
    flow = flows.maf(2, num_layers=2, hidden_dims=(16,))
    fit(flow, train, epochs=10, lr=3e-3, progress=False, seed=seed)
    with torch.no_grad():
        try:
            held = float(flow().log_prob(test).mean())
        except ValueError:  # versions whose float32 flows refuse float64 values
            held = float(flow().log_prob(test.float()).mean())
    truth = float((normal_ll(test[:, 0], loc, scale) + normal_ll(test[:, 1], 0.0, 1.0)).mean())
    return held - truth


def main() -> None:
    with torch_threads(1):
        for loc, scale in [(1.7e9, 100.0), (0.0, 5e-9)]:
            gaps = [gap(loc, scale, seed) for seed in range(3)]
            print(
                f"N({loc:g}, {scale:g}^2): held-out LL - truth = "
                f"{statistics.mean(gaps):+.3f} +- {statistics.stdev(gaps):.3f} nats (seeds 0-2)"
            )


if __name__ == "__main__":
    main()
