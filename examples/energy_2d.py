"""Flow guides on the 2-D energy functions U1-U4 of Rezende & Mohamed (2015).

Variational inference with an unnormalised target ``p(z) = exp(-U(z)) / Z``: each energy is
a Pyro model, fitted by SVI with `pyroflows.infer.AutoFlow` (default spline layers), Pyro's
``AutoIAFNormal`` and ``AutoMultivariateNormal``, each by `pyroflows.infer.train_guide`. The
fit is scored by ``KL(q || p) = log Z - ELBO``: ``log Z`` by quadrature on a fine grid, the
ELBO ``E_q[-U(z) - log q(z)]`` by Monte Carlo with many draws of the fitted guide (with its
standard error). KL is zero only for a perfect guide.

The energies (Table 1 of the paper), with ``w1(z) = sin(2 pi z1 / 4)``,
``w2(z) = 3 exp(-((z1 - 1) / 0.6)^2 / 2)`` and ``w3(z) = 3 sigmoid((z1 - 1) / 0.3)``::

    U1(z) = ((|z| - 2) / 0.4)^2 / 2
            - log(exp(-((z1 - 2) / 0.6)^2 / 2) + exp(-((z1 + 2) / 0.6)^2 / 2))
    U2(z) = ((z2 - w1) / 0.4)^2 / 2
    U3(z) = -log(exp(-((z2 - w1) / 0.35)^2 / 2) + exp(-((z2 - w1 + w2) / 0.35)^2 / 2))
    U4(z) = -log(exp(-((z2 - w1) / 0.4)^2 / 2) + exp(-((z2 - w1 + w3) / 0.35)^2 / 2))

As published, U2-U4 do not confine ``z1`` at all (``exp(-U)`` integrates to infinity; the
paper shows them on the square ``(-4, 4)^2``). Here they get a soft wall in ``z1``: zero
inside ``|z1| <= 4`` and ``((|z1| - 4) / 0.4)^2 / 2`` outside, so the target is the paper's
density on ``(-4, 4)^2`` with Gaussian shoulders of width 0.4 beyond. U1 is used as is.

Training: `pyroflows.infer.train_guide`'s recipe (Adam with gradient clipping, the learning
rate halved whenever a 100-step window of the ELBO shows no clear improvement, stopping once it
no longer improves at the smallest rate, or at ``--steps``), 16 vectorised ELBO particles per
step, and the target annealed over the first ``--anneal-steps`` steps (see `make_model`).
Each fit stops after about 2000-3000 steps; all twelve take about ten minutes on one CPU
thread. For a 2-D guide the gradient noise, not the step count, limits a reverse-KL fit:
``--particles 1024`` costs little more per step and fits the IAF guides several times closer.

Run it from the repository root::

    python examples/energy_2d.py --out figures

It prints a Markdown table of ``KL(q || p)`` in nats (± Monte Carlo standard error) and, with
``--out DIR``, writes ``DIR/energy_2d.png``: each target next to histograms of each guide's
draws. ``--steps 20 --energies U1`` gives a quick smoke test. AutoFlow's options can be
changed from the command line (``--num-layers``, ``--count-bins``, ``--bound``,
``--init-scale``, ``--hidden-dims``).
"""

from __future__ import annotations

import argparse
import inspect
import math
import os
import time
from collections.abc import Callable

import pyro
import pyro.distributions as dist
import torch
from pyro.infer.autoguide import AutoIAFNormal, AutoMultivariateNormal
from torch import Tensor

from pyroflows.infer import AutoFlow, GuideTraining, train_guide
from pyroflows.utils import torch_threads

Energy = Callable[[Tensor], Tensor]

WALL = 4.0  # |z1| beyond which U2-U4 get a confining wall
WALL_WIDTH = 0.4


def _w1(z1: Tensor) -> Tensor:
    return torch.sin(2 * math.pi * z1 / 4)


def _w2(z1: Tensor) -> Tensor:
    return 3 * torch.exp(-0.5 * ((z1 - 1) / 0.6) ** 2)


def _w3(z1: Tensor) -> Tensor:
    return 3 * torch.sigmoid((z1 - 1) / 0.3)


def _wall(z1: Tensor) -> Tensor:
    return 0.5 * ((z1.abs() - WALL).clamp(min=0) / WALL_WIDTH) ** 2


