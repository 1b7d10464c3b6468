"""Speed benchmark: pyroflows against zuko and Pyro's own flows at matched architectures.

Every library builds the same flow (same layers, hidden widths, bins, context size, and a
parameter count within 5%, printed), and the libraries are timed **round by round**: each
round runs one training step, one ``log_prob`` and one ``sample`` of every library in turn
(the order rotates every round), so a burst of load on a shared machine hits all of them.
The table reports medians over the rounds and their ratios. Measured, for each flow:

* **train**: ``loss = -log_prob(x).mean()``, ``backward()``, one Adam step;
* **log_prob**: the log-density of the batch without gradients;
* **sample**: one draw per row (``sample((B,))``, or one per context row), without gradients;
* **memory**: the peak of the memory allocated during one training step, above what was
  allocated before it (CPU: from the profiler's allocation events; CUDA: the allocator's
  peak statistics);
* **floor**: the same bare conditioner networks (plain ``nn.Linear``/``ReLU`` stacks of the
  flow's shapes, no masks, no flow), trained on ``net(input).mean()``, evaluated once for
  ``log_prob`` and ``sample``: the cost no flow library can go below.

Flows (``L = 5`` layers; hidden widths ``[64, 64]`` for ``D <= 8`` and ``[256, 256]`` above;
``K = 8`` bins on ``[-5, 5]``; with and without an 8-dimensional context):

* ``nsf-coupling``: ``flows.nsf(coupling=True)``; zuko ``NICE`` with
  ``MonotonicRQSTransform``; Pyro ``SplineCoupling(order="quadratic", identity=True)`` and
  ``Permute`` (Pyro has no conditional spline coupling);
* ``nsf-ar``: ``flows.nsf()``; zuko ``NSF``; Pyro ``[Conditional]SplineAutoregressive``
  (quadratic);
* ``maf``: ``flows.maf()``; zuko ``MAF``; Pyro ``[Conditional]AffineAutoregressive``;
* ``realnvp``: ``flows.realnvp()``; zuko ``NICE`` (affine); Pyro
  ``[Conditional]AffineCoupling`` and ``Permute``;
* ``iaf-svi``: ``infer.AutoFlow(layers="affine")``; Pyro ``AutoIAFNormal``; zuko has none.

Every library scores data in its cheap direction (one network pass per layer); for the
autoregressive flows sampling then takes ``D`` passes per layer in all three libraries. Pyro's
layers are cheap in their forward direction, so they are used as data-to-noise maps wrapped
in ``.inv`` (as in ``benchmarks/density.py``). ``iaf-svi`` times one SVI step
(``Trace_ELBO`` with ``B`` vectorised particles) of an IAF-direction autoguide on a model with
a ``D``-dimensional latent: the guide samples and scores its own samples.

Argument validation is switched off for every library (``pyro.enable_validation(False)`` and
``Distribution.set_default_validate_args(False)``; zuko switches it off at import anyway), so
all are timed without it. Optional libraries that cannot be imported are skipped. Run from the
repository root::

    python benchmarks/speed.py --out speed.md               # the full CPU run
    python benchmarks/speed.py --quick                      # seconds, for CI
    python benchmarks/speed.py --device cuda                # D = 32, B = 16384 and 65536
    python benchmarks/speed.py --flows nsf-ar --dims 8,32 --contexts 0 --compile
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.distributions import Distribution

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from pyroflows.utils import torch_threads  # noqa: E402 (after the path is set)

FLOWS = ("nsf-coupling", "nsf-ar", "maf", "realnvp", "iaf-svi")
LIBRARIES = ("pyroflows", "zuko", "pyro")
MEASURES = ("train", "log_prob", "sample", "memory")
LAYERS = 5
BINS = 8
BOUND = 5.0
CONTEXT = 8
LR = 1e-4


def hidden_for(dim: int) -> tuple[int, int]:
    """Hidden widths of every conditioner: ``[64, 64]`` up to ``D = 8``, ``[256, 256]`` above."""
    return (64, 64) if dim <= 8 else (256, 256)


def num_params_per_feature(flow: str) -> int:
    """Raw parameters per transformed feature: ``3K - 1`` for splines, 2 for affine maps."""
    return 3 * BINS - 1 if flow.startswith("nsf") else 2


# ---------------------------------------------------------------------------- models


@dataclass
class Model:
    """One library's flow as the timing loop sees it."""

    module: nn.Module
    log_prob: Callable[[Tensor, Tensor | None], Tensor]
    sample: Callable[[int, Tensor | None], Tensor]
    train_step: Callable[[Tensor, Tensor | None], None] | None = None

    def num_params(self) -> int:
        return sum(p.numel() for p in self.module.parameters() if p.requires_grad)


