"""Cost of AutoFlow's sticking-the-landing estimator: one SVI step by scoring method.

For each latent size ``D`` and particle count ``P`` it times, in alternating rounds in one
process, an SVI step of ``AutoFlow(layers="affine")`` (the ``iaf-svi`` guide of
``benchmarks/speed.py``) with ``stick_the_landing=True`` (own draws scored through the batched
Jacobian up to ``JACOBIAN_MAX_ROWS`` rows, by inverting the flow beyond), the same always
inverting the flow, with the estimator off (what the default falls back to beyond
``JACOBIAN_MAX_ROWS / (D + 1)`` particles), and Pyro's ``AutoIAFNormal``::

    python benchmarks/stl_cost.py --dims 2,8,32 --particles 1,16,128,1024 --rounds 12

Medians over the rounds after two warm-up rounds, in ms, with the interquartile range of
the rounds in brackets; one torch thread.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import speed  # noqa: E402

from pyroflows.infer import autoflow  # noqa: E402

METHODS = ("stl", "inversion", "off", "AutoIAFNormal")


def _step(dim: int, particles: int, method: str) -> Callable[[], None]:
    """One SVI step of the guide for ``method``, as a no-argument call."""
    hidden = (64, 64) if dim <= 8 else (256, 256)
    library = "pyro" if method == "AutoIAFNormal" else "pyroflows"
    model = speed.build_svi(library, dim, hidden, particles, "cpu")
    if library == "pyroflows":
        model.module._stick_the_landing = method != "off"
    return lambda: model.train_step(None, None)


def _time(step: Callable[[], None], method: str) -> float:
    """Seconds for one step; ``inversion`` scores own draws by inverting the flow."""
    default = autoflow.JACOBIAN_MAX_ROWS
    autoflow.JACOBIAN_MAX_ROWS = 0 if method == "inversion" else default
    try:
        start = time.perf_counter()
        step()
        return time.perf_counter() - start
    finally:
        autoflow.JACOBIAN_MAX_ROWS = default


def _cell(seconds: list[float]) -> str:
    """Median and interquartile range of step times, in ms: ``median (q1-q3)``."""
    median = statistics.median(seconds)
    q = statistics.quantiles(seconds, n=4, method="inclusive") if len(seconds) > 1 else [median] * 3
    return f"{median * 1e3:.1f} ({q[0] * 1e3:.1f}-{q[2] * 1e3:.1f})"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", default="2,8,32")
    parser.add_argument("--particles", default="1,16,128,1024")
    parser.add_argument("--rounds", type=int, default=12)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print("| D | particles | " + " | ".join(METHODS) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in METHODS) + " |")
    for dim in map(int, args.dims.split(",")):
        for particles in map(int, args.particles.split(",")):
            steps = {m: _step(dim, particles, m) for m in METHODS}
            times: dict[str, list[float]] = {m: [] for m in METHODS}
            for _ in range(args.rounds + 2):
                for method in METHODS:
                    times[method].append(_time(steps[method], method))
            cells = [_cell(times[m][2:]) for m in METHODS]
            print(f"| {dim} | {particles} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