def u1(z: Tensor) -> Tensor:
    """Ring of radius 2 with two bumps at ``z1 = +-2``. ``z`` has shape ``(..., 2)``."""
    z1 = z[..., 0]
    ring = 0.5 * ((torch.linalg.vector_norm(z, dim=-1) - 2) / 0.4) ** 2
    bumps = torch.logaddexp(-0.5 * ((z1 - 2) / 0.6) ** 2, -0.5 * ((z1 + 2) / 0.6) ** 2)
    return ring - bumps


def u2(z: Tensor) -> Tensor:
    """A sine wave (plus the wall in ``z1``)."""
    z1, z2 = z.unbind(-1)
    return 0.5 * ((z2 - _w1(z1)) / 0.4) ** 2 + _wall(z1)


def u3(z: Tensor) -> Tensor:
    """A sine wave that splits into two branches around ``z1 = 1`` (plus the wall)."""
    z1, z2 = z.unbind(-1)
    a = -0.5 * ((z2 - _w1(z1)) / 0.35) ** 2
    b = -0.5 * ((z2 - _w1(z1) + _w2(z1)) / 0.35) ** 2
    return -torch.logaddexp(a, b) + _wall(z1)


def u4(z: Tensor) -> Tensor:
    """A sine wave that forks into two branches for ``z1 > 1`` (plus the wall)."""
    z1, z2 = z.unbind(-1)
    a = -0.5 * ((z2 - _w1(z1)) / 0.4) ** 2
    b = -0.5 * ((z2 - _w1(z1) + _w3(z1)) / 0.35) ** 2
    return -torch.logaddexp(a, b) + _wall(z1)


ENERGIES: dict[str, Energy] = {"U1": u1, "U2": u2, "U3": u3, "U4": u4}
GUIDES = ("AutoFlow", "AutoIAFNormal", "AutoMultivariateNormal")
TRAINER = inspect.signature(train_guide).parameters  # its defaults are the script's


def log_normaliser(
    energy: Energy, bound: float = 8.0, num: int = 1600, dtype: torch.dtype = torch.float64
) -> float:
    """``log Z = log of the integral of exp(-U)`` over the square ``[-bound, bound]^2``.

    Midpoint rule on a ``num x num`` grid, summed with ``logsumexp`` (no overflow). The
    energy must be negligible at the edges of the square; the error is then far below
    ``1e-6`` for the energies here at the default spacing of 0.01 (`main` checks it against a
    coarser grid).
    """
    step = 2 * bound / num
    axis = -bound + step * (torch.arange(num, dtype=dtype) + 0.5)
    rows = []
    for chunk in axis.split(200):  # keep memory small
        z = torch.stack(torch.meshgrid(chunk, axis, indexing="ij"), dim=-1)
        rows.append(torch.logsumexp(-energy(z).flatten(), dim=0))
    return float(torch.logsumexp(torch.stack(rows), dim=0) + 2 * math.log(step))


def make_model(energy: Energy, reference_scale: float = 2.0) -> Callable[[], None]:
    """A Pyro model whose (unnormalised) posterior over ``z`` is ``exp(-U(z))``.

    ``z`` is drawn from a reference ``N(0, reference_scale^2 I)`` whose log-density the factor
    takes back out, so the net target is exactly ``exp(-U)`` and every ``init_loc_fn`` still
    works (an ``ImproperUniform`` site would give the same target, but cannot be sampled, so
    ``init_to_median`` and ``AutoIAFNormal``'s ``init_to_feasible`` fail on it).

    The factor is an observed site, so `train_guide`'s annealing scales it by ``beta``: the
    tempered target ``exp(-beta U) reference^(1 - beta)`` is proper for every ``beta`` in
    ``[0, 1]`` and runs from the wide reference to the target. Rezende & Mohamed anneal in
    the same spirit: a wide ``q`` that follows the target as it sharpens keeps every mode it
    has covered, where a narrow one dropped on the final target settles on the nearest mode
    (reverse KL is mode-seeking).
    """

    def model() -> None:
        reference = dist.Normal(torch.zeros(2), reference_scale).to_event(1)
        z = pyro.sample("z", reference)
        pyro.factor("U", -energy(z) - reference.log_prob(z))

    return model


