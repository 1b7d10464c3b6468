"""Neural posterior estimation on the sbibm benchmark: pyroflows against sbi, by C2ST.

For each task and simulation budget, one amortised posterior ``q(theta | x)`` is trained per
method on the same simulations, then sampled for each of the task's reference observations
and compared with the reference posterior draws by C2ST (0.5: indistinguishable). The
published NPE results (Lueckmann et al. 2021) are printed beside them::

    pip install sbibm future          # pins sbi 0.21
    python benchmarks/sbibm.py --tasks two_moons,gaussian_linear --budgets 1000,10000
    python benchmarks/sbibm.py --quick  # CI: a built-in Gaussian task, no sbibm needed

Methods: ``pyroflows`` is `pyroflows.infer.fit_posterior` with its defaults (no per-task
settings); ``sbi`` is sbi's ``SNPE_C`` with the settings of sbibm's NPE runner (neural spline
flow, 50 hidden features, independent z-scoring, training batch of up to 10,000, 10 atoms,
early stopping), trained once and sampled for every observation (one round of NPE does not
use the observation, so this equals sbibm's per-observation runs). C2ST is sbibm's own
(``sbibm.metrics.c2st``, scikit-learn classifiers) when sbibm is installed, else
`pyroflows.workflow.c2st` (the same protocol in torch).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

# Run as a script, this file's folder comes first on the path and its name would hide the
# sbibm package: look for packages elsewhere.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

from pyroflows.infer import fit_posterior, simulate
from pyroflows.utils import torch_threads
from pyroflows.workflow import c2st as torch_c2st

#: Published NPE C2ST (mean, sd over ten observations) by task and budget: Lueckmann et al.
#: (2021), results file ``main_paper.csv`` (see ``../shared/data/sbibm/README.md``).
PUBLISHED_NPE = {
    ("bernoulli_glm_raw", 1000): (0.900, 0.030),
    ("bernoulli_glm_raw", 10000): (0.765, 0.038),
    ("bernoulli_glm_raw", 100000): (0.607, 0.029),
    ("gaussian_linear", 1000): (0.694, 0.044),
    ("gaussian_linear", 10000): (0.552, 0.032),
    ("gaussian_linear", 100000): (0.506, 0.004),
    ("gaussian_mixture", 1000): (0.731, 0.023),
    ("gaussian_mixture", 10000): (0.661, 0.029),
    ("gaussian_mixture", 100000): (0.555, 0.015),
    ("lotka_volterra", 1000): (0.999, 0.001),
    ("lotka_volterra", 10000): (0.997, 0.003),
    ("lotka_volterra", 100000): (0.981, 0.015),
    ("sir", 1000): (0.815, 0.118),
    ("sir", 10000): (0.680, 0.135),
    ("sir", 100000): (0.585, 0.059),
    ("slcp", 1000): (0.975, 0.013),
    ("slcp", 10000): (0.901, 0.047),
    ("slcp", 100000): (0.831, 0.052),
    ("two_moons", 1000): (0.725, 0.045),
    ("two_moons", 10000): (0.606, 0.039),
    ("two_moons", 100000): (0.542, 0.024),
}
TASKS = ("two_moons", "gaussian_linear", "slcp", "gaussian_mixture", "bernoulli_glm_raw")


@dataclass
class Task:
    """A prior, a simulator, observations and reference posterior draws."""

    name: str
    prior: torch.distributions.Distribution
    simulator: Callable[[Tensor], Tensor]
    observation: Callable[[int], Tensor]  # (1, C)
    reference: Callable[[int], Tensor]  # (S, D)


def sbibm_task(name: str) -> Task:
    """A task of the sbibm package."""
    import sbibm

    task = sbibm.get_task(name)
    return Task(
        name,
        task.get_prior_dist(),
        task.get_simulator(),
        lambda i: task.get_observation(num_observation=i),
        lambda i: task.get_reference_posterior_samples(num_observation=i),
    )


def builtin_gaussian(num_reference: int = 10_000) -> Task:
    """sbibm's ``gaussian_linear`` in closed form (2-D here, for CI): ``theta ~ N(0, 0.1 I)``,
    ``x ~ N(theta, 0.1 I)``, so the posterior is ``N(x / 2, 0.05 I)``."""
    import pyro.distributions as dist

    prior = dist.Normal(torch.zeros(2), 0.1**0.5).to_event(1)

    def simulator(theta: Tensor) -> Tensor:
        return theta + 0.1**0.5 * torch.randn_like(theta)

    def observation(i: int) -> Tensor:
        gen = torch.Generator().manual_seed(1000 + i)
        theta = 0.1**0.5 * torch.randn(1, 2, generator=gen)
        return theta + 0.1**0.5 * torch.randn(1, 2, generator=gen)

    def reference(i: int) -> Tensor:
        gen = torch.Generator().manual_seed(2000 + i)
        return observation(i) / 2 + 0.05**0.5 * torch.randn(num_reference, 2, generator=gen)

    return Task("gaussian_2d_builtin", prior, simulator, observation, reference)


def train_pyroflows(task: Task, theta: Tensor, x: Tensor, seed: int) -> Callable:
    """`fit_posterior` with its defaults; returns ``sample(x_o, n)``."""
    posterior, _ = fit_posterior(theta, x, prior=task.prior, progress=False, seed=seed)

    def sample(x_o: Tensor, n: int) -> Tensor:
        with torch.no_grad():
            return posterior.condition(x_o.reshape(-1)).sample((n,))

    return sample


def train_sbi(task: Task, theta: Tensor, x: Tensor, seed: int) -> Callable:
    """sbi's one-round NPE with the settings of sbibm's runner; returns ``sample(x_o, n)``."""
    from sbi import inference
    from sbi.utils import posterior_nn
    from torch.utils.tensorboard import SummaryWriter

    torch.manual_seed(seed)
    estimator = posterior_nn(
        model="nsf", hidden_features=50, z_score_x="independent", z_score_theta="independent"
    )
    with tempfile.TemporaryDirectory() as logs:  # sbi's default writes ./sbi-logs
        writer = SummaryWriter(log_dir=logs)
        method = inference.SNPE_C(
            task.prior,
            density_estimator=estimator,
            show_progress_bars=False,
            summary_writer=writer,
        )
        density = method.append_simulations(theta, x).train(
            num_atoms=10,
            training_batch_size=min(10_000, len(theta)),
            show_train_summary=False,
        )
        writer.close()
    posterior = method.build_posterior(density)

    def sample(x_o: Tensor, n: int) -> Tensor:
        return posterior.sample((n,), x=x_o, show_progress_bars=False).detach()

    return sample


METHODS = {"pyroflows": train_pyroflows, "sbi": train_sbi}


def c2st_score(samples: Tensor, reference: Tensor, quick: bool) -> float:
    """sbibm's C2ST when installed (the published metric), else the torch one."""
    if not quick:
        try:
            from sbibm.metrics import c2st
        except ImportError:
            pass
        else:
            return float(c2st(reference, samples))
    return torch_c2st(samples, reference, max_epochs=30 if quick else 1000)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """The global torch generator seeded with ``seed`` inside, restored after."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def run_one(task: Task, method: str, budget: int, args: argparse.Namespace) -> dict:
    """Train ``method`` on ``budget`` simulations; C2ST on each observation; wall times."""
    theta, x = simulate(task.prior, task.simulator, budget, seed=args.seed)
    start = time.perf_counter()
    with seeded(args.seed):  # both libraries draw initial weights from the global generator
        sample = METHODS[method](task, theta.float(), x.float(), args.seed)
    fit_seconds = time.perf_counter() - start
    scores = []
    for i in args.observations:
        reference = task.reference(i)[: args.num_samples].float()
        with seeded(args.seed + i):
            draws = sample(task.observation(i).float(), len(reference))
        scores.append(c2st_score(draws, reference, args.quick))
    return {
        "task": task.name,
        "method": method,
        "budget": budget,
        "c2st": scores,
        "mean": statistics.fmean(scores),
        "sd": statistics.stdev(scores) if len(scores) > 1 else math.nan,
        "fit_seconds": fit_seconds,
    }


def table(results: list[dict], methods: list[str]) -> str:
    """Markdown: one row per task and budget, C2ST mean +- sd per method and published NPE."""
    rows = {}
    for r in results:
        rows.setdefault((r["task"], r["budget"]), {})[r["method"]] = r
    head = "| task | simulations | " + " | ".join(f"{m} C2ST | {m} fit s" for m in methods)
    lines = [head + " | published NPE |", "|" + " --- |" * (3 + 2 * len(methods))]
    for (task, budget), by_method in rows.items():
        cells = []
        for m in methods:
            r = by_method.get(m)
            cells += (
                ["-", "-"]
                if r is None
                else [f"{r['mean']:.3f} ± {r['sd']:.3f}", f"{r['fit_seconds']:.0f}"]
            )
        published = PUBLISHED_NPE.get((task, budget))
        ref = "-" if published is None else f"{published[0]:.3f} ± {published[1]:.3f}"
        lines.append(f"| {task} | {budget:,} | " + " | ".join(cells) + f" | {ref} |")
    return "\n".join(lines)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--budgets", default="1000,10000,100000")
    parser.add_argument("--methods", default="pyroflows,sbi")
    parser.add_argument("--observations", default="1-10", help="e.g. 1-10 or 1,3")
    parser.add_argument("--num-samples", type=int, default=10_000, help="draws per C2ST")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="built-in task, seconds (CI)")
    parser.add_argument("--out", type=Path, help="write the Markdown table here")
    parser.add_argument("--json", type=Path, help="write every number here")
    args = parser.parse_args(argv)
    if args.quick:
        args.tasks, args.budgets, args.methods = "builtin", "2000", "pyroflows"
        args.observations, args.num_samples = "1,2", 500
    lo, _, hi = args.observations.partition("-")
    args.observations = list(range(int(lo), int(hi) + 1)) if hi else [int(i) for i in lo.split(",")]
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse(argv)
    methods = args.methods.split(",")
    results = []
    with torch_threads(args.threads):
        for name in args.tasks.split(","):
            task = builtin_gaussian() if name == "builtin" else sbibm_task(name)
            for budget in map(int, args.budgets.split(",")):
                for method in methods:
                    result = run_one(task, method, budget, args)
                    print(
                        f"{task.name} {budget} {method}: C2ST {result['mean']:.3f} ± "
                        f"{result['sd']:.3f}, fit {result['fit_seconds']:.0f} s",
                        flush=True,
                    )
                    results.append(result)
                    save(results, methods, args)  # after every cell: a stopped run keeps its rows
    print(table(results, methods))
    return results


def save(results: list[dict], methods: list[str], args: argparse.Namespace) -> None:
    """Write the table and the numbers where asked, each file replaced atomically."""
    for path, text in (
        (args.out, table(results, methods) + "\n"),
        (args.json, json.dumps(results, indent=1)),
    ):
        if path is not None:
            partial = path.with_name(path.name + ".partial")
            partial.write_text(text)
            partial.replace(path)


if __name__ == "__main__":
    main()
