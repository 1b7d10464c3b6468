"""Accuracy of flow guides against posteriordb reference posteriors.

For each posterior (a hand-written Pyro port, see ``models.py``) every guide is trained by
`pyroflows.infer.train_guide` with its defaults (16 vectorised particles, Adam with a
learning rate that decays when the ELBO stops improving, stop when it no longer improves),
then 10,000 guide draws are mapped to the reference's columns and compared with the
reference draws (``metrics.py``), and PSIS k-hat (from `pyroflows.diagnose`) says whether the
guide itself could have told. `AutoFlow` is built with its defaults (preconditioned at the
mode, its own start point); the Pyro guides start from the posterior's data-based initial
point (``init_to_value``), which flat priors need.

Usage::

    python benchmarks/posteriordb/run.py --seeds 0,1,2 --out results.md   # full run
    python benchmarks/posteriordb/run.py --quick                          # CI smoke run
    python benchmarks/posteriordb/run.py --posteriors arK-arK --guides AutoFlow

Writes a Markdown table (printed, and to ``--out``) and a JSON file with every number
(``--json``, default ``--out`` with suffix ``.json``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.infer.autoguide import (
    AutoIAFNormal,
    AutoLaplaceApproximation,
    AutoMultivariateNormal,
    AutoNormal,
    init_to_value,
)
from pyro.infer.autoguide.initialization import InitMessenger

from pyroflows.utils import torch_threads

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import metrics  # noqa: E402
from models import (  # noqa: E402
    POSTERIORS,
    Posterior,
    load_data,
    load_reference,
    max_plate_nesting,
    per_particle,
)

DEFAULT_DATA = HERE.parents[1].parent / "shared" / "data" / "posteriordb"
PYRO_GUIDES = ("AutoNormal", "AutoMultivariateNormal", "AutoIAFNormal", "AutoLaplaceApproximation")
# AutoFlow with its defaults; "-affine": affine IAF layers; "-off": preconditioning off and
# the data-based start with scale 0.1 (AutoFlow before preconditioning); "-nostl": the
# total gradient instead of the path derivative
FLOW_GUIDES = ("AutoFlow", "AutoFlow-affine", "AutoFlow-off", "AutoFlow-nostl")
GUIDES = PYRO_GUIDES + FLOW_GUIDES
DEFAULT_GUIDES = PYRO_GUIDES + ("AutoFlow",)
QUICK_GUIDES = ("AutoNormal", "AutoMultivariateNormal", "AutoFlow")
QUICK_POSTERIORS = ("eight_schools-eight_schools_noncentered", "kilpisjarvi_mod-kilpisjarvi")


@dataclass(frozen=True)
class Settings:
    """One training budget, shared by every guide (``None``: the trainer's default)."""

    max_steps: int | None = None
    particles: int | None = None
    num_layers: int = 3
    num_samples: int = 10_000
    khat_samples: int = 4000
    seed: int = 0


QUICK = Settings(max_steps=150, num_samples=2000, khat_samples=1000)


@contextlib.contextmanager
def float64() -> Iterator[None]:
    """Default dtype float64 (Pyro's AutoIAFNormal builds its networks in the default dtype)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def make_guide(name: str, model: Callable, data: dict, init: dict, s: Settings):
    """Build guide ``name`` for ``model``; the Pyro guides start at ``init`` (constrained)."""
    from pyroflows.infer import AutoFlow

    init_fn = init_to_value(values=init)
    if name == "AutoNormal":
        guide = AutoNormal(model, init_loc_fn=init_fn)
    elif name == "AutoMultivariateNormal":
        guide = AutoMultivariateNormal(model, init_loc_fn=init_fn)
    elif name == "AutoLaplaceApproximation":
        guide = AutoLaplaceApproximation(model, init_loc_fn=init_fn)
    elif name == "AutoIAFNormal":
        dim = sum(max(1, v.numel()) for v in init.values())
        # Same depth and width as AutoFlow's default. Its base is N(0, I) on the
        # unconstrained scale whatever the init; it traces the model once with
        # init_to_feasible, which cannot sample flat (ImproperUniform) sites, so the model it
        # traces (not the one SVI runs) gets our values first.
        guide = AutoIAFNormal(
            InitMessenger(init_fn)(model),
            hidden_dim=[max(32, 2 * dim)] * 2,
            num_transforms=s.num_layers,
        )
    elif name == "AutoFlow":
        guide = AutoFlow(model, num_layers=s.num_layers)
    elif name == "AutoFlow-affine":
        guide = AutoFlow(model, layers="affine", num_layers=s.num_layers)
    elif name == "AutoFlow-nostl":
        guide = AutoFlow(model, num_layers=s.num_layers, stick_the_landing=False)
    elif name == "AutoFlow-off":
        guide = AutoFlow(model, num_layers=s.num_layers, precondition="off", init_loc_fn=init_fn)
    else:
        raise ValueError(f"unknown guide {name!r}; choose among {GUIDES}")
    guide(data)  # create the parameters now
    return guide


def fit(post: Posterior, data: dict, guide_name: str, s: Settings) -> tuple[Any, dict]:
    """Train one guide with `train_guide`'s defaults; returns the guide and statistics."""
    from pyroflows.infer import train_guide

    pyro.clear_param_store()
    pyro.set_rng_seed(s.seed)
    start = time.perf_counter()
    guide = make_guide(guide_name, post.model, data, post.init_values(data), s)
    setup = time.perf_counter() - start
    options = {"max_steps": s.max_steps, "num_particles": s.particles}
    history = train_guide(
        post.model,
        guide,
        data,
        progress=False,
        **{k: v for k, v in options.items() if v is not None},
    )
    if guide_name == "AutoLaplaceApproximation":
        guide = guide.laplace_approximation(data)
    stats = {
        "fit_seconds": time.perf_counter() - start,
        "setup_seconds": setup,
        "steps": history.num_steps,
        "stopped": history.stopped,
        "final_loss": history.final_loss,
        "nonfinite_steps": history.nonfinite_steps,
        "preconditioning": str(getattr(guide, "preconditioning", "")),
    }
    return guide, stats


def plate_nesting(model: Callable, guide: Callable, data: dict) -> int:
    """Plate dimensions used by the guide and by the model replayed on a guide draw."""
    proto = poutine.trace(guide).get_trace(data)
    return max(
        max_plate_nesting(guide, data), max_plate_nesting(poutine.replay(model, trace=proto), data)
    )


@torch.no_grad()
def guide_draws(
    guide: Callable, data: dict, post: Posterior, n: int, chunk: int = 2500
) -> dict[str, torch.Tensor]:
    """``n`` guide draws of each latent site, shaped ``(n, *site_shape)`` (constrained)."""
    shapes = post.site_shapes()
    nesting = max_plate_nesting(guide, data)
    out: dict[str, list[torch.Tensor]] = {k: [] for k in shapes}
    for start in range(0, n, chunk):
        size = min(chunk, n - start)
        with pyro.plate("_draws", size, dim=-(nesting + 1)):
            trace = poutine.trace(guide).get_trace(data)
        for k, shape in shapes.items():
            out[k].append(trace.nodes[k]["value"].reshape((size, *shape)))
    return {k: torch.cat(v) for k, v in out.items()}


@torch.no_grad()
def log_weights(
    model: Callable, guide: Callable, data: dict, n: int, chunk: int = 1000
) -> torch.Tensor:
    """``log p(x, z) - log q(z)`` for ``n`` guide draws (a vectorised particle plate)."""
    nesting = plate_nesting(model, guide, data)
    parts = []
    for start in range(0, n, chunk):
        size = min(chunk, n - start)
        with pyro.plate("_particles", size, dim=-(nesting + 1)):
            guide_trace = poutine.trace(guide).get_trace(data)
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(data)
        lw = torch.zeros(size, dtype=torch.float64)
        for trace, sign in ((model_trace, 1.0), (guide_trace, -1.0)):
            trace.compute_log_prob()
            for name, site in trace.nodes.items():
                if site["type"] == "sample" and name != "_particles":
                    lw = lw + sign * per_particle(site["log_prob"], size, nesting)
        parts.append(lw)
    return torch.cat(parts)


def psis_khat(model: Callable, guide: Callable, data: dict, n: int, seed: int) -> dict:
    """k-hat (and ESS) of the guide's importance weights.

    Uses ``pyroflows.diagnose`` when the installed pyroflows has it, else `log_weights` and
    ArviZ's ``psislw``.
    """
    try:
        from pyroflows import diagnose
    except ImportError:
        diagnose = None
    note = "arviz.psislw"
    if diagnose is not None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # ArviZ overflow on huge k
                result = diagnose(model, guide, data, num_samples=n, seed=seed)
            return {
                "khat": float(result.khat),
                "ess": float(result.ess),
                "khat_sd": float(getattr(result, "khat_sd", math.nan)),
                "ess_sd": float(getattr(result, "ess_sd", math.nan)),
                "source": "diagnose",
                "trustworthy": bool(result.trustworthy),
                "verdict": result.verdict,
            }
        except (ValueError, RuntimeError, NotImplementedError) as error:
            note = f"arviz.psislw (pyroflows.diagnose failed: {error})"
    import arviz as az

    pyro.set_rng_seed(seed)

    lw = log_weights(model, guide, data, n).numpy()
    lw = np.where(np.isnan(lw), -np.inf, lw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        smoothed, khat = az.psislw(lw.copy(), reff=1.0)
    ess = float(1.0 / np.exp(2 * np.asarray(smoothed)).sum())
    return {"khat": float(khat), "ess": ess, "source": note}


def evaluate(post: Posterior, data: dict, ref: np.ndarray, guide_name: str, s: Settings) -> dict:
    """Fit one guide on one posterior and score it against the reference."""
    if guide_name not in GUIDES:
        raise ValueError(f"unknown guide {guide_name!r}")
    guide, stats = fit(post, data, guide_name, s)
    start = time.perf_counter()
    pyro.set_rng_seed(s.seed + 1)
    # Extreme guide draws (e.g. tau = exp(-800) = 0 in a funnel) must give non-finite
    # numbers, which the metrics drop and count, rather than stop the run.
    with pyro.validation_enabled(False):
        draws = guide_draws(guide, data, post, s.num_samples)
        columns = post.to_columns(draws).numpy()
        scores = metrics.compare(columns, ref.reshape(-1, ref.shape[-1]), seed=s.seed)
        try:
            khat = psis_khat(post.model, guide, data, s.khat_samples, s.seed + 2)
        except (ValueError, RuntimeError) as error:  # e.g. no finite weight at all
            khat = {"khat": float("inf"), "ess": 0.0, "source": f"failed: {error}"}
    stats["eval_seconds"] = time.perf_counter() - start
    return {**scores, **khat, **stats}


def _fmt(x: float, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "nan"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return f"{x:.{digits}f}" if abs(x) < 1000 else f"{x:.2g}"


def _stat(cells: list[dict], key: str) -> tuple[float, float]:
    """Mean and sd over seeds of one number (sd 0 for one seed)."""
    x = np.asarray([c[key] for c in cells], dtype=float)
    return float(x.mean()), float(x.std(ddof=1)) if len(x) > 1 else 0.0


def _cell(cells: list[dict], key: str, digits: int = 3) -> str:
    mean, sd = _stat(cells, key)
    text = _fmt(mean, digits) + (f" ± {_fmt(sd, digits)}" if len(cells) > 1 else "")
    monte_carlo = [c[f"{key}_sd"] for c in cells if math.isfinite(c.get(f"{key}_sd", math.nan))]
    if monte_carlo:  # the draws' own noise (bootstrap), whatever the seeds' spread
        text += f" (MC {_fmt(float(np.mean(monte_carlo)), digits)})"
    return text


def tables(results: dict, guides: Sequence[str]) -> str:
    """Markdown tables (mean ± sd over seeds): sliced-W2, k-hat, moments, fit time."""
    blocks = [
        (
            "sliced-W2 (noise floor: reference chains 1-5 vs 6-10; **bold**: best mean of the row)",
            "sliced_w2",
            3,
        ),
        (
            "PSIS k-hat (4000 draws; > 0.7: do not trust; MC: the bootstrap sd of k-hat "
            "over the draws, `psis_spread`)",
            "khat",
            2,
        ),
        ("max z_mean (|mean error| in reference sds, worst column)", "z_mean", 3),
        ("max |log sd ratio| (worst column)", "log_sd", 3),
        ("fit wall time, s (set-up, preconditioning and training)", "fit_seconds", 1),
    ]
    lines: list[str] = []
    for title, key, digits in blocks:
        lines += [
            title,
            "",
            "| posterior | noise floor | " + " | ".join(guides) + " |",
            "|---" * (len(guides) + 2) + "|",
        ]
        for name, row in results.items():
            means = {g: _stat(row["guides"][g], key)[0] for g in guides}
            finite = [v for v in means.values() if math.isfinite(v)]
            best = min(finite) if finite and key == "sliced_w2" else None
            cells = [
                f"**{_cell(row['guides'][g], key, digits)}**"
                if means[g] == best
                else _cell(row["guides"][g], key, digits)
                for g in guides
            ]
            floor = _fmt(row["noise_floor"].get(key, math.nan), digits)
            lines.append(f"| {name} | {floor} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def targets(results: dict, guides: Sequence[str]) -> list[str]:
    """The issue's targets, checked for each AutoFlow column on the means over seeds."""
    out = []
    rivals = [g for g in guides if not g.startswith("AutoFlow")]
    for flow in [g for g in guides if g.startswith("AutoFlow")]:
        beats, near, flagged, missed = [], [], [], []
        for name, row in results.items():
            w2 = _stat(row["guides"][flow], "sliced_w2")[0]
            others = [_stat(row["guides"][g], "sliced_w2")[0] for g in rivals]
            if all(w2 < o or not math.isfinite(o) for o in others):
                beats.append(name)
            if w2 <= 2 * row["noise_floor"]["sliced_w2"]:
                near.append(name)
            elif _stat(row["guides"][flow], "khat")[0] > 0.7 or not all(
                c.get("trustworthy", True) for c in row["guides"][flow]
            ):
                flagged.append(name)
            else:
                missed.append(name)
        n = len(results)
        out.append(
            f"{flow}: best sliced-W2 vs {', '.join(rivals) or 'no Pyro guide'} on "
            f"{len(beats)}/{n}; within 2x noise floor on {len(near)}/{n}; others judged not "
            f"trustworthy by diagnose (mean k-hat > 0.7, or its verdict on a seed): "
            f"{flagged or 'none'}; others not flagged: {missed or 'none'}"
        )
    return out


def run(
    names: Sequence[str],
    guides: Sequence[str],
    s: Settings,
    root: Path,
    seeds: Sequence[int] = (0,),
    log: Callable[[str], None] = print,
) -> dict:
    """Fit and score every guide on every posterior for every seed (JSON-ready results)."""
    results: dict[str, Any] = {}
    for name in names:
        post = POSTERIORS[name]
        data, ref = load_data(root, post), load_reference(root, post)
        row = {"noise_floor": metrics.noise_floor(ref, seed=0), "guides": {g: [] for g in guides}}
        for g in guides:
            for seed in seeds:
                try:
                    r = evaluate(post, data, ref, g, replace(s, seed=seed))
                except Exception as error:  # one failed fit must not stop the benchmark
                    nan = float("nan")
                    r = {
                        k: nan
                        for k in (
                            "z_mean",
                            "log_sd",
                            "sliced_w2",
                            "energy",
                            "khat",
                            "ess",
                            "final_loss",
                            "fit_seconds",
                            "eval_seconds",
                        )
                    }
                    r.update(finite=0.0, source=f"failed: {type(error).__name__}: {error}")
                row["guides"][g].append({"seed": seed, **r})
                log(
                    f"{name:42s} {g:24s} seed {seed} sW2 {_fmt(r['sliced_w2'])} (floor "
                    f"{_fmt(row['noise_floor']['sliced_w2'])}) k-hat {_fmt(r['khat'], 2)} "
                    f"z {_fmt(r['z_mean'])} logsd {_fmt(r['log_sd'])} fit "
                    f"{r['fit_seconds']:.1f}s ({r.get('steps', 0)} steps) eval "
                    f"{r['eval_seconds']:.1f}s {r.get('preconditioning', '')}"
                )
        results[name] = row
    return results


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="CI mode: 2 posteriors, few steps")
    p.add_argument("--posteriors", help="comma-separated folder names (default all 9)")
    p.add_argument(
        "--guides",
        help=f"comma-separated among {','.join(GUIDES)} (default {','.join(DEFAULT_GUIDES)})",
    )
    p.add_argument("--max-steps", type=int, help="bound on SVI steps (default: the trainer's)")
    p.add_argument("--particles", type=int, help="ELBO particles (default: the trainer's)")
    p.add_argument("--num-layers", type=int, help="flow layers (AutoFlow, AutoIAFNormal)")
    p.add_argument("--num-samples", type=int, help="guide draws scored against the reference")
    p.add_argument("--seeds", default="0", help="comma-separated seeds (table: mean ± sd)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="posteriordb folder")
    p.add_argument("--out", type=Path, help="write the Markdown tables here")
    p.add_argument("--json", type=Path, help="write all numbers here (default: --out .json)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    """Command-line entry point; returns the results dict (with the table under ``table``)."""
    args = parse_args(argv)
    s = QUICK if args.quick else Settings()
    overrides = {
        "max_steps": args.max_steps,
        "particles": args.particles,
        "num_layers": args.num_layers,
        "num_samples": args.num_samples,
    }
    s = replace(s, **{k: v for k, v in overrides.items() if v is not None})
    seeds = [int(x) for x in args.seeds.split(",")]
    names = (
        args.posteriors.split(",")
        if args.posteriors
        else (list(QUICK_POSTERIORS) if args.quick else list(POSTERIORS))
    )
    guides = (
        args.guides.split(",")
        if args.guides
        else list(QUICK_GUIDES if args.quick else DEFAULT_GUIDES)
    )
    unknown = [n for n in names if n not in POSTERIORS] + [g for g in guides if g not in GUIDES]
    if unknown:
        raise SystemExit(f"unknown posterior or guide: {unknown}")
    if not args.data.is_dir():
        raise SystemExit(f"posteriordb data not found at {args.data}")
    start = time.perf_counter()
    with torch_threads(args.threads), float64():
        results = run(names, guides, s, args.data, seeds)
    wall = time.perf_counter() - start
    table = tables(results, guides)
    summary = targets(results, guides)
    versions = f"torch {torch.__version__}, pyro-ppl {pyro.__version__}"
    text = (
        f"{table}\n"
        + "\n".join(f"* {line}" for line in summary)
        + f"\n\nSettings: {asdict(s)}, seeds {seeds}, {args.threads} thread(s), "
        f"{versions}; wall time {wall:.0f} s.\n"
    )
    print(text)
    out = {
        "settings": asdict(s),
        "seeds": seeds,
        "wall_seconds": wall,
        "results": results,
        "targets": summary,
        "table": table,
        "versions": versions,
    }
    if args.out:
        args.out.write_text(text)
    json_path = args.json or (args.out.with_suffix(".json") if args.out else None)
    if json_path:
        json_path.write_text(json.dumps(out, indent=1, default=float))
    return out


if __name__ == "__main__":
    main()
