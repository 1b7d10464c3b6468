"""Keep the published tables reproducible: rerun the quick version of each and compare.

Every results table in the docs comes from a benchmark or example script. For each table
this script reruns a quick version of the command that produced it, in this process, and
compares the numbers it returns with the ones stored in ``benchmarks/reproduce.json``::

    python benchmarks/reproduce.py            # rerun and compare (exit status 1 if any differs)
    python benchmarks/reproduce.py --record   # rerun and store the numbers (after a change)
    python benchmarks/reproduce.py --only density,sbibm

The checks (``CHECKS``; the full command is in each entry, the table on its ``page``):

* ``density``: ``benchmarks/density.py --quick --tasks two_moons,rings --libraries
  pyroflows --steps 25 --quiet`` (test log-likelihoods; pyroflows only, as the anchors are
  other libraries' numbers);
* ``defaults``: ``benchmarks/defaults.py --quick --tasks two_moons`` (test log-likelihood of
  the old and new defaults);
* ``sbibm``: ``benchmarks/sbibm.py --quick`` (mean C2ST on the built-in Gaussian task);
* ``posteriordb``: ``benchmarks/posteriordb/run.py --quick`` (sliced W2 and k-hat of its
  two posteriors and three guides; needs ``../shared/data/posteriordb``);
* ``two_moons_npe``: ``examples/two_moons_npe.py --simulations 500 --epochs 3 --draws
  2000`` (C2ST and the largest coverage gap);
* ``eight_schools``: ``examples/eight_schools.py --steps 20 --particles 2 --num-samples
  400`` (k-hat, ELBO and PSIS-LOO elpd of both parameterisations);
* ``energy_2d``: ``examples/energy_2d.py --steps 3 --particles 2 --energies U3
  --eval-samples 2000 --grid 200`` (KL of every guide);
* ``photo_z``: ``examples/photo_z.py --epochs 1 --rows 2000 --quiet`` (test and validation
  log-likelihood; needs ``../shared/data/galaxies/galaxies.csv``);
* ``vae_mnist``: ``examples/vae_mnist.py --epochs 1 --train-images 300 --iwae-k 8
  --eval-images 20 --hidden-dims 64 --flow-layers 1`` (held-out ELBO and IWAE of both
  posteriors; needs ``../shared/data/mnist_test``).

Each check runs on one torch thread with seed 0 given through the script's own seed option,
inside ``torch.random.fork_rng`` (the caller's generator state is restored after, so the
checks do not depend on their order); files a script writes go to a temporary folder, and
timings are never compared; every script seeds what it draws from its ``--seed``, so a
check reads the same whatever the caller's random state. A check whose data or module is
missing is reported as skipped. The speed tables (``benchmarks/speed.py``, ``paired.py``,
``stl_cost.py``) are not checked: timings do not reproduce across machines.

Tolerances are absolute: 0.02 for log-likelihoods, ELBOs, KLs, C2ST and the other
accuracy numbers, 0.05 for PSIS k-hat. On one machine the runs are bit-for-bit identical;
another CPU may differ in the last bits, and short trainings amplify that.

The slow test ``tests/test_reproduce.py`` runs the comparison.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import io
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyro
import torch

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "tests"):  # a checkout without installing; the tests' script loader
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from _scripts import load_script  # noqa: E402 (loads a script by path, as the tests do)

from pyroflows.utils import torch_threads  # noqa: E402

STORE = ROOT / "benchmarks" / "reproduce.json"
SHARED = ROOT.parent / "shared" / "data"
GALAXIES = SHARED / "galaxies" / "galaxies.csv"
POSTERIORDB = SHARED / "posteriordb"
MNIST = SHARED / "mnist_test"
#: Absolute tolerances: log-likelihood-like and C2ST-like numbers, and PSIS k-hat.
TOLERANCE = 0.02
KHAT_TOLERANCE = 0.05

Numbers = dict[str, float]


@dataclass(frozen=True)
class Check:
    """One published table: how to rerun its quick version and read its numbers."""

    name: str
    page: str
    full_command: str
    run: Callable[[], Numbers]
    tolerance: float = TOLERANCE
    needs: tuple[str, ...] = ()


@dataclass
class Result:
    """The outcome of one check: ``ok``, ``skipped``, ``differs`` or ``failed``."""

    name: str
    status: str
    detail: str = ""
    seconds: float = 0.0
    numbers: Numbers = field(default_factory=dict)

    def line(self) -> str:
        """The report line, e.g. ``density: ok (4.1 s)``."""
        text = {"ok": "ok", "skipped": f"skipped ({self.detail})"}.get(self.status)
        text = text or f"{self.status.upper()}: {self.detail}"
        return f"{self.name}: {text}" + (f" ({self.seconds:.1f} s)" if self.seconds else "")


def run_density() -> Numbers:
    """Test log-likelihood of pyroflows on two toy tasks, 25 steps."""
    out = load_script("benchmarks/density.py").main(
        ["--quick", "--tasks", "two_moons,rings", "--libraries", "pyroflows", "--steps", "25"]
        + ["--first-seed", "0", "--quiet"]
    )
    return {
        f"{task}/{lib}": cell["mean"]
        for task, cells in out["results"].items()
        for lib, cell in cells.items()
    }


def run_defaults() -> Numbers:
    """Test log-likelihood of `fit`'s old and new defaults on two moons, 2 epochs."""
    results = load_script("benchmarks/defaults.py").main(
        ["--quick", "--tasks", "two_moons", "--seeds", "0"]
    )
    return {f"{r['task']}/{r['variant']}": r["test_ll"] for r in results}


