"""Paired speed comparison of the working tree's pyroflows against a git revision.

Both versions run in one process (the revision's package is extracted with ``git archive``
and imported under another name), and every round times the same operation of both, in
alternating order: a burst of load on a shared machine hits both, so the per-round ratio
``new / base`` is far steadier than two separate runs of ``speed.py``. The table gives the
median times and the median ratio with its interquartile range. Measured per flow (5 layers,
hidden widths (64, 64) for D <= 8, (256, 256) above, batch 1024, one CPU thread): a training
step (``-log_prob(x).mean()``, backward, Adam; the IAF trains on its own samples), a
``log_prob`` and a ``sample`` without gradients.

    python benchmarks/paired.py --base 8d5fc73            # every flow at D = 8, 32
    python benchmarks/paired.py --base HEAD~3 --flows maf --dims 8 --contexts 0 --rounds 60
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import itertools
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import torch
from torch.distributions import Distribution

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from pyroflows.utils import torch_threads  # noqa: E402 (after the path is set)

FLOWS = ("maf", "iaf", "realnvp", "nsf-ar", "nsf-coupling")


@contextlib.contextmanager
def revision(rev: str) -> Iterator[ModuleType]:
    """pyroflows as it was at ``rev``, imported as ``pyroflows_base`` (its imports are
    relative); the import path and module table are restored afterwards."""
    archive = subprocess.run(
        ["git", "archive", rev, "pyroflows"], cwd=ROOT, check=True, capture_output=True
    ).stdout
    with tempfile.TemporaryDirectory() as folder:
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(folder, filter="data")
        (Path(folder) / "pyroflows").rename(Path(folder) / "pyroflows_base")
        sys.path.insert(0, folder)
        try:
            yield importlib.import_module("pyroflows_base")
        finally:
            sys.path.remove(folder)
            for name in [m for m in sys.modules if m.split(".")[0] == "pyroflows_base"]:
                del sys.modules[name]


def build(pkg: ModuleType, kind: str, dim: int, context: int) -> tuple[torch.nn.Module, Callable]:
    """The flow ``kind`` of package ``pkg``, perturbed from the identity, and its optimizer."""
    torch.manual_seed(0)
    hidden = (64, 64) if dim <= 8 else (256, 256)
    name = {"nsf-ar": "nsf", "nsf-coupling": "nsf"}.get(kind, kind)
    extra = {"coupling": True} if kind == "nsf-coupling" else {}
    flow = getattr(pkg.flows, name)(dim, context, num_layers=5, hidden_dims=hidden, **extra)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return flow, torch.optim.Adam(flow.parameters(), 1e-4)


def operations(flow, optimizer, x, ctx, kind: str) -> dict[str, Callable[[], object]]:
    """The timed operations of one flow."""

    def dist():
        return flow(ctx)

    def train() -> None:
        optimizer.zero_grad()
        if kind == "iaf":  # a guide: scores its own samples
            z, log_q = dist().rsample_and_log_prob(() if ctx is not None else (len(x),))
            loss = (log_q + 0.5 * z.square().sum(-1)).mean()
        else:
            loss = -dist().log_prob(x).mean()
        loss.backward()
        optimizer.step()

    def log_prob() -> None:
        with torch.no_grad():
            dist().log_prob(x)

    def sample() -> None:
        with torch.no_grad():
            dist().sample(() if ctx is not None else (len(x),))

    ops = {"train": train, "log_prob": log_prob, "sample": sample}
    if kind == "iaf":
        del ops["log_prob"]  # D passes: not what an IAF is for
    return ops


def paired(base: Callable, new: Callable, rounds: int) -> tuple[float, float, list[float]]:
    """Median times of ``base`` and ``new`` (seconds) and the per-round ratios new / base."""
    for f in (base, new, base, new):  # warm up
        f()
    times: dict[Callable, list[float]] = {base: [], new: []}
    ratios = []
    for r in range(rounds):
        for f in (base, new) if r % 2 else (new, base):
            start = time.perf_counter()
            f()
            times[f].append(time.perf_counter() - start)
        ratios.append(times[new][-1] / times[base][-1])
    return statistics.median(times[base]), statistics.median(times[new]), ratios


def main(argv: list[str] | None = None) -> list[tuple[str, int, int, str, float]]:
    """Run the comparison; return ``(flow, D, C, operation, median ratio)`` per row."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="git revision to compare against")
    parser.add_argument("--flows", default=",".join(FLOWS))
    parser.add_argument("--dims", default="8,32")
    parser.add_argument("--contexts", default="0,8")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    import pyro

    validation = (pyro.distributions.is_validation_enabled(), Distribution._validate_args)
    pyro.enable_validation(False)
    Distribution.set_default_validate_args(False)
    try:
        with revision(args.base) as base_pkg, torch_threads(args.threads):
            return _compare(args, base_pkg)
    finally:  # leave the process as it was
        pyro.enable_validation(validation[0])
        Distribution.set_default_validate_args(validation[1])


def _compare(args: argparse.Namespace, base_pkg: ModuleType) -> list:
    """Print the table of `main` and return its rows."""
    import pyroflows

    print(f"new = working tree, base = {args.base}; {args.rounds} rounds, batch 1024")
    print("| flow | D | C | op | base ms | new ms | new/base median (IQR) |")
    print("|---|---:|---:|---|---:|---:|---|")
    rows = []
    for kind, dim, context in itertools.product(
        args.flows.split(","), map(int, args.dims.split(",")), map(int, args.contexts.split(","))
    ):
        g = torch.Generator().manual_seed(1)
        x = torch.randn(1024, dim, generator=g)
        ctx = torch.randn(1024, context, generator=g) if context else None
        old = operations(*build(base_pkg, kind, dim, context), x, ctx, kind)
        new = operations(*build(pyroflows, kind, dim, context), x, ctx, kind)
        for op in old:
            slow = op == "sample" and kind in ("maf", "nsf-ar") and dim > 8  # D passes
            t_old, t_new, ratios = paired(
                old[op], new[op], max(5, args.rounds // 4) if slow else args.rounds
            )
            ratio = statistics.median(ratios)
            q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratio] * 3
            rows.append((kind, dim, context, op, ratio))
            print(
                f"| {kind} | {dim} | {context} | {op} | {1e3 * t_old:.2f} | {1e3 * t_new:.2f} "
                f"| {ratio:.3f} ({q[0]:.2f}-{q[2]:.2f}) |",
                flush=True,
            )
    return rows


if __name__ == "__main__":
    main()
