"""One-shot GPU check: the test suite on CUDA, then the spline flows' speed against zuko.

Meant for a borrowed GPU machine and a single call of a few minutes. In order:

1. **Environment**: torch, CUDA device, and whether pyro-ppl, ArviZ and zuko import. With
   ``--wheels DIR`` the wheels in ``DIR`` (from ``../shared/scripts/gpu-wheels.sh``) are
   installed first into ``.site`` (no network, no dependencies) and put on the path.
2. **Tests**: ``pytest --device cuda`` on the suites that take a device (properties,
   distributions, training, compile, guides) plus every ``gpu``-marked test.
3. **Speed**: ``benchmarks/speed.py --device cuda`` for the spline flows at ``--dims`` and
   ``--batches`` against zuko, eager and compiled (``--no-compile`` to skip compiling).

Each step has its own time limit within ``--budget`` seconds (default 540, so the whole check
fits a 9-minute call); a step that runs out is reported as such and the next one starts.
Everything goes into one Markdown report (``--out``). Without CUDA the check stops after
step 1 with exit status 2 and says so in the report.

    python benchmarks/gpu_check.py --out gpu_report.md --wheels .whl
    python benchmarks/gpu_check.py --out r.md --skip-tests --dims 32 --batches 16384
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))
#: Suites that take ``--device``, and the marker of the tests that need CUDA.
DEVICE_SUITES = (
    "tests/test_properties.py",
    "tests/test_structures.py",
    "tests/test_distribution.py",
    "tests/test_training.py",
    "tests/test_compile.py",
    "tests/test_autoflow.py",
    "tests/test_pyro_defects.py",
)
SPEED_FLOWS = "nsf-coupling,nsf-ar"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line, checked (a bad value exits with status 2 and a one-line error)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_report.md"), help="the report")
    parser.add_argument("--wheels", type=Path, help="install these wheels first (see above)")
    parser.add_argument("--budget", type=float, default=540.0, help="seconds for everything")
    parser.add_argument("--dims", default="8,32,64", help="event sizes for the speed step")
    parser.add_argument("--batches", default="1024,16384,65536", help="batch sizes")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per configuration")
    parser.add_argument("--no-compile", action="store_true", help="time eager flows only")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    args = parser.parse_args(argv)
    if not 30 <= args.budget <= 3600:
        parser.error(f"--budget must be between 30 and 3600 seconds, got {args.budget:g}")
    for name in ("dims", "batches"):
        try:
            values = [int(v) for v in getattr(args, name).split(",")]
        except ValueError:
            parser.error(f"--{name} must be comma-separated integers, got {getattr(args, name)!r}")
        if not values or min(values) < 1:
            parser.error(f"--{name} must be positive integers, got {getattr(args, name)!r}")
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    if args.wheels is not None and not args.wheels.is_dir():
        parser.error(f"--wheels {args.wheels} is not a folder")
    if args.out.exists() and args.out.is_dir():
        parser.error(f"--out {args.out} is a folder")
    return args


def install_wheels(folder: Path) -> str:
    """Install every wheel in ``folder`` into ``ROOT/.site`` (offline) and use it."""
    wheels = sorted(str(p) for p in folder.glob("*.whl"))
    if not wheels:
        return f"no wheels in {folder}"
    site = ROOT / ".site"
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps"]
    command += ["--no-compile", "--target", str(site), *wheels]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        return f"pip failed: {done.stderr.strip().splitlines()[-1:]}"
    sys.path.insert(0, str(site))
    os.environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(site), str(ROOT), os.environ.get("PYTHONPATH")])
    )
    return f"installed {len(wheels)} wheels into .site"


def environment() -> tuple[list[str], bool]:
    """Report lines on torch, the device and the optional packages; whether CUDA is there."""
    import torch

    cuda = torch.cuda.is_available()
    python = sys.version.split()[0]
    lines = [f"- torch {torch.__version__}, CUDA build {torch.version.cuda}, Python {python}"]
    if cuda:
        props = torch.cuda.get_device_properties(0)
        lines.append(f"- device: {props.name}, {props.total_memory / 2**30:.0f} GiB")
    else:
        lines.append("- **no CUDA device**: the tests and the speed table need one")
    for name in ("pyro", "arviz", "zuko", "triton"):
        try:
            module = importlib.import_module(name)
            lines.append(f"- {name} {getattr(module, '__version__', '?')}")
        except ImportError:
            lines.append(f"- {name}: not importable")
    return lines, cuda


def run_step(command: list[str], limit: float) -> tuple[str, str]:
    """Run ``command`` from the repository root for at most ``limit`` seconds."""
    start = time.monotonic()
    try:
        done = subprocess.run(
            command, cwd=ROOT, capture_output=True, text=True, timeout=max(limit, 1.0)
        )
    except subprocess.TimeoutExpired as stopped:
        tail = (stopped.stdout or b"")[-4000:]
        text = tail.decode() if isinstance(tail, bytes) else tail
        return f"stopped after {limit:.0f} s (time limit)", text
    took = time.monotonic() - start
    return f"exit status {done.returncode} in {took:.0f} s", (done.stdout + done.stderr)[-6000:]


def test_command() -> list[str]:
    """pytest on CUDA: the device-taking suites and every gpu-marked test."""
    suites = [s for s in DEVICE_SUITES if (ROOT / s).exists()]
    return [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "--maxfail=20",
        "--device",
        "cuda",
        "-m",
        "not slow",
        "-p",
        "no:cacheprovider",
        *suites,
    ]


def speed_command(args: argparse.Namespace, out: Path) -> list[str]:
    """benchmarks/speed.py on CUDA for the spline flows against zuko."""
    command = [
        sys.executable,
        "benchmarks/speed.py",
        "--device",
        "cuda",
        "--flows",
        SPEED_FLOWS,
        "--dims",
        args.dims,
        "--batch",
        args.batches,
        "--contexts",
        "0",
        "--libraries",
        "pyroflows,zuko",
        "--rounds",
        str(args.rounds),
        "--warmup",
        "1",
        "--quiet",
        "--out",
        str(out),
    ]
    return command if args.no_compile else [*command, "--compile"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the check and write the report; 0 when every step ran, 2 without CUDA."""
    args = parse_args(argv)
    deadline = time.monotonic() + args.budget
    report = [
        "# GPU check",
        "",
        f"`python benchmarks/gpu_check.py {' '.join(argv or sys.argv[1:])}`",
        "",
    ]
    if args.wheels is not None:
        report += [f"- wheels: {install_wheels(args.wheels)}"]
    lines, cuda = environment()
    report += ["## Environment", "", *lines, ""]
    status = 0
    if not cuda:
        report += ["Stopped: no CUDA device.", ""]
        status = 2
    else:
        if not args.skip_tests:
            verdict, tail = run_step(test_command(), (deadline - time.monotonic()) * 0.4)
            report += ["## Tests on CUDA", "", verdict, "", "```text", tail.strip(), "```", ""]
        if not args.skip_speed:
            table = args.out.with_suffix(".speed.md")
            verdict, tail = run_step(speed_command(args, table), deadline - time.monotonic() - 5)
            body = table.read_text() if table.exists() else tail
            report += ["## Speed on CUDA", "", verdict, "", body.strip(), ""]
    from pyroflows.files import atomic_write  # after --wheels: pyroflows needs pyro-ppl

    with atomic_write(args.out, "w") as handle:
        handle.write("\n".join(report))
    print("\n".join(report))
    return status


if __name__ == "__main__":
    sys.exit(main())
