"""Durable file writes: a file is either absent, the old version or the new one, never half."""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

from postroom.store import durable


def atomic_write(
    path: str | os.PathLike[str], data: bytes, mode: int = 0o600, *, sync_dir: bool = True
) -> None:
    """Replace `path` with `data` durably (postroom.store.durable's steps).

    Writes a temporary file in the same folder (so the rename stays on one
    filesystem), syncs it, renames it over `path` and syncs the folder.
    `mode` is applied before the rename, so the file never exists with looser
    permissions than asked for, whatever the umask. `sync_dir=False`: the caller
    syncs the folder itself, once for a batch of files.
    """
    target = Path(path)
    directory = target.parent
    while True:
        tmp = directory / f".{target.name}.{secrets.token_hex(6)}.tmp"
        try:
            fd = durable.OS.create(tmp, 0o600)
            break
        except FileExistsError:  # pragma: no cover - needs a clash of random names
            continue
    try:
        try:
            if hasattr(os, "fchmod"):
                os.fchmod(fd, mode)
            durable.OS.write(fd, tmp, [data])
            durable.OS.datasync(fd, tmp, metadata=True)  # the mode too
        finally:
            os.close(fd)
        durable.OS.rename(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if sync_dir:
        durable.sync_dir(directory)