class Unavailable(Exception):
    """A library has no equivalent of the requested flow (shown as n/a)."""


def build_pyroflows(flow: str, dim: int, context: int, hidden: Sequence[int]) -> Model:
    from pyroflows import flows

    common = {"num_layers": LAYERS, "hidden_dims": tuple(hidden)}
    if flow == "nsf-coupling":
        f = flows.nsf(dim, context, coupling=True, count_bins=BINS, bound=BOUND, **common)
    elif flow == "nsf-ar":
        f = flows.nsf(dim, context, count_bins=BINS, bound=BOUND, **common)
    elif flow == "maf":
        f = flows.maf(dim, context, **common)
    elif flow == "realnvp":
        f = flows.realnvp(dim, context, **common)
    else:
        raise ValueError(flow)

    def sample(n: int, c: Tensor | None) -> Tensor:
        return f.condition(c).sample(() if c is not None else (n,))

    return Model(f, lambda x, c: f.condition(c).log_prob(x), sample)


def build_zuko(flow: str, dim: int, context: int, hidden: Sequence[int]) -> Model:
    import zuko
    from zuko.transforms import MonotonicRQSTransform

    common = {"transforms": LAYERS, "hidden_features": list(hidden)}
    if flow == "nsf-coupling":
        f = zuko.flows.NICE(
            dim,
            context,
            univariate=partial(MonotonicRQSTransform, bound=BOUND),
            shapes=[(BINS,), (BINS,), (BINS - 1,)],
            **common,
        )
    elif flow == "nsf-ar":
        f = zuko.flows.NSF(dim, context, bins=BINS, **common)
    elif flow == "maf":
        f = zuko.flows.MAF(dim, context, **common)
    elif flow == "realnvp":
        f = zuko.flows.NICE(dim, context, **common)
    else:
        raise Unavailable(f"zuko has no {flow}")

    def sample(n: int, c: Tensor | None) -> Tensor:
        return f(c).sample(() if c is not None else (n,))

    return Model(f, lambda x, c: f(c).log_prob(x), sample)


class _PyroFlow(nn.Module):
    """Pyro layers used as data-to-noise maps (their cheap direction), wrapped in ``.inv``."""

    def __init__(self, layers: Sequence[nn.Module | object], dim: int):
        super().__init__()
        self.layers = nn.ModuleList([m for m in layers if isinstance(m, nn.Module)])
        self.maps = list(layers)
        self.register_buffer("loc", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))

    def distribution(self, context: Tensor | None):
        import pyro.distributions as dist
        from pyro.distributions.conditional import ConditionalTransform

        maps = [
            m.condition(context) if isinstance(m, ConditionalTransform) else m for m in self.maps
        ]
        base = dist.Normal(self.loc, self.scale).to_event(1)
        if context is not None:
            base = base.expand(context.shape[:-1])
        # TransformedDistribution applies its transforms base -> data: the inverses, reversed.
        return dist.TransformedDistribution(base, [t.inv for t in reversed(maps)])


