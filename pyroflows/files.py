"""Writing files safely: atomic replacement, and outputs that must not be inputs.

Every file pyroflows writes (models, CSV tables, figures) goes through `atomic_write`: the
bytes go to a temporary file in the target's folder, are flushed and synced to disk, and
only then is the temporary file renamed over the target. A command that fails or is
interrupted (``Ctrl-C``, ``kill -9``, a full disk) therefore leaves the previous file
intact; at worst a hidden ``.NAME.*.tmp`` file stays behind after ``kill -9``.

Example:
    >>> import os, tempfile
    >>> from pyroflows.files import atomic_write
    >>> path = os.path.join(tempfile.mkdtemp(), "table.csv")
    >>> with atomic_write(path, "w") as handle:
    ...     _ = handle.write("x\\n1\\n")
    >>> open(path).read()
    'x\\n1\\n'
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from collections.abc import Iterable, Iterator
from typing import IO

__all__ = ["atomic_write", "same_file", "check_not_an_input"]


def _write_error(error: OSError, path: str) -> OSError:
    """``error`` re-raised as an `OSError` that names the target, not the temporary file."""
    return OSError(error.errno, error.strerror or str(error), path)


@contextlib.contextmanager
def atomic_write(
    path: str | os.PathLike, mode: str = "wb", *, encoding: str | None = None
) -> Iterator[IO]:
    """Open a temporary file next to ``path``; on success, sync it and rename it onto ``path``.

    If the ``with`` block raises (or the process dies), ``path`` is left as it was and the
    temporary file is removed (after ``kill -9`` it may remain as ``.NAME.*.tmp``). A new
    file gets the permissions ``open`` would give it; an existing file keeps its permissions.
    A symbolic link is written through (its target is replaced, the link stays); an existing
    path that is not a regular file (a device such as ``/dev/null``, a pipe) is refused.

    Args:
        path: the file to (re)place.
        mode: ``"wb"`` (default) or ``"w"`` (text, ``newline=""`` so CSV writers control
            line endings).
        encoding: text encoding for ``"w"`` (default UTF-8).

    Raises:
        OSError: the folder cannot be written (missing, read-only, full); the error names
            ``path``.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"mode must be 'wb' or 'w', got {mode!r}")
    target = os.path.realpath(os.fspath(path))  # through links: replace what they point to
    if os.path.isdir(target):
        raise IsADirectoryError(errno.EISDIR, "Is a directory", os.fspath(path))
    if os.path.exists(target) and not os.path.isfile(target):
        raise OSError(errno.EINVAL, "Not a regular file (refusing to replace it)", os.fspath(path))
    folder = os.path.dirname(os.path.abspath(target))
    try:
        fd, temporary = tempfile.mkstemp(
            prefix=f".{os.path.basename(target)}.", suffix=".tmp", dir=folder
        )
    except OSError as error:
        raise _write_error(error, os.fspath(path)) from None
    try:
        text = {"encoding": encoding or "utf-8", "newline": ""} if mode == "w" else {}
        with os.fdopen(fd, mode, **text) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, _permissions(target))
        os.replace(temporary, target)
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        if isinstance(error, OSError) and not isinstance(error, BrokenPipeError):
            raise _write_error(error, os.fspath(path)) from None
        raise
    _sync_folder(folder)


def _permissions(target: str) -> int:
    """The mode bits the target has, or those a new file would get under the umask."""
    try:
        return stat.S_IMODE(os.stat(target).st_mode)
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def _sync_folder(folder: str) -> None:
    """Make the rename durable (where the platform allows syncing a folder)."""
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether ``a`` and ``b`` are the same existing file (through links and ``..`` too)."""
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):
        return False


def check_not_an_input(
    out: str | os.PathLike | None, inputs: Iterable[str | os.PathLike | None], option: str = "--out"
) -> None:
    """Raise a `ValueError` if ``out`` is the same file as one of ``inputs``.

    ``None`` and ``"-"`` (standard input/output) are never files and are skipped.
    """
    if out is None or os.fspath(out) == "-":
        return
    for source in inputs:
        if source is not None and os.fspath(source) != "-" and same_file(out, source):
            raise ValueError(
                f"{option} {os.fspath(out)} is also an input of this command; "
                "write to another file (the input would be overwritten)"
            )