def make_guide(name: str, model: Callable, args: argparse.Namespace):
    if name == "AutoFlow":
        options = {
            "num_layers": args.num_layers,
            "count_bins": args.count_bins,
            "bound": args.bound,
            "init_scale": args.init_scale,
            "hidden_dims": args.hidden_dims,
            "precondition": args.precondition,
        }
        # Only options given on the command line: otherwise AutoFlow's own defaults.
        return AutoFlow(model, model_args=(), **{k: v for k, v in options.items() if v is not None})
    if name == "AutoIAFNormal":
        # Same depth and width as AutoFlow's default (Pyro's own default is one layer of 7).
        return AutoIAFNormal(model, hidden_dim=[32, 32], num_transforms=3)
    if name == "AutoMultivariateNormal":
        return AutoMultivariateNormal(model)
    raise ValueError(f"unknown guide {name!r}; choose from {GUIDES}")


def anneal_steps(args: argparse.Namespace) -> int:
    """``--anneal-steps``, or ``--anneal`` (a fraction of ``--steps``) when given."""
    return args.anneal_steps if args.anneal is None else round(args.anneal * args.steps)


def fit(model: Callable, guide, args: argparse.Namespace) -> GuideTraining:
    """`train_guide` with the command line's options."""
    min_lr = args.min_lr if args.lr_final is None else args.lr * args.lr_final
    return train_guide(
        model,
        guide,
        num_particles=args.particles,
        lr=args.lr,
        min_lr=min(min_lr, args.lr),
        max_steps=args.steps,
        anneal_steps=anneal_steps(args),
        progress=args.progress,
    )


@torch.no_grad()
def elbo_draws(guide, energy: Energy, num_samples: int, chunk: int = 25_000):
    """Draws ``z ~ q`` and the terms ``-U(z) - log q(z)`` whose mean is the ELBO.

    A flow guide scores its own fresh draws from the forward pass
    (``rsample_and_log_prob``); for the others ``log_prob`` of a fresh draw hits the
    transform's cache or is a closed form.
    """
    posterior = guide.get_posterior()
    draws, terms = [], []
    for n in [chunk] * (num_samples // chunk) + [num_samples % chunk]:
        if n == 0:
            continue
        if hasattr(posterior, "rsample_and_log_prob"):
            z, log_q = posterior.rsample_and_log_prob((n,))
        else:
            z = posterior.sample((n,))
            log_q = posterior.log_prob(z)
        # One real site of shape (2,): the packed unconstrained latent is z itself.
        draws.append(z)
        terms.append(-energy(z) - log_q)
    return torch.cat(draws), torch.cat(terms).double()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--steps",
        type=int,
        default=TRAINER["max_steps"].default,
        help="most SVI steps per fit (train_guide's max_steps; it stops earlier once converged)",
    )
    parser.add_argument("--lr", type=float, default=TRAINER["lr"].default, help="initial lr")
    parser.add_argument(
        "--min-lr", type=float, default=TRAINER["min_lr"].default, help="smallest lr"
    )
    parser.add_argument(
        "--lr-final",
        type=float,
        default=None,
        help="smallest lr as a fraction of --lr (sets --min-lr)",
    )
    parser.add_argument("--particles", type=int, default=16, help="ELBO particles per step")
    parser.add_argument(
        "--anneal-steps", type=int, default=1000, help="steps spent annealing the target (0: none)"
    )
    parser.add_argument(
        "--anneal",
        type=float,
        default=None,
        help="annealing as a fraction of --steps (sets --anneal-steps)",
    )
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bars (default: only on a terminal)",
    )
    parser.add_argument("--guides", nargs="+", default=list(GUIDES), choices=GUIDES)
    parser.add_argument("--energies", nargs="+", default=list(ENERGIES), choices=list(ENERGIES))
    parser.add_argument(
        "--eval-samples", type=int, default=100_000, help="draws for the ELBO estimate"
    )
    parser.add_argument("--grid", type=int, default=1600, help="grid points per axis for log Z")
    parser.add_argument("--out", default=None, help="folder for energy_2d.png (none: no plot)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every fit")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads")
    flow = parser.add_argument_group("AutoFlow options (default: AutoFlow's own defaults)")
    flow.add_argument("--num-layers", type=int, default=None)
    flow.add_argument("--count-bins", type=int, default=None)
    flow.add_argument("--bound", type=float, default=None)
    flow.add_argument("--init-scale", type=float, default=None)
    flow.add_argument("--hidden-dims", type=int, nargs="+", default=None)
    flow.add_argument("--precondition", choices=("auto", "full", "diagonal", "off"), default=None)
    return parser.parse_args(argv)