def run_sbibm() -> Numbers:
    """Mean C2ST of `fit_posterior` on the built-in Gaussian task, two observations."""
    results = load_script("benchmarks/sbibm.py").main(["--quick", "--seed", "0"])
    return {f"{r['task']}/{r['budget']}/{r['method']}/c2st": r["mean"] for r in results}


def run_posteriordb() -> Numbers:
    """Sliced W2 and k-hat of the quick posteriors and guides, 150 steps."""
    out = load_script("benchmarks/posteriordb/run.py", siblings=True).main(
        ["--quick", "--seeds", "0", "--data", str(POSTERIORDB)]
    )
    numbers = {}
    for posterior, row in out["results"].items():
        for guide, (cell,) in row["guides"].items():
            numbers[f"{posterior}/{guide}/sliced_w2"] = cell["sliced_w2"]
            # beyond 1 every k-hat says the same (do not trust), and its value is unstable
            numbers[f"{posterior}/{guide}/khat"] = min(cell["khat"], 1.0)
    return numbers


def run_two_moons_npe() -> Numbers:
    """C2ST and largest coverage gap of the NPE tutorial on 500 simulations, 3 epochs."""
    result = load_script("examples/two_moons_npe.py").main(
        ["--simulations", "500", "--epochs", "3", "--draws", "2000", "--seed", "0"]
    )
    return {"c2st": result["c2st"], "max_gap": result["max_gap"]}


def run_eight_schools() -> Numbers:
    """k-hat, ELBO and PSIS-LOO elpd of both parameterisations after 20 steps."""
    results = load_script("examples/eight_schools.py").main(
        ["--steps", "20", "--particles", "2", "--num-samples", "400", "--seed", "0"]
    )
    return {
        f"{model}/{key}": result[key]
        for model, result in results.items()
        for key in ("khat", "elbo", "elpd_loo")
    }


def run_energy_2d() -> Numbers:
    """KL of every guide on the energy U3 after 3 steps."""
    table = load_script("examples/energy_2d.py").main(
        ["--steps", "3", "--particles", "2", "--energies", "U3", "--eval-samples", "2000"]
        + ["--grid", "200", "--seed", "0"]
    )
    return {
        f"{energy}/{guide}/kl": row["kl"]
        for energy, rows in table.items()
        for guide, row in rows.items()
    }


def run_photo_z() -> Numbers:
    """Test and validation log-likelihood of the photo-z flow on 2,000 rows, 1 epoch."""
    with tempfile.TemporaryDirectory() as out:
        metrics = load_script("examples/photo_z.py").main(
            ["--data", str(GALAXIES), "--epochs", "1", "--rows", "2000", "--seed", "0"]
            + ["--out", out, "--quiet"]
        )
    return {key: metrics[key] for key in ("test_log_likelihood", "val_log_likelihood")}


