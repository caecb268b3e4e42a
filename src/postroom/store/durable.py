"""Durable writes, the one way every caller makes them: write, data sync, publish, folder sync.

Whatever postroom acknowledges (a 250 to DATA, a +OK to QUIT, a DELE that
`fetch` sends once its copy is safe) must survive a power cut, not only a
killed process. Every caller therefore takes these steps, in this order:

1. write the data to a file no reader looks at yet (a temporary name);
2. sync its data: fdatasync(2), fsync(2) where it is missing. Before this the
   data may exist only in the page cache, and a name that shows the file could
   survive a crash while the data does not;
3. publish: rename(2) or link(2) gives the file its final name, which shows the
   whole file at once. link(2) cannot cross filesystems (a maildir symlinked
   onto another disk: EXDEV), exceed a file's link count (EMLINK) or work where
   a filesystem has no hard links (EPERM, ENOTSUP): then the file is copied into
   a temporary file beside the destination, which is synced and renamed (steps
   1-3 again, on the destination's filesystem);
4. sync each folder whose names changed, once per batch of files: a rename or
   link is atomic at once but durable only when its folder is synced;
5. only then acknowledge.

Removals (POP3's Update state) are steps 3-5 with unlink(2) or rename(2).

Every system call of these steps goes through this module's `OS`, a
`SysCalls`. Tests put a recorder there and check, for every caller, that the
steps come in this order before the acknowledgement.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

FILE_MODE = 0o600
# Octets copied at a time when a link falls back to a copy.
COPY_CHUNK = 1024 * 1024
# writev(2) takes at most IOV_MAX pieces (POSIX; 1024 on Linux) and fails with
# EINVAL beyond that.
IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 16
# link(2) errors that mean "no hard link can be made here", not "the name is
# taken": another filesystem, too many links to the inode, no hard links.
LINK_FALLBACK_ERRNOS = frozenset({
    errno.EXDEV,
    errno.EMLINK,
    errno.EPERM,
    errno.ENOSYS,
    errno.EOPNOTSUPP,
    getattr(errno, "ENOTSUP", errno.EOPNOTSUPP),
})
# fsync(2) on a folder: filesystems that cannot sync folders say EINVAL (or
# that it is not supported); there is nothing more to do there. Any other
# error (EIO) means the names may be lost, and is raised.
_DIR_SYNC_UNSUPPORTED = frozenset({
    errno.EINVAL, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP),
})

_datasync = getattr(os, "fdatasync", os.fsync)


class SysCalls:
    """The system calls of durable writes; `path` names the file an fd belongs to."""

    def create(self, path: Path, mode: int = FILE_MODE) -> int:
        """A new file, open for writing; FileExistsError if the name is taken."""
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)

    def open_append(self, path: Path, mode: int = FILE_MODE) -> tuple[int, bool]:
        """`path` opened for reading and appending, made when missing: (fd, made)."""
        flags = os.O_RDWR | os.O_APPEND | os.O_CLOEXEC
        try:
            return os.open(path, flags), False
        except FileNotFoundError:
            pass
        try:
            return os.open(path, flags | os.O_CREAT | os.O_EXCL, mode), True
        except FileExistsError:  # made by another program meanwhile
            return os.open(path, flags), False

    def write(self, fd: int, path: Path, chunks: Sequence[bytes]) -> None:
        """Write every octet of `chunks` (writev(2) may write fewer than asked)."""
        pending = [c for c in chunks if c]
        while pending:
            written = os.writev(fd, pending[:IOV_MAX])
            while pending and written >= len(pending[0]):
                written -= len(pending.pop(0))
            if written:
                pending[0] = pending[0][written:]

    def truncate(self, fd: int, path: Path, size: int) -> None:
        os.ftruncate(fd, size)

    def datasync(self, fd: int, path: Path, *, metadata: bool = False) -> None:
        """The file's data, and what it takes to read it back (its size), on disk;
        with `metadata`, its mode and times as well (fsync(2))."""
        if metadata:
            os.fsync(fd)
        else:
            _datasync(fd)

    def link(self, src: Path, dst: Path) -> None:
        os.link(src, dst)

    def rename(self, src: Path, dst: Path) -> None:
        os.rename(src, dst)

    def unlink(self, path: Path) -> None:
        os.unlink(path)

    def mkdir(self, path: Path, mode: int) -> None:
        os.mkdir(path, mode)

    def sync_dir(self, path: Path) -> None:
        """Flush a folder's entries (creations, renames, links, unlinks) to disk."""
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | os.O_CLOEXEC)
        except (IsADirectoryError, PermissionError):  # pragma: no cover - Windows
            return  # platforms that cannot open a folder have no folder sync
        try:
            os.fsync(fd)
        except OSError as exc:
            if exc.errno not in _DIR_SYNC_UNSUPPORTED:
                raise
        finally:
            os.close(fd)


OS = SysCalls()  # tests replace it with a recorder (tests/durable_order.py)


def write_new(path: Path, chunks: Sequence[bytes], mode: int = FILE_MODE) -> int:
    """Step 1: create `path` (never over another file) and write `chunks` into it.

    Returns the open fd, for the caller's data sync (step 2), which a batch
    does for all its files together. On failure nothing is left behind.
    """
    fd = OS.create(path, mode)
    try:
        OS.write(fd, path, chunks)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            OS.unlink(path)
        raise
    return fd


def sync_and_close(fd: int, path: Path) -> None:
    """Step 2 for one file, then close it (closed also when the sync fails)."""
    try:
        OS.datasync(fd, path)
    finally:
        os.close(fd)


def link_or_copy(src: Path, dst: Path, tmp: Path) -> None:
    """Step 3 by link: give the synced file `src` the further name `dst`.

    Where link(2) cannot work (LINK_FALLBACK_ERRNOS) the file is copied to
    `tmp`, a free name in a folder on `dst`'s filesystem, synced and renamed
    to `dst` (steps 1-3 again), leaving no `tmp` behind. Any other error (the
    name is taken, the disk is full) is raised.
    """
    try:
        OS.link(src, dst)
        return
    except OSError as exc:
        if isinstance(exc, FileExistsError) or exc.errno not in LINK_FALLBACK_ERRNOS:
            raise
    out = OS.create(tmp)
    try:
        with open(src, "rb", buffering=0) as source:
            while chunk := source.read(COPY_CHUNK):
                OS.write(out, tmp, [chunk])
        fd, out = out, -1
        sync_and_close(fd, tmp)
        OS.rename(tmp, dst)
    except BaseException:
        if out >= 0:
            os.close(out)
        with contextlib.suppress(OSError):
            OS.unlink(tmp)
        raise


def sync_folders(folders: Iterable[Path]) -> dict[Path, OSError]:
    """Step 4: sync each folder once; the folders whose sync failed, with the error."""
    failed: dict[Path, OSError] = {}
    for folder in dict.fromkeys(folders):
        try:
            OS.sync_dir(folder)
        except OSError as exc:
            failed[folder] = exc
    return failed


def sync_dir(folder: Path) -> None:
    """Step 4 for one folder; raises when the sync fails."""
    OS.sync_dir(folder)