def markdown_table(results: dict[str, dict[str, dict[str, float]]], guides: list[str]) -> str:
    lines = [
        "| energy | log Z | " + " | ".join(guides) + " |",
        "| --- | --- | " + " | ".join("---" for _ in guides) + " |",
    ]
    for name, row in results.items():
        log_z = next(iter(row.values()))["log_z"]
        cells = [f"{row[g]['kl']:.4f} ± {row[g]['kl_se']:.4f}" for g in guides]
        lines.append(f"| {name} | {log_z:.4f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(samples: dict, results: dict, guides: list[str], path: str, extent: float = 5.0):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(samples)
    fig, axes = plt.subplots(
        len(names), 1 + len(guides), figsize=(2.6 * (1 + len(guides)), 2.6 * len(names))
    )
    axes = [axes] if len(names) == 1 else axes
    axis = torch.linspace(-extent, extent, 300)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="xy"), dim=-1)
    edges = torch.linspace(-extent, extent, 121).numpy()
    for row, name in zip(axes, names, strict=True):
        row[0].imshow(
            torch.exp(-ENERGIES[name](grid)).numpy(),
            origin="lower",
            extent=(-extent, extent, -extent, extent),
        )
        row[0].set_title(f"{name}: exp(-U)", fontsize=9)
        for ax, guide in zip(row[1:], guides, strict=True):
            z = samples[name][guide].numpy()
            ax.hist2d(z[:, 0], z[:, 1], bins=[edges, edges])
            ax.set_title(f"{guide}\nKL {results[name][guide]['kl']:.3f}", fontsize=9)
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_aspect("equal")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, dict[str, dict[str, float]]]:
    """Fit every guide to every energy; print and return ``{energy: {guide: {"kl", ...}}}``.

    Each entry has ``kl`` and ``kl_se`` (nats, Monte Carlo standard error), ``elbo``,
    ``log_z`` and ``seconds`` (training time).
    """
    args = parse_args(argv)
    with torch_threads(args.threads):  # the caller's setting is restored after
        return run(args)


def run(args: argparse.Namespace) -> dict[str, dict[str, dict[str, float]]]:
    results: dict[str, dict[str, dict[str, float]]] = {}
    samples: dict[str, dict[str, Tensor]] = {}
    start = time.perf_counter()
    for name in args.energies:
        energy = ENERGIES[name]
        log_z = log_normaliser(energy, num=args.grid)
        coarse = log_normaliser(energy, bound=10.0, num=args.grid // 2)
        check = f"a coarser grid on a wider square differs by {coarse - log_z:+.1e}"
        print(f"{name}: log Z = {log_z:.6f} ({check})")
        results[name], samples[name] = {}, {}
        for guide_name in args.guides:
            pyro.clear_param_store()
            pyro.set_rng_seed(args.seed)
            model = make_model(energy)
            guide = make_guide(guide_name, model, args)
            history = fit(model, guide, args)
            z, terms = elbo_draws(guide, energy, args.eval_samples)
            elbo = float(terms.mean())
            se = float(terms.std() / math.sqrt(len(terms)))
            results[name][guide_name] = {
                "kl": log_z - elbo,
                "kl_se": se,
                "elbo": elbo,
                "log_z": log_z,
                "seconds": history.seconds[-1],
                "steps": history.num_steps,
                "stopped": history.stopped,
            }
            samples[name][guide_name] = z[:20_000]
            print(f"  {guide_name:24s} KL = {log_z - elbo:.4f} ± {se:.4f}  ({history.summary()})")
    print(
        f"\nKL(q || p) in nats (± MC s.e., {args.eval_samples} draws); train_guide with at most "
        f"{args.steps} steps, {args.particles} particles, lr {args.lr:g}, annealing "
        f"{anneal_steps(args)} steps; {time.perf_counter() - start:.0f} s in all\n"
    )
    print(markdown_table(results, args.guides))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, "energy_2d.png")
        plot(samples, results, args.guides, path)
        print(f"\nwrote {path}")
    return results


if __name__ == "__main__":
    main()