def build_pyro(
    flow: str, dim: int, context: int, hidden: Sequence[int], device: torch.device | None = None
) -> Model:
    """Pyro's layers; built under ``torch.device(device)``, since ``Permute`` keeps its index
    tensor outside any module (``.to`` would not move it)."""
    with torch.device(device or "cpu"):
        return _build_pyro(flow, dim, context, hidden)


def _build_pyro(flow: str, dim: int, context: int, hidden: Sequence[int]) -> Model:
    from pyro.distributions import transforms as T
    from pyro.nn import (
        AutoRegressiveNN,
        ConditionalAutoRegressiveNN,
        ConditionalDenseNN,
        DenseNN,
    )

    hidden = list(hidden)
    split = dim // 2
    rest = dim - split
    reverse = torch.arange(dim).flip(0)
    maps: list = []
    for i in range(LAYERS):
        order = torch.arange(dim) if i % 2 == 0 else reverse
        with warnings.catch_warnings():  # Pyro warns about D == 1 networks; intended here
            warnings.simplefilter("ignore", UserWarning)
            if flow == "nsf-ar":
                groups = [BINS, BINS, BINS - 1]
                if context:
                    net = ConditionalAutoRegressiveNN(
                        dim, context, hidden, groups, permutation=order
                    )
                    layer = T.ConditionalSplineAutoregressive(
                        dim, net, count_bins=BINS, bound=BOUND, order="quadratic"
                    )
                else:
                    net = AutoRegressiveNN(dim, hidden, groups, permutation=order)
                    layer = T.SplineAutoregressive(
                        dim, net, count_bins=BINS, bound=BOUND, order="quadratic"
                    )
                maps.append(layer)
            elif flow == "maf":
                if context:
                    net = ConditionalAutoRegressiveNN(dim, context, hidden, permutation=order)
                    maps.append(T.ConditionalAffineAutoregressive(net))
                else:
                    maps.append(
                        T.AffineAutoregressive(AutoRegressiveNN(dim, hidden, permutation=order))
                    )
            elif flow == "nsf-coupling":
                if context:
                    raise Unavailable("Pyro 1.9 has no conditional spline coupling layer")
                groups = [rest * BINS, rest * BINS, rest * (BINS - 1)]
                maps.append(
                    T.SplineCoupling(
                        dim,
                        split,
                        DenseNN(split, hidden, groups),
                        count_bins=BINS,
                        bound=BOUND,
                        order="quadratic",
                        identity=True,
                    )
                )
                maps.append(T.Permute(reverse))
            elif flow == "realnvp":
                if context:
                    net = ConditionalDenseNN(split, context, hidden, [rest, rest])
                    maps.append(T.ConditionalAffineCoupling(split, net))
                else:
                    maps.append(T.AffineCoupling(split, DenseNN(split, hidden, [rest, rest])))
                maps.append(T.Permute(reverse))
            else:
                raise ValueError(flow)
    if flow in ("nsf-coupling", "realnvp"):
        maps.pop()  # no permutation after the last layer
    f = _PyroFlow(maps, dim)

    def sample(n: int, c: Tensor | None) -> Tensor:
        return f.distribution(c).sample(() if c is not None else (n,))

    # Pyro's transforms cache their last (input, output) pair and return it when called on the
    # same tensor object again; scoring a fresh view of the data keeps every call honest.
    return Model(f, lambda x, c: f.distribution(c).log_prob(x.view_as(x)), sample)


