"""Photometric redshifts: the conditional density p(redshift | u, g, r, i, z, y) with a spline flow.

A neural spline flow over the redshift (``D = 1``) conditioned on six magnitudes (``C = 6``)
is fitted with `pyroflows.fit`, which standardises redshift and magnitudes inside the flow
and maps the redshift onto the positive half-line (``bounds``), so densities are on the
original scale and every sample is a valid redshift. The rows are split 80/10/10 into
train/validation/test with a fixed seed. On the test rows the script reports:

* the mean conditional log-likelihood (nats, original redshift scale; higher is better);
* calibration: the probability integral transform PIT = F(z_true | magnitudes), estimated
  from ``--pit-samples`` flow samples per row, its histogram (``pit.png``) and its
  deviation from uniform (Kolmogorov-Smirnov distance, largest relative deviation of a
  histogram bin), and the empirical coverage of central 50/68/90/95% intervals;
* point estimates: the predicted median against the true redshift (``median_vs_true.png``),
  with the usual bias, NMAD scatter and outlier fraction of ``(z_med - z) / (1 + z)``.

Run it from the repository root::

    python examples/photo_z.py --out photo_z_out            # a few minutes on 2 CPU cores
    python examples/photo_z.py --epochs 1 --rows 2000       # seconds (smoke test)

The data default to ``../shared/data/galaxies/galaxies.csv`` next to the repository
(columns ``redshift,u,g,r,i,z,y``); use ``--data`` for another path.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

import pyroflows
from pyroflows.utils import torch_threads

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT / ".." / "shared" / "data" / "galaxies" / "galaxies.csv"
BANDS = ["u", "g", "r", "i", "z", "y"]
INTERVALS = (0.50, 0.68, 0.90, 0.95)
PIT_BINS = 20


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data",
        type=Path,
        default=DEFAULT_DATA,
        help="path to galaxies.csv (default: %(default)s)",
    )
    parser.add_argument("--out", type=Path, default=Path("photo_z_out"), help="folder for plots")
    parser.add_argument("--epochs", type=int, default=30, help="maximum training epochs")
    parser.add_argument("--rows", type=int, default=None, help="use a random subset of rows")
    parser.add_argument("--seed", type=int, default=0, help="seed of split, model and sampling")
    parser.add_argument("--batch-size", type=int, default=512, help="rows per step")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak Adam learning rate")
    parser.add_argument("--layers", type=int, default=3, help="spline layers")
    parser.add_argument("--hidden", type=int, default=128, help="width of the 2 hidden layers")
    parser.add_argument("--bins", type=int, default=16, help="spline bins")
    parser.add_argument(
        "--coupling",
        action="store_true",
        help="coupling layers instead of autoregressive ones (the same model for one feature)",
    )
    parser.add_argument("--pit-samples", type=int, default=500, help="flow samples per test row")
    parser.add_argument("--chunk", type=int, default=250, help="test rows sampled at once")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or table")
    args = parser.parse_args(argv)
    if not args.data.is_file():
        parser.error(
            f"galaxy data not found at {args.data}; pass --data PATH/TO/galaxies.csv "
            "(columns redshift,u,g,r,i,z,y)"
        )
    for name in ("epochs", "batch_size", "layers", "hidden", "bins", "pit_samples", "chunk"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.rows is not None and args.rows < 20:
        parser.error("--rows must be at least 20 (to leave rows for validation and test)")
    return args


def load(path: Path, rows: int | None, seed: int):
    """(train, validation, test) DataFrames: a fixed-seed 80/10/10 split of the rows."""
    import pandas as pd

    frame = pd.read_csv(path)
    missing = [c for c in ["redshift", *BANDS] if c not in frame.columns]
    if missing:
        raise SystemExit(f"{path} lacks the columns {missing}")
    frame = frame[["redshift", *BANDS]].dropna()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(frame))
    if rows is not None:
        order = order[:rows]
    n_val = n_test = max(1, len(order) // 10)
    test, val, train = order[:n_test], order[n_test : n_test + n_val], order[n_test + n_val :]
    return (frame.iloc[i].reset_index(drop=True) for i in (train, val, test))


@torch.no_grad()
def evaluate(flow: pyroflows.Flow, z_true: torch.Tensor, mags: torch.Tensor, args) -> dict:
    """Log-likelihood, PIT values and sample quantiles on the test rows."""
    probs = sorted({0.5} | {round(p, 6) for q in INTERVALS for p in ((1 - q) / 2, (1 + q) / 2)})
    levels = torch.tensor(probs, dtype=z_true.dtype)
    log_probs, pits, pits_exact, quantiles = [], [], [], []
    generator_state = torch.get_rng_state()
    torch.manual_seed(args.seed + 1)
    for start in range(0, len(z_true), args.chunk):
        y, c = z_true[start : start + args.chunk], mags[start : start + args.chunk]
        dist = flow.condition(c)
        log_probs.append(dist.log_prob(y))
        samples = dist.sample((args.pit_samples,))[..., 0]  # (S, rows)
        pits.append((samples <= y[:, 0]).to(y.dtype).mean(0))
        quantiles.append(torch.quantile(samples, levels, dim=0).T)  # (rows, levels)
        # Cross-check: for one feature every layer is increasing, so F(y) = Phi(f^-1(y)).
        u = y
        for t in reversed(dist.transforms):
            u = t.inv_and_ladj(u)[0]
        pits_exact.append(torch.special.ndtr(u[:, 0]))
    torch.set_rng_state(generator_state)
    return {
        "log_prob": torch.cat(log_probs),
        "pit": torch.cat(pits),
        "pit_exact": torch.cat(pits_exact),
        "quantiles": {p: q for p, q in zip(probs, torch.cat(quantiles).T, strict=True)},
    }


def summarise(z: torch.Tensor, result: dict) -> dict:
    """Scalar metrics from the test evaluation."""
    z = z[:, 0].double()
    pit = result["pit"].double()
    q = {p: v.double() for p, v in result["quantiles"].items()}
    metrics: dict = {"test_log_likelihood": float(result["log_prob"].double().mean())}

    # PIT against the uniform distribution.
    sorted_pit = pit.sort().values
    n = len(sorted_pit)
    ecdf_hi = torch.arange(1, n + 1, dtype=torch.float64) / n
    ecdf_lo = torch.arange(0, n, dtype=torch.float64) / n
    ks = torch.maximum(ecdf_hi - sorted_pit, sorted_pit - ecdf_lo).max()
    counts = torch.histc(pit, bins=PIT_BINS, min=0.0, max=1.0)
    relative = counts / (n / PIT_BINS)
    metrics["pit_ks"] = float(ks)
    metrics["pit_hist_max_dev"] = float((relative - 1).abs().max())
    metrics["pit_hist_counts"] = [int(c) for c in counts]
    metrics["pit_outlier_fraction"] = float(((pit <= 0.0) | (pit >= 1.0)).double().mean())
    metrics["pit_sampling_vs_exact"] = float((pit - result["pit_exact"].double()).abs().mean())

    for level in INTERVALS:
        lo, hi = q[round((1 - level) / 2, 6)], q[round((1 + level) / 2, 6)]
        metrics[f"coverage_{round(100 * level)}"] = float(((z >= lo) & (z <= hi)).double().mean())

    median = q[0.5]
    dz = (median - z) / (1 + z)
    metrics["median_bias"] = float(dz.median())
    metrics["median_sigma_nmad"] = float(1.4826 * (dz - dz.median()).abs().median())
    metrics["median_outlier_fraction"] = float((dz.abs() > 0.15).double().mean())
    return metrics


def plot(z: torch.Tensor, result: dict, metrics: dict, out: Path) -> list[str]:
    """Write the PIT histogram and the median-vs-true plot; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    pit = result["pit"].numpy()
    n = len(pit)
    fig, ax = plt.subplots(figsize=(5, 3.6))
    ax.hist(pit, bins=PIT_BINS, range=(0, 1), density=True, color="C0", alpha=0.8)
    expected = n / PIT_BINS
    band = math.sqrt(expected * (1 - 1 / PIT_BINS)) / expected  # binomial 1-sigma, relative
    ax.axhline(1.0, color="k", lw=1)
    ax.axhspan(1 - band, 1 + band, color="k", alpha=0.12, lw=0)  # uniform, binomial 1 sigma
    ax.set_xlim(0, 1)
    ax.set_xlabel("PIT = F(z_true | magnitudes)")
    ax.set_ylabel("density")
    ax.set_title(
        f"PIT of {n} test rows: KS = {metrics['pit_ks']:.3f}\n(line: uniform, grey: its ±1σ band)",
        fontsize=10,
    )
    fig.tight_layout()
    pit_path = out / "pit.png"
    fig.savefig(pit_path, dpi=120)
    plt.close(fig)

    true = z[:, 0].numpy()
    median = result["quantiles"][0.5].numpy()
    fig, ax = plt.subplots(figsize=(4.6, 4.4))
    top = float(max(true.max(), median.max())) * 1.02
    if n >= 2000:
        ax.hexbin(true, median, gridsize=60, extent=(0, top, 0, top), bins="log", cmap="viridis")
    else:
        ax.scatter(true, median, s=4, alpha=0.5)
    grid = np.linspace(0, top, 2)
    ax.plot(grid, grid, "w-" if n >= 2000 else "k-", lw=1)
    for sign in (-1, 1):  # outlier boundaries |dz| / (1 + z) = 0.15
        ax.plot(grid, grid + sign * 0.15 * (1 + grid), "r--", lw=0.8)
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_xlabel("true redshift")
    ax.set_ylabel("predicted median redshift")
    ax.set_title(f"σ_NMAD = {metrics['median_sigma_nmad']:.3f}")
    fig.tight_layout()
    median_path = out / "median_vs_true.png"
    fig.savefig(median_path, dpi=120)
    plt.close(fig)
    return [str(pit_path), str(median_path)]


