"""``python -m pyroflows``: the ``pyroflows`` command (see `pyroflows.cli`)."""

import sys

from .cli import main

sys.exit(main())
