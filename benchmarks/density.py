"""Density-estimation benchmark: pyroflows against zuko and Pyro's own spline flows.

Every library fits the same neural spline flow (NSF: autoregressive rational-quadratic
splines on ``[-5, 5]``, identity outside) with the same number of layers, hidden widths and
bins, in **one shared training loop**: same data, same standardisation (training-split mean
and standard deviation, applied outside the flow), same initial seed, same minibatches in
the same order, Adam with the same learning rate and cosine schedule, the same gradient
clipping and the same number of steps. The validation split is scored at regular intervals
and the best checkpoint is scored on a fixed test split. Scores are mean held-out
log-likelihoods in nats on the *original* scale (the log-determinant of the standardisation
is added back), so higher is better and the numbers are comparable across libraries.

Every library scores data in one pass per layer (the MAF direction):

* pyroflows: ``flows.nsf(..., invert=True)`` (the default); ``log_prob`` runs each layer's
  inverse, whose MADE reads the data side.
* zuko: ``zuko.flows.NSF``; its transforms map data to noise, and ``log_prob`` calls them
  forward.
* Pyro: ``SplineAutoregressive`` / ``ConditionalSplineAutoregressive`` layers are cheap in
  their forward direction, so they are used as maps from data to noise, wrapped in
  ``.inv`` inside a ``TransformedDistribution``.

Tasks: the five 2-D toy densities of `pyroflows.datasets`, the 7-D galaxy catalogue
(joint density of redshift and six magnitudes) and photometric redshift (the 1-D density of
redshift given the six magnitudes). The flow's layers, width, bins and batch size are those
pyroflows' sizing rule (`pyroflows.training.sizing`) picks for the task's training rows, so
the pyroflows column is the library's default flow. Run from the repository root::

    python benchmarks/density.py --steps 3000 --seeds 3 --out table.md
    python benchmarks/density.py --quick              # seconds per cell, for CI

Anchors that cannot be imported are skipped with a note.
"""

from __future__ import annotations

import argparse
import copy
import functools
import math
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from pyroflows.training.sizing import batch_size_for, flow_size
from pyroflows.utils import torch_threads

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT / ".." / "shared" / "data" / "galaxies" / "galaxies.csv"

TOY_TASKS = ("two_moons", "eight_gaussians", "checkerboard", "spirals", "rings")
GALAXY_TASKS = ("galaxies", "photo_z")
ALL_TASKS = TOY_TASKS + GALAXY_TASKS
LIBRARIES = ("pyroflows", "zuko", "pyro")
# pyroflows' own `fit` loop, and ablations of pyroflows' choices, for comparison only
EXTRA_LIBRARIES = (
    "pyroflows-fit",
    "pyroflows-random-init",
    "pyroflows-small-init",
    "pyroflows-lu",
    "pyroflows-min-derivative",
    "pyroflows-bound8",
    "pyroflows-raw-unbounded",
)

BOUND = 5.0  # spline interval [-5, 5] for every library (zuko's fixed default)
MIN_SLOPE = 1e-3  # minimum derivative / slope, the default of all three libraries
CLIP_GRAD_NORM = 5.0


# ----------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class Architecture:
    """The flow every library builds for a task."""

    layers: int
    hidden: tuple[int, ...]
    bins: int
    batch_size: int


@dataclass
class Split:
    """Train/validation/test rows on the original scale (context ``None`` if unconditional)."""

    x_train: Tensor
    x_val: Tensor
    x_test: Tensor
    c_train: Tensor | None = None
    c_val: Tensor | None = None
    c_test: Tensor | None = None

    @property
    def dim(self) -> int:
        return self.x_train.shape[1]

    @property
    def context_dim(self) -> int:
        return 0 if self.c_train is None else self.c_train.shape[1]


def load_galaxies(path: Path, max_rows: int | None = None) -> np.ndarray:
    """The galaxy catalogue as a ``(N, 7)`` float64 array (redshift, u, g, r, i, z, y)."""
    import pandas as pd

    if not path.is_file():
        raise FileNotFoundError(
            f"galaxy data not found at {path}; pass --data PATH/TO/galaxies.csv "
            "or leave the galaxies and photo_z tasks out with --tasks"
        )
    frame = pd.read_csv(path)
    columns = ["redshift", "u", "g", "r", "i", "z", "y"]
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{path} lacks the columns {missing}")
    data = frame[columns].to_numpy(dtype=np.float64, copy=True)
    if max_rows is not None and max_rows < len(data):
        data = data[np.random.default_rng(12345).permutation(len(data))[:max_rows]]
    return data


