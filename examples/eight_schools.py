"""Eight schools, end to end: a flow guide, its trust diagnostics, ArviZ, and a gold standard.

The eight-schools data (Rubin 1981): estimated coaching effects ``y_j`` with standard errors
``sigma_j`` in eight schools, pooled by a hierarchical model

    mu ~ Normal(0, 5),  tau ~ HalfCauchy(5),
    theta_j ~ Normal(mu, tau),  y_j ~ Normal(theta_j, sigma_j).

Written as is (*centred*), the posterior of ``(theta, tau)`` is a funnel: as ``tau`` goes to 0
the thetas are squeezed together, a geometry no fixed-step sampler or simple guide handles
well. Written *non-centred*, ``theta_j = mu + tau * theta_trans_j`` with
``theta_trans_j ~ Normal(0, 1)``, it is the same posterior in gentler coordinates.

For each parameterisation the script

1. fits `pyroflows.infer.AutoFlow` by SVI with `pyroflows.infer.train_guide` (which stops
   once the ELBO no longer improves, or after ``--steps`` steps);
2. runs `pyroflows.diagnose` (Pareto-smoothed importance sampling): k-hat, ESS and a verdict;
3. exports the diagnosed draws to ArviZ (`Diagnosis.to_inference_data`) and uses ArviZ:
   ``az.summary``, ``az.loo``, and (with ``--out DIR``) ``plot_posterior``/``plot_pair`` figures;
4. with ``--reference DIR`` (posteriordb's ``eight_schools-eight_schools_noncentered``
   folder; Stan NUTS draws of this posterior), compares the posterior means and standard
   deviations of ``theta``, ``mu`` and ``tau`` with the reference, for the guide's draws and
   for the PSIS-reweighted draws.

Run from the repository root::

    python examples/eight_schools.py \\
        --reference ../shared/data/posteriordb/eight_schools-eight_schools_noncentered --out figs

The defaults (`train_guide`'s recipe with at most ``--steps 10000``, 16 particles, both
parameterisations) stopped after 1500-1600 (non-centred) and 2300-2500 (centred) steps over
seeds 0-2, about 4 minutes a run on one thread of a shared 2-core machine; ``--steps 50`` is
a smoke test. With ``--out DIR`` every number printed is also in ``DIR/results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pyro
import pyro.distributions as dist
import torch

from pyroflows import Diagnosis, diagnose
from pyroflows.infer import AutoFlow, GuideTraining, train_guide
from pyroflows.utils import torch_threads
from pyroflows.workflow import import_arviz as _import_arviz

Y = torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0], dtype=torch.float64)
SIGMA = torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0], dtype=torch.float64)


def centered(y: torch.Tensor, sigma: torch.Tensor) -> None:
    """The centred model: ``theta`` sampled directly around ``mu`` with spread ``tau``."""
    mu = pyro.sample("mu", dist.Normal(torch.zeros((), dtype=y.dtype), 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(torch.full((), 5.0, dtype=y.dtype)))
    with pyro.plate("school", len(y)):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("y", dist.Normal(theta, sigma), obs=y)


def noncentered(y: torch.Tensor, sigma: torch.Tensor) -> None:
    """The non-centred model: standard-normal offsets scaled by ``tau`` (same posterior)."""
    mu = pyro.sample("mu", dist.Normal(torch.zeros((), dtype=y.dtype), 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(torch.full((), 5.0, dtype=y.dtype)))
    with pyro.plate("school", len(y)):
        theta_trans = pyro.sample("theta_trans", dist.Normal(torch.zeros((), dtype=y.dtype), 1.0))
        theta = pyro.deterministic("theta", mu + tau * theta_trans)
        pyro.sample("y", dist.Normal(theta, sigma), obs=y)


MODELS = {"noncentered": noncentered, "centered": centered}


def fit(model, steps: int, particles: int, lr: float, seed: int) -> tuple[AutoFlow, GuideTraining]:
    """SVI with an AutoFlow guide: `train_guide`'s recipe, at most ``steps`` steps."""
    pyro.set_rng_seed(seed)
    pyro.clear_param_store()  # a guide of an earlier fit must not lend its parameters by name
    guide = AutoFlow(model, model_args=(Y, SIGMA))
    history = train_guide(
        model, guide, Y, SIGMA, num_particles=particles, lr=lr, max_steps=steps, progress=False
    )
    return guide, history


