"""``python -m pyroflows``: the ``pyroflows`` command (see `pyroflows.cli`)."""

import signal
import sys

from .cli import main

try:
    status = main()
except KeyboardInterrupt:  # between the command's own handling and here
    print("pyroflows: interrupted", file=sys.stderr)
    status = 130
signal.signal(signal.SIGINT, signal.SIG_IGN)  # the command is over: a late Ctrl-C changes nothing
sys.exit(status)
