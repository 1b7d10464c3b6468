"""What a user gets from `fit` with its defaults, before and after the sizing rule.

Each cell fits a neural spline flow with `pyroflows.fit` on the tasks of
``benchmarks/density.py`` (same splits: the toy densities' 20,000 training rows, the galaxy
catalogue's 72,000) and scores the held-out test rows (mean log-likelihood, nats, original
scale; higher is better):

* ``old``: the defaults before `pyroflows.training.sizing`: ``flows.nsf(D, C)`` (5 layers,
  width 64, 8 bins), 100 epochs of 512 rows;
* ``new``: today's: the flow of `flow_size` for the rows, `fit` without ``epochs`` or
  ``batch_size``.

``--bounds`` instead compares, on photometric redshift, the redshift's declared lower bound
0 through the logarithm (the map before the fitted scale), through today's fitted scale,
and no bound, each with the photo-z example's flow (3 layers, width 128, 16 bins), 30 epochs.

    python benchmarks/defaults.py --tasks two_moons,rings --seeds 0,1,2
    python benchmarks/defaults.py --bounds --seeds 0,1,2
    python benchmarks/defaults.py --quick            # seconds (CI)
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "benchmarks"):  # run from a checkout without installing
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from density import ALL_TASKS, DEFAULT_DATA, Split, make_split  # noqa: E402

from pyroflows import Flow, fit, flows  # noqa: E402
from pyroflows.training.sizing import flow_size  # noqa: E402
from pyroflows.transforms import Standardize, SupportMap  # noqa: E402
from pyroflows.utils import torch_threads  # noqa: E402


def old_defaults(split: Split, seed: int, quick: bool) -> tuple[Flow, dict]:
    torch.manual_seed(seed)
    flow = flows.nsf(split.dim, split.context_dim)
    return flow, {"epochs": 2 if quick else 100, "batch_size": 512}


def new_defaults(split: Split, seed: int, quick: bool) -> tuple[Flow, dict]:
    torch.manual_seed(seed)
    rows = len(split.x_train) + len(split.x_val)  # the rows a user hands to fit
    flow = flows.nsf(split.dim, split.context_dim, **flow_size(rows, split.dim).options())
    return flow, {"epochs": 2} if quick else {}


def photo_z_flow(seed: int) -> Flow:
    torch.manual_seed(seed)
    return flows.nsf(1, 6, num_layers=3, hidden_dims=(128, 128), count_bins=16)


def bound_variant(name: str, split: Split, seed: int, quick: bool) -> tuple[Flow, dict]:
    """The photo-z flow with no bound, the logarithmic map or the fitted scale."""
    flow, options = photo_z_flow(seed), {"epochs": 2 if quick else 30, "batch_size": 512}
    options["lr"] = 2e-3
    if name == "fitted":
        options["bounds"] = [(0.0, None)]
    elif name == "log":  # the map as it was: fitted here by hand, kept by fit
        support = SupportMap([0.0], [math.inf])
        u = support.inv_and_ladj(split.x_train.double())[0]
        flow.data_transforms.extend([Standardize.from_data(u), support])
        flow.context_transforms.append(Standardize.from_data(split.c_train.double()))
    return flow, options


VARIANTS = {"old": old_defaults, "new": new_defaults}


def run_cell(task: str, variant: str, seed: int, args: argparse.Namespace) -> dict:
    split = make_split(task, args.quick, args.data)
    if args.bounds:
        flow, options = bound_variant(variant, split, seed, args.quick)
    else:
        flow, options = VARIANTS[variant](split, seed, args.quick)
    start = time.perf_counter()
    history = fit(
        flow,
        split.x_train.float(),
        context=None if split.c_train is None else split.c_train.float(),
        validation_data=split.x_val.float(),
        validation_context=None if split.c_val is None else split.c_val.float(),
        seed=seed,
        progress=False,
        **options,
    )
    seconds = time.perf_counter() - start
    with torch.no_grad():
        c = None if split.c_test is None else split.c_test.float()
        test = float(flow.condition(c).log_prob(split.x_test.float()).double().mean())
    return {
        "task": task,
        "variant": variant,
        "seed": seed,
        "test_ll": test,
        "seconds": seconds,
        "epochs_run": history.epochs_run,
        "max_epochs": history.max_epochs,
        "batch_size": history.batch_size,
        "hidden": flow.config["kwargs"]["hidden_dims"][0],
    }


def table(results: list[dict]) -> str:
    """Markdown: mean +- sd over seeds of the test log-likelihood and the fit time."""
    cells: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        cells.setdefault((r["task"], r["variant"]), []).append(r)
    lines = ["| task | defaults | seeds | test LL | fit s | epochs run / limit | batch | width |"]
    lines.append("|" + " --- |" * 8)
    for (task, variant), rs in cells.items():
        ll = [r["test_ll"] for r in rs]
        spread = f" ± {statistics.stdev(ll):.3f}" if len(ll) > 1 else ""
        epochs = "/".join(str(r["epochs_run"]) for r in rs) + f" / {rs[0]['max_epochs']}"
        lines.append(
            f"| {task} | {variant} | {len(rs)} | {statistics.fmean(ll):.3f}{spread} | "
            f"{statistics.fmean(r['seconds'] for r in rs):.0f} | {epochs} | "
            f"{rs[0]['batch_size']} | {rs[0]['hidden']} |"
        )
    return "\n".join(lines)


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default=",".join(ALL_TASKS))
    parser.add_argument("--variants", default=None, help="old,new (--bounds: none,log,fitted)")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--bounds", action="store_true", help="photo-z: bound maps compared")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="galaxies.csv")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="tiny data and 2 epochs (CI)")
    parser.add_argument("--json", type=Path, help="write every number here")
    args = parser.parse_args(argv)
    if args.bounds:
        args.tasks = "photo_z"
    args.variants = args.variants or ("none,log,fitted" if args.bounds else "old,new")
    return args


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = parse(argv)
    results = []
    with torch_threads(args.threads):
        for task in args.tasks.split(","):
            for variant in args.variants.split(","):
                for seed in map(int, args.seeds.split(",")):
                    results.append(run_cell(task, variant, seed, args))
                    r = results[-1]
                    print(
                        f"{task} {variant} seed {seed}: test LL {r['test_ll']:.3f}, "
                        f"{r['seconds']:.0f} s",
                        flush=True,
                    )
                    if args.json:
                        args.json.write_text(json.dumps(results, indent=1))
    print(table(results))
    return results


if __name__ == "__main__":
    main()