def load_reference(folder: str | os.PathLike) -> dict[str, np.ndarray]:
    """posteriordb reference draws as ``{"mu": (n,), "tau": (n,), "theta": (n, 8)}``."""
    chains = json.loads((Path(folder) / "reference_draws.json").read_text())
    column = {name: np.concatenate([c[name] for c in chains]) for name in chains[0]}
    theta = np.column_stack([column[f"theta[{j}]"] for j in range(1, 9)])
    return {"mu": column["mu"], "tau": column["tau"], "theta": theta}


def _columns(samples: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {name: samples[name].double().numpy() for name in ("mu", "tau", "theta")}


def compare(draws: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> dict[str, float]:
    """Largest error of a posterior mean, in reference sds, and largest |log sd ratio|."""
    z_mean, log_sd = [], []
    for name in ("mu", "tau", "theta"):
        ref, got = reference[name].reshape(len(reference[name]), -1), draws[name]
        got = got.reshape(len(got), -1)
        sd = ref.std(0, ddof=1)
        z_mean.append(np.abs(got.mean(0) - ref.mean(0)) / sd)
        log_sd.append(np.abs(np.log(got.std(0, ddof=1) / sd)))
    return {
        "max_z_mean": float(np.max(np.concatenate(z_mean))),
        "max_abs_log_sd_ratio": float(np.max(np.concatenate(log_sd))),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="noncentered,centered")
    parser.add_argument(
        "--steps",
        type=int,
        default=10_000,
        help="most SVI steps (train_guide's max_steps; it stops earlier once converged)",
    )
    parser.add_argument("--particles", type=int, default=16, help="ELBO particles per step")
    parser.add_argument("--lr", type=float, default=0.01, help="initial learning rate")
    parser.add_argument("--num-samples", type=int, default=8000, help="draws for diagnostics")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reference", default=None, help="posteriordb eight-schools folder")
    parser.add_argument("--out", default=None, help="folder for the figures and results.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, dict]:
    """Fit, diagnose and check each model; returns ``{model name: numbers}``."""
    args = parse_args(argv)
    az = _import_arviz()
    reference = load_reference(args.reference) if args.reference else None
    summary = None if reference is None else reference_summary(reference)
    results, draws = {}, {}
    with torch_threads(1):  # the caller's setting is restored after
        for name in args.models.split(","):
            results[name], report = check_model(name, args, az, reference)
            draws[name] = _columns(report.samples)
    if summary is not None:
        print_moments(results, summary)
    if args.out:
        if reference is not None:
            plot_funnel(draws, reference, Path(args.out) / "funnel.png")
        record = {"seed": args.seed, "models": results, "reference": summary}
        _write_json(Path(args.out) / "results.json", record)
    return results


def check_model(
    name: str, args: argparse.Namespace, az: ModuleType, reference: dict[str, np.ndarray] | None
) -> tuple[dict, Diagnosis]:
    """Steps 1-4 for one parameterisation: fit, diagnose, ArviZ, and the reference check."""
    model = MODELS[name]
    start = time.perf_counter()
    guide, history = fit(model, args.steps, args.particles, args.lr, args.seed)
    seconds = time.perf_counter() - start
    report = diagnose(model, guide, Y, SIGMA, num_samples=args.num_samples, seed=args.seed)
    # the diagnosed draws themselves, so every number below describes the same draws
    idata = report.to_inference_data(reweighted=False)
    print(f"\n=== {name} model: AutoFlow, {history.summary()}")
    print(guide.preconditioning)
    print(report)
    print(az.summary(idata, var_names=["mu", "tau", "theta"], kind="stats").round(2))
    loo = az.loo(idata)
    print(f"PSIS-LOO elpd {loo.elpd_loo:.2f} +- {loo.se:.2f}")
    result = {
        "khat": report.khat,
        "khat_sd": report.khat_sd,
        "ess": report.ess,
        "ess_sd": report.ess_sd,
        "trustworthy": report.trustworthy,
        "elbo": report.elbo,
        "log_evidence": report.log_evidence,
        "missing_mass": report.mass_check.missing_mass,
        "elpd_loo": float(loo.elpd_loo),
        "seconds": seconds,
        "steps": history.num_steps,
        "stopped": history.stopped,
    }
    if reference is not None:
        result |= against_reference(report, reference)
    if args.out:
        plot_guide(az, idata, Path(args.out), name)
    return result, report


def against_reference(report: Diagnosis, reference: dict[str, np.ndarray]) -> dict:
    """The guide's moments, its log-tau tails and its errors (raw and PSIS-reweighted)."""
    numbers = {
        "moments": moments(_columns(report.samples)),
        "log_tau_tails": log_tau_tails(report, reference),
        "guide_vs_reference": compare(_columns(report.samples), reference),
        "psis_vs_reference": compare(_columns(report.posterior), reference),
    }
    for key in ("log_tau_tails", "guide_vs_reference", "psis_vs_reference"):
        print(f"{key}: {_format(numbers[key])}")
    return numbers


def plot_guide(az: ModuleType, idata: Any, out: Path, name: str) -> None:
    """ArviZ's posterior and pair plots of one guide's draws, saved in ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out, exist_ok=True)
    az.plot_posterior(idata, var_names=["mu", "tau"])
    plt.savefig(out / f"{name}_posterior.png", dpi=80)
    az.plot_pair(
        idata,
        var_names=["tau", "theta"],
        coords={"school": [0]},
        kind="scatter",
        scatter_kwargs={"alpha": 0.1},
    )
    plt.savefig(out / f"{name}_pair.png", dpi=80)
    plt.close("all")


MOMENT_SITES = (("mu", None), ("tau", None), ("theta", 0), ("theta", 6))


def moments(draws: dict[str, np.ndarray]) -> dict[str, list[float]]:
    """Mean and sd of ``mu``, ``tau``, ``theta[0]`` and ``theta[6]``: ``{label: [mean, sd]}``."""
    out = {}
    for name, index in MOMENT_SITES:
        column = draws[name] if index is None else draws[name][:, index]
        label = name if index is None else f"{name}[{index}]"
        out[label] = [float(column.mean()), float(column.std(ddof=1))]
    return out


def log_tau_tails(report: Diagnosis, reference: dict[str, np.ndarray], heaviest: int = 20) -> dict:
    """Where a guide's tails of ``log tau`` fall short: the 1% and 99% quantiles of its draws
    and of the reference's, and how many of the ``heaviest`` importance weights fall on
    draws outside the reference's 1%-99% range (below it, above it)."""
    guide = np.log(report.samples["tau"].double().numpy())
    low, high = np.quantile(np.log(reference["tau"]), [0.01, 0.99])
    top = guide[np.argsort(report.log_weights.double().numpy())[-heaviest:]]
    return {
        "guide_q01": float(np.quantile(guide, 0.01)),
        "guide_q99": float(np.quantile(guide, 0.99)),
        "reference_q01": float(low),
        "reference_q99": float(high),
        f"heaviest_{heaviest}_below_q01": int((top < low).sum()),
        f"heaviest_{heaviest}_above_q99": int((top > high).sum()),
    }


def reference_summary(reference: dict[str, np.ndarray]) -> dict:
    """The reference's moments and, for scale, how much its two halves differ (`compare`)."""
    half = len(reference["mu"]) // 2
    first = {k: v[:half] for k, v in reference.items()}
    second = {k: v[half:] for k, v in reference.items()}
    return {"moments": moments(reference), "halves": compare(first, second)}


def print_moments(results: dict[str, dict], reference: dict) -> None:
    """Each guide's means and sds (the draws `compare` scored) beside the reference's."""
    columns = [*results, "reference"]
    print("\nmean (sd) | " + " | ".join(columns))
    for label, ref in reference["moments"].items():
        cells = [results[c]["moments"][label] for c in results] + [ref]
        print(f"{label:9s} | " + " | ".join(f"{m:.2f} ({sd:.2f})" for m, sd in cells))
    print(f"reference, half against half: {_format(reference['halves'])}")


def _format(numbers: dict) -> str:
    """``key value`` pairs, floats to 3 decimals."""
    return ", ".join(
        f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in numbers.items()
    )


def _write_json(path: Path, results: dict) -> None:
    """Write ``results`` atomically (a temporary file renamed into place)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=2))
    tmp.replace(path)


def plot_funnel(draws: dict[str, dict[str, np.ndarray]], reference, path: Path) -> None:
    """``log tau`` against ``theta[1]``: the reference draws next to each guide's draws."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = {"reference (Stan NUTS)": reference} | {f"AutoFlow, {k}": v for k, v in draws.items()}
    fig, axes = plt.subplots(
        1, len(panels), figsize=(4 * len(panels), 3.6), sharex=True, sharey=True
    )
    for ax, (title, d) in zip(np.atleast_1d(axes), panels.items(), strict=True):
        n = min(3000, len(d["tau"]))
        ax.scatter(d["theta"][:n, 0], np.log(d["tau"][:n]), s=2, alpha=0.3)
        ax.set_title(title)
        ax.set_xlabel("theta[1]")
    np.atleast_1d(axes)[0].set_ylabel("log tau")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


if __name__ == "__main__":
    main()