def run_vae_mnist() -> Numbers:
    """Held-out ELBO and IWAE of the Gaussian and flow VAEs, tiny settings."""
    with tempfile.TemporaryDirectory() as out:
        results = load_script("examples/vae_mnist.py").main(
            ["--data", str(MNIST), "--out", out, "--epochs", "1", "--train-images", "300"]
            + ["--iwae-k", "8", "--eval-images", "20", "--hidden-dims", "64"]
            + ["--flow-layers", "1", "--seed", "0", "--quiet"]
        )
    return {
        f"{name}/{key}": results[name][key]
        for name in ("gaussian", "flow")
        for key in ("elbo", "iwae")
    }


CHECKS: dict[str, Check] = {
    check.name: check
    for check in (
        Check(
            "density",
            "docs/benchmarks.md",
            "python benchmarks/density.py --steps 3000 --out table.md",
            run_density,
        ),
        Check(
            "defaults",
            "docs/density.md",
            "python benchmarks/defaults.py --tasks two_moons,eight_gaussians,checkerboard,"
            "spirals,rings --seeds 0,1,2",
            run_defaults,
        ),
        Check(
            "sbibm",
            "docs/posterior.md",
            "python benchmarks/sbibm.py --tasks two_moons,gaussian_linear --budgets 1000",
            run_sbibm,
        ),
        Check(
            "posteriordb",
            "docs/benchmarks.md",
            "python benchmarks/posteriordb/run.py --seeds 0,1,2 --out results.md",
            run_posteriordb,
            needs=("../shared/data/posteriordb",),
        ),
        Check(
            "two_moons_npe",
            "docs/posterior.md",
            "python examples/two_moons_npe.py --out figures",
            run_two_moons_npe,
        ),
        Check(
            "eight_schools",
            "docs/workflow.md",
            "python examples/eight_schools.py --reference "
            "../shared/data/posteriordb/eight_schools-eight_schools_noncentered --out figs",
            run_eight_schools,
            needs=("arviz",),
        ),
        Check(
            "energy_2d",
            "docs/guides.md",
            "python examples/energy_2d.py --out figures",
            run_energy_2d,
        ),
        Check(
            "photo_z",
            "docs/benchmarks.md",
            "python examples/photo_z.py --out photo_z_out",
            run_photo_z,
            needs=("../shared/data/galaxies/galaxies.csv",),
        ),
        Check(
            "vae_mnist",
            "docs/vae.md",
            "python examples/vae_mnist.py --out vae_out",
            run_vae_mnist,
            needs=("../shared/data/mnist_test",),
        ),
    )
}


def missing(check: Check) -> list[str]:
    """The check's needs that are absent: paths (relative to the repository) or modules."""
    absent = []
    for need in check.needs:
        if "/" in need:
            if not (ROOT / need).exists():
                absent.append(need)
        elif importlib.util.find_spec(need) is None:
            absent.append(f"module {need}")
    return absent


@contextlib.contextmanager
def isolated(check: Check, verbose: bool) -> Iterator[None]:
    """One torch thread, an empty Pyro parameter store, the caller's torch generator state
    restored after, and the script's output hidden unless ``verbose``."""
    hide = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with torch_threads(1), torch.random.fork_rng(devices=[]), hide:
        pyro.clear_param_store()
        try:
            yield
        finally:
            pyro.clear_param_store()


def run_check(check: Check, verbose: bool = False) -> Result:
    """Run one check's quick command; ``skipped`` when a need is absent."""
    absent = missing(check)
    if absent:
        return Result(check.name, "skipped", "missing " + ", ".join(absent))
    start = time.perf_counter()
    try:
        with isolated(check, verbose):
            numbers = {key: float(value) for key, value in check.run().items()}
    except Exception as error:  # one broken script must not hide the others
        return Result(check.name, "failed", f"{type(error).__name__}: {error}")
    return Result(check.name, "ok", seconds=time.perf_counter() - start, numbers=numbers)


def tolerance_for(check: Check, number: str) -> float:
    """The absolute tolerance of one number: k-hat's, or the check's."""
    return KHAT_TOLERANCE if number.endswith("khat") else check.tolerance