def split_rows(n: int, fractions: tuple[float, float] = (0.1, 0.1), seed: int = 0):
    """Fixed-seed (train, validation, test) row indices; ``fractions`` = (val, test)."""
    order = np.random.default_rng(seed).permutation(n)
    n_val, n_test = (max(1, int(round(f * n))) for f in fractions)
    return order[n_val + n_test :], order[:n_val], order[n_val : n_val + n_test]


def make_split(task: str, quick: bool, data_path: Path) -> Split:
    """The fixed data of a task (independent of the training seed)."""
    if task in TOY_TASKS:
        from pyroflows.datasets import load_toy

        n_train, n_val, n_test = (2000, 500, 2000) if quick else (20_000, 5000, 20_000)
        x = load_toy(task, n_train + n_val + n_test, seed=0).double()
        return Split(x[:n_train], x[n_train : n_train + n_val], x[n_train + n_val :])
    data = torch.from_numpy(load_galaxies(data_path, 3000 if quick else None))
    train, val, test = (torch.from_numpy(i) for i in split_rows(len(data)))
    if task == "galaxies":
        return Split(data[train], data[val], data[test])
    if task == "photo_z":
        x, c = data[:, :1], data[:, 1:]
        return Split(x[train], x[val], x[test], c[train], c[val], c[test])
    raise ValueError(f"unknown task {task!r}; choose from {', '.join(ALL_TASKS)}")


def architecture_of(split: Split) -> Architecture:
    """The flow of pyroflows' sizing rule for the split's training rows (the defaults of
    `pyroflows.fit` and the command line), built alike by every library."""
    size = flow_size(len(split.x_train), split.dim)
    return Architecture(
        layers=size.num_layers,
        hidden=size.hidden_dims,
        bins=size.count_bins,
        batch_size=batch_size_for(len(split.x_train)),
    )


class Standardizer:
    """``(x - mean) / std`` with training statistics; ``log_det`` converts densities back."""

    def __init__(self, train: Tensor):
        self.loc = train.mean(0)
        std = train.std(0, unbiased=False)
        self.scale = torch.where(std > 0, std, torch.ones_like(std))

    def __call__(self, x: Tensor) -> Tensor:
        return (x - self.loc) / self.scale

    @property
    def log_det(self) -> float:
        """``log |d standardised / d original|`` summed over features (add to log-densities)."""
        return float(-self.scale.log().sum())


# -------------------------------------------------------------------------- libraries


@dataclass
class Model:
    """A library's flow as seen by the shared loop: parameters and a log-density."""

    module: nn.Module
    log_prob: Callable[[Tensor, Tensor | None], Tensor]

    def num_params(self) -> int:
        return sum(p.numel() for p in self.module.parameters() if p.requires_grad)


def build_pyroflows(dim: int, context_dim: int, arch: Architecture, bound: float = BOUND) -> Model:
    from pyroflows import flows

    flow = flows.nsf(
        dim,
        context_dim,
        num_layers=arch.layers,
        hidden_dims=arch.hidden,
        count_bins=arch.bins,
        bound=bound,
    )
    return Model(flow, lambda x, c: flow.condition(c).log_prob(x))


def build_pyroflows_random_init(dim: int, context_dim: int, arch: Architecture) -> Model:
    """Ablation: the conditioners' output layers keep torch's default initialisation (as
    zuko's and Pyro's do) instead of starting at zero, so the flow does not start at the
    identity."""
    model = build_pyroflows(dim, context_dim, arch)
    for layer in model.module.layers:
        layer.conditioner.net[-1].reset_parameters()
    return model


def build_pyroflows_small_init(dim: int, context_dim: int, arch: Architecture) -> Model:
    """Ablation: as ``pyroflows-random-init`` with the output layers' initial weights and
    biases scaled by 0.1, so the flow starts close to (not at) the identity."""
    model = build_pyroflows_random_init(dim, context_dim, arch)
    with torch.no_grad():
        for layer in model.module.layers:
            for p in layer.conditioner.net[-1].parameters():
                p.mul_(0.1)
    return model


