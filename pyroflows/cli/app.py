"""`main`: parse the command line, run a command, and turn expected failures into one line."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import sys
from collections.abc import Iterator

import torch

from ..utils import torch_threads
from .parser import build_parser
from .text import PROG, CLIError, one_line

COMMANDS = ("fit", "sample", "logprob", "info", "demo")


def _exit_code(exit_: SystemExit) -> int:
    code = exit_.code
    return code if isinstance(code, int) else (0 if code is None else 1)


def _error(message: object) -> int:
    print(f"{PROG}: error: {one_line(message)}", file=sys.stderr)
    return 1


def _os_error(error: OSError) -> str:
    """An `OSError` as ``reason: file`` (the file whose reading or writing failed)."""
    if error.filename is None:
        return str(error)
    names = [error.filename] + ([error.filename2] if error.filename2 else [])
    return f"{error.strerror or error}: {' -> '.join(os.fsdecode(n) for n in names)}"


def _quiet_stdout() -> None:
    """After a broken pipe (``| head``), point stdout at /dev/null so exit does not fail."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def _run(args: argparse.Namespace) -> int:
    """Run the chosen command, mapping expected failures to an exit status."""
    command = importlib.import_module(f"{__package__}.{args.command}")
    try:
        with torch_threads(args.threads or 1):  # one thread unless asked: small networks
            return command.run(args)
    except BrokenPipeError:
        _quiet_stdout()
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except torch.cuda.OutOfMemoryError:
        return _error("out of GPU memory; try a smaller --batch-size")
    except (CLIError, ValueError) as error:
        return _error(error)
    except OSError as error:
        return _error(_os_error(error))
    except MemoryError:
        return _error("out of memory")


def main(argv: list[str] | None = None) -> int:
    """Run the ``pyroflows`` command with ``argv`` (default ``sys.argv[1:]``).

    Returns:
        The exit status: 0 on success, 1 for bad input or a failed write, 2 for a bad
        command line, 130 when interrupted.
    """
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # --help, --version or a usage error
        return _exit_code(exit_)
    if args.command is None:
        choices = ", ".join(COMMANDS)
        print(f"{PROG}: error: choose a command: {choices} (see '{PROG} --help')", file=sys.stderr)
        return 2
    with _file_size_limit_as_error():
        return _run(args)


@contextlib.contextmanager
def _file_size_limit_as_error() -> Iterator[None]:
    """Ignore SIGXFSZ in the block (a file-size limit is then an OSError, not a kill)."""
    previous = None
    if hasattr(signal, "SIGXFSZ"):
        with contextlib.suppress(ValueError):  # not in the main thread: leave it
            previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGXFSZ, previous)