def agree(stored: float, now: float, tolerance: float) -> bool:
    """Within ``tolerance``; NaN matches NaN and an infinity the same infinity."""
    if math.isnan(stored) or math.isnan(now):
        return math.isnan(stored) and math.isnan(now)
    if math.isinf(stored) or math.isinf(now):
        return stored == now
    return abs(stored - now) <= tolerance


def differences(check: Check, stored: Numbers, now: Numbers) -> list[str]:
    """One phrase per number that differs, is new or is gone."""
    out = []
    for key in sorted(stored.keys() | now.keys()):
        if key not in now:
            out.append(f"{key} stored {stored[key]:.6g} now missing")
        elif key not in stored:
            out.append(f"{key} not stored, now {now[key]:.6g} (run --record)")
        elif not agree(stored[key], now[key], tol := tolerance_for(check, key)):
            out.append(f"{key} stored {stored[key]:.6g} now {now[key]:.6g} (tolerance {tol:g})")
    return out


def compare(check: Check, result: Result, stored: dict) -> Result:
    """Mark ``result`` as ``differs`` where its numbers are not the stored ones."""
    if result.status != "ok":
        return result
    if check.name not in stored:
        result.status, result.detail = "differs", "no stored numbers (run --record)"
        return result
    found = differences(check, stored[check.name], result.numbers)
    if found:
        result.status, result.detail = "differs", "; ".join(found)
    return result


def load_store(path: Path) -> dict:
    """The stored numbers, ``{}`` when there is no file yet."""
    return json.loads(path.read_text()) if path.is_file() else {}


def meta() -> dict:
    """Versions, thread count and date of a recording."""
    return {
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "threads": 1,
        "date": datetime.date.today().isoformat(),
    }


def save_store(path: Path, stored: dict, results: Sequence[Result]) -> None:
    """Replace the numbers of the checks that ran, keep the others; atomic replace."""
    numbers = {k: v for k, v in stored.items() if k != "_meta"}
    numbers.update({r.name: r.numbers for r in results if r.status == "ok"})
    order = [name for name in CHECKS if name in numbers] + sorted(numbers.keys() - CHECKS.keys())
    ordered = {"_meta": meta(), **{name: numbers[name] for name in order}}
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(ordered, indent=1) + "\n")
    os.replace(partial, path)


def run_checks(
    names: Sequence[str], stored: dict, record: bool = False, verbose: bool = False
) -> list[Result]:
    """Run the named checks in turn, printing one line each; compared unless ``record``."""
    results = []
    for name in names:
        check = CHECKS[name]
        result = run_check(check, verbose)
        if not record:
            result = compare(check, result, stored)
        print(result.line(), flush=True)
        results.append(result)
    return results


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line: ``--record``, ``--only``, ``--store``, ``--verbose``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", action="store_true", help="store the numbers instead")
    parser.add_argument("--only", help=f"comma-separated among {','.join(CHECKS)}")
    parser.add_argument("--store", type=Path, default=STORE, help="the stored numbers (JSON)")
    parser.add_argument("--verbose", action="store_true", help="show the scripts' output")
    args = parser.parse_args(argv)
    args.names = args.only.split(",") if args.only else list(CHECKS)
    unknown = [n for n in args.names if n not in CHECKS]
    if unknown:
        parser.error(f"unknown checks {unknown}; known: {', '.join(CHECKS)}")
    return args


def version_note(stored: dict) -> str | None:
    """A line when the numbers were stored with other torch or Pyro versions."""
    old, now = stored.get("_meta", {}), meta()
    changed = [
        f"{k} {old[k]} -> {now[k]}" for k in ("torch", "pyro") if k in old and old[k] != now[k]
    ]
    return "note: stored with other versions: " + ", ".join(changed) if changed else None


def main(argv: Sequence[str] | None = None) -> int:
    """Rerun the checks; compare (default) or record. Returns the exit status."""
    args = parse_args(argv)
    stored = load_store(args.store)
    if not args.record and (note := version_note(stored)):
        print(note)
    results = run_checks(args.names, stored, args.record, args.verbose)
    if args.record:
        save_store(args.store, stored, results)
        print(f"wrote {args.store}")
    return int(any(r.status in ("differs", "failed") for r in results))


if __name__ == "__main__":
    sys.exit(main())
