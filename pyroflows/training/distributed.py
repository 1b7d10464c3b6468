"""Data-parallel training: the process group `fit` trains in, and who owns it.

`process_group` is a context manager around the training: it uses a process group the
caller (or their script) has initialised and leaves it alone, or joins the one ``torchrun``
describes in its environment and destroys it on exit, exception included. It never leaves
a CUDA device selected that it changed.

Example:
    >>> from pyroflows.training import process_group
    >>> with process_group() as group:  # not launched by torchrun: one process
    ...     group.rank, group.world_size, group.owned
    (0, 1, False)
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist

__all__ = ["DataParallel", "process_group", "is_main_process"]


@dataclass(frozen=True)
class DataParallel:
    """Where this process stands in data-parallel training.

    Attributes:
        rank: this process's rank (0 alone).
        world_size: number of processes (1 alone).
        device: the device to train on: the one asked for, or ``cuda:LOCAL_RANK`` for an
            NCCL group asked for no particular GPU; ``None``: where the flow is.
        owned: whether `process_group` created the group (and destroys it on exit).
    """

    rank: int
    world_size: int
    device: torch.device | None
    owned: bool


def is_main_process() -> bool:
    """``True`` unless this is a non-zero rank of a process group or of a torchrun launch.

    Without an initialised process group the ``RANK`` that ``torchrun`` sets decides, so
    the answer stays right after `fit` has destroyed the group it created.
    """
    if torch_dist.is_available() and torch_dist.is_initialized():
        return torch_dist.get_rank() == 0
    return _environment("RANK", 0) == 0


@contextmanager
def process_group(device: torch.device | None = None) -> Iterator[DataParallel]:
    """Train in the current process group, or in the one ``torchrun`` describes.

    * A group initialised by the caller is used and left initialised.
    * Launched by ``torchrun`` with ``WORLD_SIZE > 1`` and no group: a group is created
      from the environment (NCCL when CUDA is available and ``device`` is not a CPU, gloo
      otherwise) and destroyed on exit, also on an exception.
    * Otherwise: one process, nothing to do.

    With NCCL and no GPU index in ``device``, each process uses ``cuda:LOCAL_RANK`` and
    selects it as the current CUDA device for the duration; the previous one is restored.

    Args:
        device: the device asked for (``None``: where the flow is).

    Yields:
        A `DataParallel` record.
    """
    if not torch_dist.is_available() or (
        _environment("WORLD_SIZE", 1) <= 1 and not torch_dist.is_initialized()
    ):
        yield DataParallel(0, 1, device, owned=False)
        return
    owned = not torch_dist.is_initialized()
    if owned:
        use_cuda = (device is None or device.type == "cuda") and torch.cuda.is_available()
        torch_dist.init_process_group("nccl" if use_cuda else "gloo")
    previous = None
    try:
        rank = torch_dist.get_rank()
        if torch_dist.get_backend() == "nccl" and (device is None or device.type == "cuda"):
            if device is None or device.index is None:
                # One GPU per process: "cuda" alone would put every rank on cuda:0.
                device = torch.device("cuda", _environment("LOCAL_RANK", rank))
            previous = torch.cuda.current_device()
            torch.cuda.set_device(device)
        yield DataParallel(rank, torch_dist.get_world_size(), device, owned)
    finally:
        if previous is not None:
            torch.cuda.set_device(previous)
        if owned:
            torch_dist.destroy_process_group()


def _environment(name: str, default: int) -> int:
    """The integer environment variable ``name`` (``default`` if unset or not an integer)."""
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default
