"""The thread-count context manager shared by the command line, examples and benchmarks."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["torch_threads"]


@contextlib.contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Run the block with ``count`` torch CPU threads, then restore the caller's count.

    ``None`` leaves the count as it is. Small flows train fastest on one thread; examples,
    benchmarks and the command line use this to set it without changing their caller's.

    Example:
        >>> import torch
        >>> from pyroflows.utils import torch_threads
        >>> before = torch.get_num_threads()
        >>> with torch_threads(1):
        ...     torch.get_num_threads()
        1
        >>> torch.get_num_threads() == before
        True
    """
    before = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