def build_pyroflows_lu(dim: int, context_dim: int, arch: Architecture) -> Model:
    """Ablation: an `LULinear` mixing layer between the spline layers (all in the natural
    order) instead of alternating the autoregressive order."""
    from pyroflows import Autoregressive, Flow, LULinear
    from pyroflows.transformers import RationalQuadraticSpline

    layers = []
    for i in range(arch.layers):
        if i:
            layers.append(LULinear(dim))
        spline = RationalQuadraticSpline(count_bins=arch.bins, bound=BOUND)
        layers.append(
            Autoregressive(
                dim, spline, context_dim=context_dim, hidden_dims=arch.hidden, invert=True
            )
        )
    flow = Flow(layers, dim, context_dim)
    return Model(flow, lambda x, c: flow.condition(c).log_prob(x))


def _pyroflows_with_spline(
    dim: int, context_dim: int, arch: Architecture, **spline: float
) -> Model:
    """The pyroflows NSF with its spline's other options changed (for the ablations)."""
    from pyroflows import flows
    from pyroflows.transformers import RationalQuadraticSpline

    transformer = RationalQuadraticSpline(count_bins=arch.bins, bound=BOUND, **spline)
    flow = flows.autoregressive_flow(
        dim, transformer, context_dim, num_layers=arch.layers, hidden_dims=arch.hidden
    )
    return Model(flow, lambda x, c: flow.condition(c).log_prob(x))


# Ablations: minimum derivative 1e-5 instead of 1e-3 (steeper splines allowed); no soft bound
# on the raw parameters (the default 2 keeps float32 round trips accurate but caps how steep a
# bin can be); splines on [-8, 8] instead of [-5, 5] (fewer standardised rows in the tails).
build_pyroflows_min_derivative = functools.partial(_pyroflows_with_spline, min_derivative=1e-5)
build_pyroflows_raw_bound = functools.partial(_pyroflows_with_spline, raw_bound=math.inf)
build_pyroflows_bound = functools.partial(build_pyroflows, bound=8.0)


def build_zuko(dim: int, context_dim: int, arch: Architecture) -> Model:
    import zuko

    # NSF = MAF with MonotonicRQSTransform (bound 5, slope 1e-3), orders alternating
    # ascending/descending (randperm=False), fully autoregressive (passes=None).
    flow = zuko.flows.NSF(
        dim,
        context_dim,
        bins=arch.bins,
        slope=MIN_SLOPE,
        transforms=arch.layers,
        hidden_features=list(arch.hidden),
    )
    return Model(flow, lambda x, c: flow(c).log_prob(x))


class _PyroNSF(nn.Module):
    """Pyro spline-autoregressive layers used as data-to-noise maps (MAF direction).

    Built from ``AutoRegressiveNN``/``ConditionalAutoRegressiveNN`` with three parameter
    groups (widths, heights, derivatives), i.e. the rational-quadratic spline of Durkan et al.
    Pyro's helpers ``spline_autoregressive(..., order="quadratic")`` cannot be used: they
    always ask the network for a fourth (linear-spline) group and then fail to unpack it.
    """

    def __init__(self, dim: int, context_dim: int, arch: Architecture):
        super().__init__()
        from pyro.distributions.transforms import (
            ConditionalSplineAutoregressive,
            SplineAutoregressive,
        )
        from pyro.nn import AutoRegressiveNN, ConditionalAutoRegressiveNN

        self.dim, self.context_dim = dim, context_dim
        k = arch.bins
        layers = []
        for i in range(arch.layers):
            order = torch.arange(dim) if i % 2 == 0 else torch.arange(dim).flip(0)
            if context_dim:
                with warnings.catch_warnings():  # it warns for dim == 1, which is intended
                    warnings.simplefilter("ignore", UserWarning)
                    net = ConditionalAutoRegressiveNN(
                        dim, context_dim, list(arch.hidden), [k, k, k - 1], permutation=order
                    )
                layer = ConditionalSplineAutoregressive(
                    dim, net, count_bins=k, bound=BOUND, order="quadratic"
                )
            else:
                net = AutoRegressiveNN(dim, list(arch.hidden), [k, k, k - 1], permutation=order)
                layer = SplineAutoregressive(dim, net, count_bins=k, bound=BOUND, order="quadratic")
            layers.append(layer)
        self.layers = nn.ModuleList(layers)
        self.register_buffer("loc", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))

    def distribution(self, context: Tensor | None):
        import pyro.distributions as dist

        maps = [layer.condition(context) if self.context_dim else layer for layer in self.layers]
        base = dist.Normal(self.loc, self.scale).to_event(1)
        # TransformedDistribution applies its transforms base -> data: the inverses, reversed.
        return dist.TransformedDistribution(base, [t.inv for t in reversed(maps)])

    def log_prob(self, x: Tensor, context: Tensor | None) -> Tensor:
        return self.distribution(context).log_prob(x)