def table(metrics: dict) -> str:
    rows = [
        ("test mean log-likelihood (nats)", f"{metrics['test_log_likelihood']:.4f}"),
        ("validation mean log-likelihood", f"{metrics['val_log_likelihood']:.4f}"),
        ("PIT KS distance from uniform", f"{metrics['pit_ks']:.4f}"),
        ("PIT largest bin deviation (rel.)", f"{metrics['pit_hist_max_dev']:.3f}"),
        ("PIT outside all samples", f"{metrics['pit_outlier_fraction']:.4f}"),
        ("PIT |sampled - exact| (mean)", f"{metrics['pit_sampling_vs_exact']:.4f}"),
    ]
    rows += [
        (f"coverage of central {round(100 * q)}%", f"{metrics[f'coverage_{round(100 * q)}']:.3f}")
        for q in INTERVALS
    ]
    rows += [
        ("median: bias of dz/(1+z)", f"{metrics['median_bias']:+.4f}"),
        ("median: sigma_NMAD", f"{metrics['median_sigma_nmad']:.4f}"),
        ("median: outliers |dz|/(1+z)>0.15", f"{metrics['median_outlier_fraction']:.4f}"),
        (
            "train / evaluation time (s)",
            f"{metrics['train_seconds']:.1f} / {metrics['eval_seconds']:.1f}",
        ),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def main(argv: Sequence[str] | None = None) -> dict:
    """Fit, evaluate and plot; return the metrics (also written to ``OUT/metrics.json``)."""
    args = parse_args(argv)
    with torch_threads(args.threads):  # the caller's setting is restored after
        return run(args)


def run(args: argparse.Namespace) -> dict:
    train, val, test = load(args.data, args.rows, args.seed)
    torch.manual_seed(args.seed)
    flow = pyroflows.flows.nsf(
        1,
        len(BANDS),
        coupling=args.coupling,
        num_layers=args.layers,
        hidden_dims=(args.hidden, args.hidden),
        count_bins=args.bins,
    )
    history = pyroflows.fit(
        flow,
        train[["redshift"]],
        context=train[BANDS],
        validation_data=val[["redshift"]],
        validation_context=val[BANDS],
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        bounds={"redshift": (0.0, None)},
        seed=args.seed,
        progress=not args.quiet,
    )

    start = time.perf_counter()
    z_true = torch.tensor(test[["redshift"]].to_numpy(), dtype=torch.float32)
    mags = torch.tensor(test[BANDS].to_numpy(), dtype=torch.float32)
    result = evaluate(flow, z_true, mags, args)
    metrics = summarise(z_true, result)
    metrics.update(
        val_log_likelihood=-history.best_val_loss,
        best_epoch=history.best_epoch,
        epochs_run=history.epochs_run,
        train_seconds=history.wall_time,
        eval_seconds=time.perf_counter() - start,
        n_train=len(train),
        n_val=len(val),
        n_test=len(test),
        pit_samples=args.pit_samples,
    )
    metrics["plots"] = plot(z_true, result, metrics, args.out)
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    if not args.quiet:
        print(
            f"\nphoto-z: {len(train)}/{len(val)}/{len(test)} train/val/test rows, "
            f"{history.epochs_run} epochs (best {history.best_epoch + 1})\n"
        )
        print(table(metrics))
        print(f"\nwrote {', '.join(metrics['plots'])} and {args.out / 'metrics.json'}")
    return metrics


if __name__ == "__main__":
    main()