def _svi_model(dim: int):
    import pyro
    import pyro.distributions as dist

    def model(data: Tensor) -> None:
        z = pyro.sample("z", dist.Normal(torch.zeros_like(data), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=data)

    return model


def build_svi(library: str, dim: int, hidden: Sequence[int], batch: int, device) -> Model:
    """An SVI step of an IAF-direction autoguide: ``Trace_ELBO`` with ``batch`` particles."""
    import pyro
    from pyro.infer import SVI, Trace_ELBO

    pyro.clear_param_store()  # guides of different sizes share parameter names
    model = _svi_model(dim)
    data = torch.randn(dim, device=device)
    if library == "pyroflows":
        from pyroflows.infer import AutoFlow

        guide = AutoFlow(
            model,
            layers="affine",
            num_layers=LAYERS,
            hidden_dims=tuple(hidden),
            model_args=(data.cpu(),),  # built on the CPU, then moved
        )
        guide.to(device)
    elif library == "pyro":
        from pyro.infer.autoguide import AutoIAFNormal

        guide = AutoIAFNormal(model, hidden_dim=list(hidden), num_transforms=LAYERS)
        with torch.device(device):  # its networks are created lazily, on the first call
            guide(data)
    else:
        raise Unavailable(f"{library} has no autoguide")
    elbo = Trace_ELBO(num_particles=batch, vectorize_particles=True, max_plate_nesting=0)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": LR}), elbo)

    def step(x: Tensor, c: Tensor | None) -> None:
        svi.step(data)

    def sample(n: int, c: Tensor | None) -> Tensor:
        with pyro.plate("particles", n, dim=-1):
            return guide(data)["z"]

    def log_prob(x: Tensor, c: Tensor | None) -> Tensor:
        raise Unavailable("SVI guides are timed on the SVI step and on sampling only")

    return Model(guide, log_prob, sample, train_step=step)


BUILDERS = {"pyroflows": build_pyroflows, "zuko": build_zuko, "pyro": build_pyro}
MODULES = {"pyroflows": "pyroflows", "zuko": "zuko", "pyro": "pyro"}


def available(library: str) -> tuple[bool, str]:
    """Whether an (optional) library imports."""
    try:
        __import__(MODULES[library.split("+")[0]])
    except Exception as error:  # ImportError or a broken install
        return False, f"{library}: not importable ({type(error).__name__}: {error})"
    return True, ""


# ---------------------------------------------------------------------------- floor


class Floor(nn.Module):
    """The flow's conditioner networks alone: ``L`` plain MLPs of the same shapes."""

    def __init__(self, n_in: int, n_out: int, hidden: Sequence[int]):
        super().__init__()
        nets = []
        for _ in range(LAYERS):
            sizes = (n_in, *hidden, n_out)
            layers: list[nn.Module] = []
            for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
                if i:
                    layers.append(nn.ReLU())
                layers.append(nn.Linear(a, b))
            nets.append(nn.Sequential(*layers))
        self.nets = nn.ModuleList(nets)

    def forward(self, inputs: Tensor) -> Tensor:
        return sum(net(inputs).mean() for net in self.nets)


def build_floor(flow: str, dim: int, context: int, hidden: Sequence[int], x: Tensor, c):
    """The floor model and its fixed input (``input ⊕ context``, concatenated once)."""
    p = num_params_per_feature(flow)
    if flow in ("nsf-coupling", "realnvp"):
        n_in, n_out = dim // 2, (dim - dim // 2) * p
        inputs = x[:, : dim // 2]
    else:  # autoregressive (MADE shapes) and the IAF guide
        n_in, n_out, inputs = dim, dim * p, x
    if c is not None:
        n_in += context
        inputs = torch.cat([inputs, c], dim=-1)
    floor = Floor(n_in, n_out, hidden).to(x.device)

    def log_prob(xx: Tensor, cc: Tensor | None) -> Tensor:
        return floor(inputs)

    def sample(n: int, cc: Tensor | None) -> Tensor:
        return floor(inputs)

    def step(xx: Tensor, cc: Tensor | None) -> None:
        loss = floor(inputs)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    opt = torch.optim.Adam(floor.parameters(), lr=LR)
    return Model(floor, log_prob, sample, train_step=step)


# ---------------------------------------------------------------------------- timing


def make_train_step(model: Model) -> Callable[[Tensor, Tensor | None], None]:
    if model.train_step is not None:
        return model.train_step
    opt = torch.optim.Adam(model.module.parameters(), lr=LR)

    def step(x: Tensor, c: Tensor | None) -> None:
        loss = -model.log_prob(x, c).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def compiled(model: Model, flow: str) -> Model:
    """The same model with ``torch.compile``d log-density (training and scoring) and, for the
    coupling flows, sampling.

    The training step compiles the log-density (forward and backward graphs); the optimiser
    step stays eager, as in most training loops. Autoregressive sampling (``D`` passes per
    layer, unrolled into one graph) takes minutes to compile at ``D = 32`` and stays eager.
    """
    sample = torch.compile(model.sample) if flow in ("nsf-coupling", "realnvp") else model.sample
    return Model(model.module, torch.compile(model.log_prob), sample)


class Timer:
    """Wall-clock (``perf_counter``, with CUDA synchronisation) or this thread's CPU time."""

    def __init__(self, device: torch.device, kind: str):
        self.device = device
        self.cuda = device.type == "cuda"
        self.clock = time.thread_time if kind == "cpu" else time.perf_counter

    def __call__(self, fn: Callable[[], object]) -> float:
        if self.cuda:
            torch.cuda.synchronize(self.device)
        start = self.clock()
        fn()
        if self.cuda:
            torch.cuda.synchronize(self.device)
        return self.clock() - start


def peak_memory(fn: Callable[[], object], device: torch.device) -> float:
    """Peak bytes allocated while ``fn`` runs, above what was allocated before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return float(torch.cuda.max_memory_allocated(device) - before)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return float(peak)


@dataclass
class Cell:
    """Medians (seconds) and memory (bytes) of one library on one configuration."""

    params: int = 0
    times: dict[str, list[float]] = field(default_factory=dict)
    memory: float = math.nan
    note: str = ""

    def median(self, measure: str) -> float:
        values = self.times.get(measure, [])
        return statistics.median(values) if values else math.nan


@dataclass
class Config:
    flow: str
    dim: int
    context: int
    batch: int

    @property
    def label(self) -> str:
        ctx = f" C={self.context}" if self.context else ""
        return f"{self.flow} D={self.dim}{ctx} B={self.batch}"


def run_config(
    config: Config,
    libraries: Sequence[str],
    *,
    device: torch.device,
    rounds: int,
    warmup: int,
    timer: Timer,
    slow_round: float,
    min_rounds: int,
    compile_libraries: Sequence[str],
    seed: int,
    log: Callable[[str], None],
) -> dict[str, Cell]:
    """Build every library's flow for ``config`` and time them round by round."""
    flow, dim, ctx, batch = config.flow, config.dim, config.context, config.batch
    hidden = hidden_for(dim)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, dim, generator=gen).to(device)
    c = torch.randn(batch, ctx, generator=gen).to(device) if ctx else None

    cells: dict[str, Cell] = {}
    steps: dict[str, dict[str, Callable[[], object]]] = {}
    if compile_libraries:
        # Every configuration compiles the same lambdas again: without a reset, dynamo's
        # per-code recompile limit would quietly leave later configurations uncompiled.
        torch._dynamo.reset()
    for library in [*libraries, *(f"{lib}+compile" for lib in compile_libraries), "floor"]:
        base = library.split("+")[0]
        cell = cells[library] = Cell()
        torch.manual_seed(seed)
        try:
            if library == "floor":
                model = build_floor(flow, dim, ctx, hidden, x, c)
            elif flow == "iaf-svi":
                if library.endswith("+compile"):
                    raise Unavailable("not compiled")
                model = build_svi(base, dim, hidden, batch, device)
            else:
                if base == "pyro":
                    model = build_pyro(flow, dim, ctx, hidden, device)
                else:
                    model = BUILDERS[base](flow, dim, ctx, hidden)
                model.module.to(device)
                if library.endswith("+compile"):
                    model = compiled(model, flow)
        except Unavailable as reason:
            cell.note = str(reason)
            continue
        cell.params = model.num_params()
        train = make_train_step(model)

        def log_prob(model=model) -> None:
            with torch.no_grad():
                model.log_prob(x, c)

        def sample(model=model) -> None:
            with torch.no_grad():
                model.sample(batch, c)

        actions = {"train": partial(train, x, c), "sample": sample}
        if flow != "iaf-svi" or library == "floor":
            actions["log_prob"] = log_prob
        steps[library] = actions

    # Warm-up rounds (compilation, allocator, caches), then one measured memory step each.
    order = list(steps)
    for name in order:
        try:
            start = time.perf_counter()
            for _ in range(warmup):
                for action in steps[name].values():
                    action()
            cells[name].times["_warmup"] = [time.perf_counter() - start]
        except Exception as error:  # a library that fails here is reported, not fatal
            cells[name].note = f"failed: {type(error).__name__}: {str(error)[:120]}"
            del steps[name]
    for name, actions in steps.items():
        cells[name].memory = peak_memory(actions["train"], device)

    # Timed rounds, interleaved; a library whose round is slow stops after min_rounds.
    active = list(steps)
    for r in range(rounds):
        if not active:
            break
        shift = r % len(active)
        for name in active[shift:] + active[:shift]:
            round_time = 0.0
            for measure, action in steps[name].items():
                elapsed = timer(action)
                cells[name].times.setdefault(measure, []).append(elapsed)
                round_time += elapsed
            cells[name].times.setdefault("_round", []).append(round_time)
        active = [
            n
            for n in active
            if not (
                r + 1 >= min_rounds and statistics.median(cells[n].times["_round"]) > slow_round
            )
        ]
    for name, cell in cells.items():
        if cell.note:
            log(f"  {name:18s} n/a ({cell.note})")
            continue
        parts = [f"{m} {cell.median(m) * 1e3:9.2f} ms" for m in ("train", "log_prob", "sample")]
        log(
            f"  {name:18s} params {cell.params:>9,d}  "
            + "  ".join(parts)
            + f"  memory {cell.memory / 2**20:8.1f} MiB  rounds {len(cell.times.get('train', []))}"
        )
    return cells


# ---------------------------------------------------------------------------- tables


def _fmt_ms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "n/a"
    ms = seconds * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def _fmt_ratio(a: float, b: float) -> str:
    if not (math.isfinite(a) and math.isfinite(b)) or b <= 0:
        return "n/a"
    return f"{a / b:.2f}"


def tables(
    results: dict[str, dict[str, Cell]],
    configs: dict[str, Config],
    libraries: Sequence[str],
) -> str:
    """Markdown tables: parameter counts, then one table per measure with ratios."""
    main = "pyroflows"
    lines = ["### Parameter counts", ""]
    cols = [*libraries, "floor"]
    lines.append("| flow | D | C | " + " | ".join(cols) + " | within 5% |")
    lines.append("| --- | --- | --- | " + " | ".join("---" for _ in cols) + " | --- |")
    for key, cells in results.items():
        cfg = configs[key]
        counts = [cells[lib].params if lib in cells and not cells[lib].note else 0 for lib in cols]
        flows_only = [n for lib, n in zip(cols, counts, strict=True) if n and lib != "floor"]
        matched = "yes" if flows_only and max(flows_only) <= 1.05 * min(flows_only) else "no"
        shown = [f"{n:,d}" if n else "n/a" for n in counts]
        lines.append(
            f"| {cfg.flow} | {cfg.dim} | {cfg.context} | " + " | ".join(shown) + f" | {matched} |"
        )
    # (numerator, denominator) of every ratio column: eager pyroflows against each other eager
    # library and the floor; compiled pyroflows against the other compiled libraries and the
    # floor, when they were timed.
    eager = [lib for lib in libraries if not lib.endswith("+compile")]
    pairs = [(main, lib) for lib in [*eager, "floor"] if lib != main]
    if f"{main}+compile" in libraries:
        rivals = [lib for lib in libraries if lib.endswith("+compile") and lib != f"{main}+compile"]
        pairs += [(f"{main}+compile", lib) for lib in [*rivals, "floor"]]
    for measure, title, unit in (
        ("train", "Training step", "ms"),
        ("log_prob", "log_prob (no gradients)", "ms"),
        ("sample", "Sampling (no gradients)", "ms"),
        ("memory", "Peak memory of a training step", "MiB"),
    ):
        lines += ["", f"### {title} ({unit}, median over rounds)", ""]
        ratio_cols = [f"{a}/{b}".replace("pyroflows", "pf") for a, b in pairs]
        lines.append("| flow | D | C | B | " + " | ".join([*cols, *ratio_cols]) + " |")
        lines.append(
            "| " + " | ".join("---" for _ in range(4 + len(cols) + len(ratio_cols))) + " |"
        )
        for key, cells in results.items():
            cfg = configs[key]

            def value(lib: str, cells=cells, measure=measure) -> float:
                cell = cells.get(lib)
                if cell is None or cell.note:
                    return math.nan
                return cell.memory if measure == "memory" else cell.median(measure)

            vals = [value(lib) for lib in cols]
            shown = [
                (f"{v / 2**20:.1f}" if math.isfinite(v) else "n/a")
                if measure == "memory"
                else _fmt_ms(v)
                for v in vals
            ]
            ratios = [_fmt_ratio(value(a), value(b)) for a, b in pairs]
            if not any(math.isfinite(v) for v in vals):
                continue
            lines.append(
                f"| {cfg.flow} | {cfg.dim} | {cfg.context} | {cfg.batch} | "
                + " | ".join(shown + ratios)
                + " |"
            )
    return "\n".join(lines) + "\n"


def machine_description(device: torch.device, threads: int) -> str:
    """One paragraph on the machine and the versions measured."""
    import pyro

    parts = [f"Python {platform.python_version()}", f"torch {torch.__version__}"]
    parts.append(f"pyro-ppl {pyro.__version__}")
    try:
        import zuko

        parts.append(f"zuko {zuko.__version__}")
    except Exception:
        parts.append("zuko not installed")
    import os

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    where = f"{os.cpu_count()} CPUs ({cpu}), {threads} torch thread(s)"
    if device.type == "cuda":
        where = f"{torch.cuda.get_device_name(device)}; host {where}"
    return f"{where}; " + ", ".join(parts) + "."


# ---------------------------------------------------------------------------- main


def parse_list(text: str, cast=str) -> list:
    return [cast(t) for t in text.split(",") if t.strip()]


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--flows", default=",".join(FLOWS), help="comma-separated flows")
    parser.add_argument(
        "--libraries", default=",".join(LIBRARIES), help="among pyroflows,zuko,pyro"
    )
    parser.add_argument("--dims", default=None, help="event sizes D (default 2,8,32,64; cuda 32)")
    parser.add_argument("--contexts", default=f"0,{CONTEXT}", help="context sizes (default 0,8)")
    parser.add_argument(
        "--batch", default=None, help="batch sizes B (default 1024; cuda 16384,65536)"
    )
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 15)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds (default 2)")
    parser.add_argument(
        "--slow-round",
        type=float,
        default=20.0,
        help="seconds: a library whose median round is slower stops after --min-rounds",
    )
    parser.add_argument("--min-rounds", type=int, default=3)
    parser.add_argument("--timer", choices=("wall", "cpu"), default="wall")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument(
        "--compile", action="store_true", help="also time torch.compile'd pyroflows and zuko"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write the Markdown tables here")
    parser.add_argument("--quick", action="store_true", help="tiny run in seconds (CI smoke test)")
    parser.add_argument("--quiet", action="store_true", help="print only the final tables")
    args = parser.parse_args(argv)
    import pyro
    import pyro.distributions

    validation = (pyro.distributions.is_validation_enabled(), Distribution._validate_args)
    try:
        with torch_threads(args.threads):
            return _run(args, parser)
    finally:  # leave the process as it was (the smoke test runs in-process)
        pyro.enable_validation(validation[0])
        Distribution.set_default_validate_args(validation[1])


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict:
    """The benchmark itself (`main` sets the threads and restores validation around it)."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda given but CUDA is not available")
    if device.type == "cuda" and args.timer == "cpu":
        parser.error("--timer cpu measures host time; on a GPU use the default wall clock")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # plain torch.cuda calls then mean this device
    import pyro

    # Validation off for every library (zuko switches torch's off at import anyway).
    pyro.enable_validation(False)
    Distribution.set_default_validate_args(False)

    if args.quick:
        dims = parse_list(args.dims or "2", int)
        batches = parse_list(args.batch or "64", int)
        rounds = args.rounds or 2
        warmup = args.warmup if args.warmup is not None else 1
    else:
        cuda = device.type == "cuda"
        dims = parse_list(args.dims or ("32" if cuda else "2,8,32,64"), int)
        batches = parse_list(args.batch or ("16384,65536" if cuda else "1024"), int)
        rounds = args.rounds or 15
        warmup = args.warmup if args.warmup is not None else 2
    flows = parse_list(args.flows)
    unknown = [f for f in flows if f not in FLOWS]
    if unknown:
        parser.error(f"unknown flows {unknown}; choose from {', '.join(FLOWS)}")
    contexts = parse_list(args.contexts, int)
    requested = parse_list(args.libraries)
    libraries, notes = [], []
    for lib in requested:
        if lib not in LIBRARIES:
            parser.error(f"unknown library {lib!r}; choose from {', '.join(LIBRARIES)}")
        ok, why = available(lib)
        (libraries.append(lib) if ok else notes.append(why))
    if "pyroflows" not in libraries:
        parser.error("pyroflows must be among the libraries")
    compile_libraries = [lib for lib in ("pyroflows", "zuko") if args.compile and lib in libraries]

    def log(message: str, always: bool = False) -> None:
        if always or not args.quiet:
            print(message, flush=True)

    for note in notes:
        log(f"skipped {note}")
    results: dict[str, dict[str, Cell]] = {}
    configs: dict[str, Config] = {}
    shown = [*libraries, *(f"{lib}+compile" for lib in compile_libraries)]
    header = (
        f"Machine: {machine_description(device, args.threads)} Timer: {args.timer}; "
        f"{rounds} rounds after {warmup} warm-up rounds, medians; validation off for all.\n"
    )
    for flow in flows:
        for dim in dims:
            for ctx in contexts if flow != "iaf-svi" else [0]:
                for batch in batches:
                    cfg = Config(flow, dim, ctx, batch)
                    log(cfg.label)
                    results[cfg.label] = run_config(
                        cfg,
                        libraries,
                        device=device,
                        rounds=rounds,
                        warmup=warmup,
                        timer=Timer(device, args.timer),
                        slow_round=args.slow_round,
                        min_rounds=min(args.min_rounds, rounds),
                        compile_libraries=compile_libraries if flow != "iaf-svi" else [],
                        seed=args.seed,
                        log=log,
                    )
                    configs[cfg.label] = cfg
                    if args.out is not None:  # keep what is done if a long run is cut short
                        args.out.write_text(header + "\n" + tables(results, configs, shown))
    table = tables(results, configs, shown)
    log("")
    log(header, always=True)
    log(table, always=True)
    if args.out is not None:
        args.out.write_text(header + "\n" + table)
    return {"results": results, "configs": configs, "table": table, "notes": notes}


if __name__ == "__main__":
    main()