def build_pyro(dim: int, context_dim: int, arch: Architecture) -> Model:
    flow = _PyroNSF(dim, context_dim, arch)
    return Model(flow, flow.log_prob)


BUILDERS: dict[str, tuple[str, Callable[[int, int, Architecture], Model]]] = {
    "pyroflows": ("pyroflows", build_pyroflows),
    "zuko": ("zuko", build_zuko),
    "pyro": ("pyro", build_pyro),
    "pyroflows-fit": ("pyroflows", build_pyroflows),
    "pyroflows-random-init": ("pyroflows", build_pyroflows_random_init),
    "pyroflows-small-init": ("pyroflows", build_pyroflows_small_init),
    "pyroflows-lu": ("pyroflows", build_pyroflows_lu),
    "pyroflows-min-derivative": ("pyroflows", build_pyroflows_min_derivative),
    "pyroflows-bound8": ("pyroflows", build_pyroflows_bound),
    "pyroflows-raw-unbounded": ("pyroflows", build_pyroflows_raw_bound),
}


def available(library: str) -> tuple[bool, str]:
    """Whether ``library``'s package imports (anchors are optional)."""
    module = BUILDERS[library][0]
    try:
        __import__(module)
    except Exception as error:  # ImportError, or a broken install
        return False, f"{module} not importable ({type(error).__name__}: {error})"
    return True, ""


# ----------------------------------------------------------------------- the loop


@dataclass
class CellResult:
    log_likelihood: float
    val_log_likelihood: float
    seconds: float
    steps: int
    skipped_steps: int = 0
    params: int = 0


@torch.no_grad()
def mean_log_prob(model: Model, x: Tensor, c: Tensor | None, chunk: int = 8192) -> float:
    model.module.eval()
    total = 0.0
    for start in range(0, len(x), chunk):
        cb = None if c is None else c[start : start + chunk]
        total += float(model.log_prob(x[start : start + chunk], cb).double().sum())
    model.module.train()
    return total / len(x)


def batches(n: int, batch_size: int, generator: torch.Generator):
    """Minibatch indices forever: reshuffled each epoch, the last short batch dropped."""
    if n < batch_size:
        batch_size = n
    while True:
        perm = torch.randperm(n, generator=generator)
        for start in range(0, n - batch_size + 1, batch_size):
            yield perm[start : start + batch_size]


def train_shared(
    model: Model,
    data: dict[str, Tensor | None],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    eval_every: int,
) -> tuple[float, float, int]:
    """The loop every library runs; returns (best val, test, skipped steps) in std. units."""
    params = [p for p in model.module.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s, steps) / steps))
    )
    x, c = data["x_train"], data["c_train"]
    order = batches(len(x), batch_size, torch.Generator().manual_seed(seed))
    best_val, best_state, skipped = -math.inf, copy.deepcopy(model.module.state_dict()), 0
    for step in range(steps):
        idx = next(order)
        loss = -model.log_prob(x[idx], None if c is None else c[idx]).mean()
        optimizer.zero_grad(set_to_none=True)
        if torch.isfinite(loss):
            loss.backward()
            norm = nn.utils.clip_grad_norm_(params, CLIP_GRAD_NORM)
            if torch.isfinite(norm):
                optimizer.step()
            else:
                skipped += 1
        else:
            skipped += 1
        schedule.step()
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            val = mean_log_prob(model, data["x_val"], data["c_val"])
            if math.isfinite(val) and val > best_val:
                best_val, best_state = val, copy.deepcopy(model.module.state_dict())
    model.module.load_state_dict(best_state)
    test = mean_log_prob(model, data["x_test"], data["c_test"])
    return best_val, test, skipped


