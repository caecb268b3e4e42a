"""Durable file writes: a file is either absent, the old version or the new one, never half."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Flush a directory's entries (creations, renames, unlinks) to disk.

    rename(2) and link(2) are atomic but not durable until the directory itself
    is synced; without this a crash can lose a file that was already acknowledged.
    """
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
    try:
        fd = os.open(path, flags)
    except (IsADirectoryError, PermissionError):
        # Platforms that cannot open a directory (Windows) have no directory fsync.
        return
    try:
        os.fsync(fd)
    except OSError:
        # Some filesystems refuse fsync on a directory (EINVAL); nothing more can be done.
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], data: bytes, mode: int = 0o600) -> None:
    """Replace `path` with `data` durably.

    Writes a temporary file in the same directory (so the rename stays on one
    filesystem), fsyncs it, renames it over `path` and fsyncs the directory.
    `mode` is applied before the rename, so the file never exists with looser
    permissions than asked for.
    """
    target = Path(path)
    directory = target.parent
    fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    fsync_dir(directory)
