"""Sample-based distances between a fitted posterior and posteriordb's reference draws.

All metrics work on arrays ``(n, d)`` with the reference's column order and standardise
both sample sets with the **reference** mean and sd per column, so columns on very
different scales (kilpisjarvi's alpha and beta) weigh the same:

* `moment_errors`: per-column ``|mean_q - mean_ref| / sd_ref`` and ``|log(sd_q / sd_ref)|``;
* `sliced_w2`: sliced 2-Wasserstein distance over random unit directions, each compared by
  1000 matched quantiles;
* `energy_distance`: ``2 E|X - Y| - E|X - X'| - E|Y - Y'|`` on at most 2000 points per set;
* `noise_floor`: the same numbers for reference chains 1-5 against chains 6-10, the level
  at which a guide is indistinguishable from the reference.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "compare",
    "energy_distance",
    "moment_errors",
    "noise_floor",
    "sliced_w2",
    "standardize",
]


def standardize(x: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both sets shifted and scaled by the reference's per-column mean and sd."""
    mean, sd = ref.mean(axis=0), ref.std(axis=0, ddof=1)
    return (x - mean) / sd, (ref - mean) / sd


def moment_errors(x: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-column ``z_mean`` and ``|log sd ratio|`` of samples ``x`` against ``ref``."""
    sd_ref = ref.std(axis=0, ddof=1)
    z_mean = np.abs(x.mean(axis=0) - ref.mean(axis=0)) / sd_ref
    log_sd = np.abs(np.log(x.std(axis=0, ddof=1) / sd_ref))
    return z_mean, log_sd


def _unit_directions(d: int, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    directions = rng.standard_normal((d, n))
    return directions / np.linalg.norm(directions, axis=0, keepdims=True)


def sliced_w2(x: np.ndarray, ref: np.ndarray, n_proj: int = 500, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance on reference-standardised data.

    Both sets are projected on ``n_proj`` random unit directions; per direction the
    1-D W2 distance is approximated by 1000 evenly spaced quantiles (0.05% to 99.95%), and
    the mean squared difference is averaged over directions before the square root.
    """
    xs, rs = standardize(x, ref)
    directions = _unit_directions(xs.shape[1], n_proj, seed)
    levels = np.linspace(0.0005, 0.9995, 1000)
    qx = _quantiles(xs @ directions, levels)
    qr = _quantiles(rs @ directions, levels)
    return float(np.sqrt(np.mean((qx - qr) ** 2)))


def _quantiles(a: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Column quantiles with linear interpolation (``np.quantile``'s default), by one sort."""
    a = np.sort(a, axis=0)
    pos = levels * (len(a) - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, len(a) - 1)
    frac = (pos - lo)[:, None]
    return a[lo] * (1 - frac) + a[hi] * frac


def _mean_distance(a: np.ndarray, b: np.ndarray) -> float:
    sq = (a**2).sum(1)[:, None] + (b**2).sum(1)[None, :] - 2.0 * a @ b.T
    return float(np.sqrt(np.clip(sq, 0.0, None)).mean())


def energy_distance(x: np.ndarray, ref: np.ndarray, n: int = 2000, seed: int = 0) -> float:
    """Energy distance on reference-standardised data, each set subsampled to ``n`` rows.

    ``2 E|X - Y| - E|X - X'| - E|Y - Y'|`` with the V-statistic (diagonal zeros included),
    so identical sets give 0 and independent sets from one distribution give ``O(1/n)``.
    """
    rng = np.random.default_rng(seed)
    xs, rs = standardize(x, ref)
    xs = xs[rng.choice(len(xs), min(n, len(xs)), replace=False)]
    rs = rs[rng.choice(len(rs), min(n, len(rs)), replace=False)]
    return 2.0 * _mean_distance(xs, rs) - _mean_distance(xs, xs) - _mean_distance(rs, rs)


def compare(x: np.ndarray, ref: np.ndarray, seed: int = 0) -> dict[str, float]:
    """All metrics of samples ``x`` against reference draws ``ref`` (both ``(n, d)``).

    Returns ``z_mean`` and ``log_sd`` (maxima over columns), ``sliced_w2``, ``energy``, and
    ``finite`` (fraction of rows of ``x`` without NaN/inf; other rows are dropped).
    """
    ok = np.isfinite(x).all(axis=1)
    x = x[ok]
    if len(x) < 2:
        nan = float("nan")
        return {"z_mean": nan, "log_sd": nan, "sliced_w2": nan, "energy": nan, "finite": 0.0}
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        z_mean, log_sd = moment_errors(x, ref)
        return {
            "z_mean": float(np.max(z_mean)),
            "log_sd": float(np.max(log_sd)),
            "sliced_w2": sliced_w2(x, ref, seed=seed),
            "energy": energy_distance(x, ref, seed=seed),
            "finite": float(ok.mean()),
        }


def noise_floor(chains: np.ndarray, seed: int = 0) -> dict[str, float]:
    """`compare` of reference chains 1-5 (as the "guide") against chains 6-10.

    ``chains`` has shape ``(10, draws, d)``.
    """
    half = chains.shape[0] // 2
    first = chains[:half].reshape(-1, chains.shape[-1])
    second = chains[half:].reshape(-1, chains.shape[-1])
    return compare(first, second, seed=seed)