def run_cell(
    task: str,
    library: str,
    split: Split,
    *,
    steps: int,
    lr: float,
    seed: int,
    evals: int,
) -> CellResult:
    """Fit ``library``'s flow to ``task`` with ``seed``; scores on the original scale."""
    arch = architecture_of(split)
    torch.manual_seed(seed)  # same initialisation stream for every library
    model = BUILDERS[library][1](split.dim, split.context_dim, arch)
    start = time.perf_counter()
    if library == "pyroflows-fit":
        val, test, skipped = _fit_with_pyroflows(model, split, steps, arch.batch_size, lr, seed)
    else:
        xs, cs = Standardizer(split.x_train), None
        data = {f"x_{k}": xs(getattr(split, f"x_{k}")).float() for k in ("train", "val", "test")}
        if split.c_train is not None:
            cs = Standardizer(split.c_train)
        data.update(
            {
                f"c_{k}": None if cs is None else cs(getattr(split, f"c_{k}")).float()
                for k in ("train", "val", "test")
            }
        )
        val, test, skipped = train_shared(
            model,
            data,
            steps=steps,
            batch_size=arch.batch_size,
            lr=lr,
            seed=seed,
            eval_every=max(1, steps // max(evals, 1)),
        )
        val, test = val + xs.log_det, test + xs.log_det
    return CellResult(
        test, val, time.perf_counter() - start, steps, skipped, params=model.num_params()
    )


def _fit_with_pyroflows(model: Model, split: Split, steps, batch_size, lr, seed):
    """``pyroflows.fit`` with the epochs that come closest to ``steps`` steps."""
    from pyroflows import fit

    per_epoch = math.ceil(len(split.x_train) / batch_size)
    epochs = max(1, int(round(steps / per_epoch)))
    history = fit(
        model.module,
        split.x_train.float(),
        context=None if split.c_train is None else split.c_train.float(),
        validation_data=split.x_val.float(),
        validation_context=None if split.c_val is None else split.c_val.float(),
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        clip_grad_norm=CLIP_GRAD_NORM,
        patience=None,
        seed=seed,
        progress=False,
    )
    c_test = None if split.c_test is None else split.c_test.float()
    test = mean_log_prob(model, split.x_test.float(), c_test)
    return -history.best_val_loss, test, len(history.rejected_steps)


# ----------------------------------------------------------------------- reporting


@dataclass
class Results:
    tasks: list[str]
    libraries: list[str]
    cells: dict[tuple[str, str], list[CellResult]] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def score(self, task: str, library: str) -> str:
        runs = self.cells.get((task, library))
        if not runs:
            return "n/a"
        values = [r.log_likelihood for r in runs]
        mean = statistics.fmean(values)
        if len(values) == 1:
            return f"{mean:.3f}"
        return f"{mean:.3f} ± {statistics.stdev(values):.3f}"

    def best(self, task: str) -> str | None:
        means = {
            lib: statistics.fmean(r.log_likelihood for r in runs)
            for (t, lib), runs in self.cells.items()
            if t == task and runs and all(math.isfinite(r.log_likelihood) for r in runs)
        }
        return max(means, key=means.get) if means else None

    def markdown(self) -> str:
        head = "| task (D given C) | " + " | ".join(self.libraries) + " |"
        rule = "| --- |" + " --- |" * len(self.libraries)
        lines = [head, rule]
        for task in self.tasks:
            best = self.best(task)
            cells = []
            for lib in self.libraries:
                text = self.score(task, lib)
                cells.append(f"**{text}**" if lib == best else text)
            label = f"{task} ({self.labels[task]})" if task in self.labels else task
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def cost_markdown(self) -> str:
        head = "| task | " + " | ".join(f"{lib}: params, s" for lib in self.libraries) + " |"
        lines = [head, "| --- |" + " --- |" * len(self.libraries)]
        for task in self.tasks:
            cells = []
            for lib in self.libraries:
                runs = self.cells.get((task, lib))
                if not runs:
                    cells.append("n/a")
                    continue
                seconds = statistics.fmean(r.seconds for r in runs)
                cells.append(f"{runs[0].params:,}, {seconds:.0f}")
            lines.append(f"| {task} | " + " | ".join(cells) + " |")
        return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tasks",
        default=",".join(ALL_TASKS),
        help=f"comma-separated tasks (default all: {','.join(ALL_TASKS)})",
    )
    parser.add_argument(
        "--libraries",
        default=",".join(LIBRARIES),
        help="comma-separated libraries among "
        f"{','.join(LIBRARIES + EXTRA_LIBRARIES)} (default {','.join(LIBRARIES)})",
    )
    parser.add_argument("--steps", type=int, default=None, help="optimiser steps per cell")
    parser.add_argument("--seeds", type=int, default=1, help="training seeds per cell")
    parser.add_argument("--first-seed", type=int, default=0, help="seeds run from this one")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak Adam learning rate")
    parser.add_argument("--evals", type=int, default=10, help="validation checks per cell")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="path to galaxies.csv")
    parser.add_argument("--quick", action="store_true", help="tiny budgets (seconds per cell)")
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--quiet", action="store_true", help="print only the table")
    args = parser.parse_args(argv)
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    args.libraries = [lib.strip() for lib in args.libraries.split(",") if lib.strip()]
    for task in args.tasks:
        if task not in ALL_TASKS:
            parser.error(f"unknown task {task!r}; choose from {', '.join(ALL_TASKS)}")
    for lib in args.libraries:
        if lib not in BUILDERS:
            parser.error(f"unknown library {lib!r}; choose from {', '.join(BUILDERS)}")
    if args.steps is None:
        args.steps = 25 if args.quick else 3000
    if args.steps < 1 or args.seeds < 1:
        parser.error("--steps and --seeds must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the benchmark; return ``{"table": markdown, "results": {task: {library: ...}}}``.

    Each ``results[task][library]`` holds ``mean``, ``std`` (0 for one seed), ``values``,
    ``params`` and ``seconds``.
    """
    args = parse_args(argv)
    with torch_threads(args.threads):  # the caller's setting is restored after
        return _run(args)


def _run(args: argparse.Namespace) -> dict:
    say = (lambda *a, **k: None) if args.quiet else print
    results = Results(list(args.tasks), list(args.libraries))  # skipped ones show "n/a"
    usable = []
    for lib in args.libraries:
        ok, why = available(lib)
        if ok:
            usable.append(lib)
        else:
            results.notes.append(f"skipped {lib}: {why}")
            print(f"skipping {lib}: {why}", file=sys.stderr)
    splits = {}
    for task in args.tasks:
        splits[task] = make_split(task, args.quick, args.data)
    say(
        f"steps {args.steps} per cell, seeds {args.first_seed}.."
        f"{args.first_seed + args.seeds - 1}, lr {args.lr}, "
        f"threads {torch.get_num_threads()}, torch {torch.__version__}"
    )
    for task in args.tasks:
        split = splits[task]
        arch = architecture_of(split)
        label = f"D={split.dim}" + (f" given C={split.context_dim}" if split.context_dim else "")
        results.labels[task] = label
        say(
            f"\n== {task}: {label}, train/val/test {len(split.x_train)}/{len(split.x_val)}/"
            f"{len(split.x_test)}, {arch.layers} layers, hidden {list(arch.hidden)}, "
            f"{arch.bins} bins, batch {arch.batch_size}"
        )
        for lib in usable:
            runs = []
            for seed in range(args.first_seed, args.first_seed + args.seeds):
                cell = run_cell(
                    task, lib, split, steps=args.steps, lr=args.lr, seed=seed, evals=args.evals
                )
                runs.append(cell)
                skipped = cell.skipped_steps
                say(
                    f"  {lib:14s} seed {seed}: test {cell.log_likelihood:9.4f}  "
                    f"val {cell.val_log_likelihood:9.4f}  params {cell.params:,}  "
                    f"{cell.steps} steps in {cell.seconds:.1f} s"
                    + (f"  ({skipped} non-finite steps skipped)" if skipped else "")
                )
            results.cells[(task, lib)] = runs
    table = results.markdown()
    say("\nHeld-out mean log-likelihood (nats, original scale; higher is better):\n")
    print(table)
    say("\nParameters and wall time per cell (seconds, mean over seeds):\n")
    say(results.cost_markdown())
    for note in results.notes:
        say(note)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            "Held-out mean log-likelihood (nats, original scale; higher is better)\n\n"
            + table
            + "\n\nParameters and wall time per cell (seconds)\n\n"
            + results.cost_markdown()
            + "\n"
            + "".join(f"\n{note}" for note in results.notes)
        )
        say(f"wrote {args.out}")
    out: dict = {"table": table, "notes": results.notes, "results": {}}
    for (task, lib), runs in results.cells.items():
        values = [r.log_likelihood for r in runs]
        out["results"].setdefault(task, {})[lib] = {
            "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values,
            "params": runs[0].params,
            "seconds": statistics.fmean(r.seconds for r in runs),
            "steps": runs[0].steps,
        }
    return out


if __name__ == "__main__":
    main()
