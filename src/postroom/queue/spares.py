"""Spare files: the queue reuses the files of finished messages instead of creating new ones.

A file renamed out of the way and back in later allocates and frees no inode,
whatever the filesystem (ext4 without a journal walks past every inode freed
in the last minutes on each creation: `recently_deleted()` in fs/ext4/ialloc.c).
So `QueueStore` retires a finished file by renaming it into `spare/` and
blanking it, and takes a spare (open and flock it, then rename it into place)
before it creates a new file. Blanking overwrites the content with zeros in
place rather than truncating, which would free the blocks only to allocate
them again; files over `BLANK_LIMIT` are truncated instead. The writer of a
taken spare overwrites it from the start and cuts what is left beyond its own
end (`Taken.trim`), so no old byte is ever part of a new file. Nothing in
`spare/` is ever read, and an old message stays on disk no longer than an
unlinked one would.

Safety. A rename moves one name; it cannot leave a file under two. Only a
filesystem repaired after a crash without a journal might give back an inode
with both its spare name and a queue name; a taken spare with more than one
link is therefore never written to (its spare name is dropped, the other name
is left as it is). A spare is flocked while it is blanked and from before it
is taken until its writer is done, so no taker gets a file being blanked, no
blanking overwrites a taken file, and `recover` never finds a taken one
unlocked. The pool is bounded (`SPARE_LIMIT`): past it, retiring unlinks.
"""

from __future__ import annotations

import collections
import itertools
import os
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from postroom.store import durable

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

SPARE = "spare"
# Enough for the messages a busy queue has in flight at once.
SPARE_LIMIT = 512
# Spares up to this size are blanked with zeros in place; bigger ones are truncated
# (writing megabytes of zeros would cost more than freeing the blocks). Most mail
# is smaller. The pool thus keeps at most SPARE_LIMIT x BLANK_LIMIT (32 MiB) of
# blocks allocated; usually far less, a message's worth per spare.
BLANK_LIMIT = 64 * 1024
# List spare/ again at most this often: when it was found empty (creating files
# is then the only way for a while), and when the count says it is full.
RELIST_AFTER = 1.0


@dataclass(frozen=True)
class Taken:
    """A spare renamed into place: open for writing, holding `stale` old octets (zeros)."""

    fd: int
    path: str
    stale: int

    def trim(self, written: int) -> None:
        """Cut what is left of the old content past the `written` octets of the new
        (before the data sync, which then covers the new size)."""
        if self.stale > written:
            durable.OS.truncate(self.fd, Path(self.path), written)


class Spares:
    """The pool of blanked files under `folder` (one per queue, shared by its processes)."""

    def __init__(self, folder: Path, limit: int = SPARE_LIMIT) -> None:
        self.folder = folder
        self.limit = limit
        self._names: collections.deque[str] = collections.deque()
        self._count = -1  # estimate of the files in the folder; -1: not listed yet
        self._listed_at = -RELIST_AFTER  # time.monotonic() of the last listing
        self._listed_empty = False
        self._lock = threading.Lock()
        self._serial = itertools.count()
        self._pid = -1  # names are drawn per process (the server forks after start)
        self._nonce = ""

    def take(self, folder: Path, suffix: str) -> Taken | None:
        """Rename a spare into `folder` as ".<name><suffix>" and open it for writing,
        or None when there is none (the caller creates a file). The caller writes
        from offset 0 and then calls `Taken.trim`.
        """
        while True:
            name = self._next_name()
            if name is None:
                return None
            target = folder / f".{name}{suffix}"
            try:
                fd = os.open(self.folder / name, os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0))
            except FileNotFoundError:
                continue  # another process took it first
            except OSError:
                unlink(self.folder / name)
                continue
            try:
                # Locked before it gets a temporary name: `recover` leaves a locked
                # temporary file alone. A spare someone holds (being blanked, or
                # taken by another process) is theirs: make a file instead.
                if not try_lock(fd):
                    os.close(fd)
                    return None
                os.rename(self.folder / name, target)
            except FileNotFoundError:
                os.close(fd)
                if not folder.is_dir():
                    return None  # nowhere to put it; the caller makes the folder
                continue  # another process took it first
            except OSError:
                os.close(fd)
                return None
            try:
                st = os.fstat(fd)
                if st.st_nlink != 1 or not stat.S_ISREG(st.st_mode):
                    # Still named elsewhere (see the module docstring): not ours to write.
                    os.close(fd)
                    unlink(target)
                    continue
            except BaseException:
                os.close(fd)
                unlink(target)
                raise
            return Taken(fd, str(target), st.st_size)

    def retire(self, path: Path) -> None:
        """Remove `path` from where it is: into the pool when there is room, else unlinked.

        FileNotFoundError when `path` does not exist, as for unlink.
        """
        if self._has_room():
            name = self._new_name()
            spare = self.folder / name
            try:
                durable.OS.rename(path, spare)  # its removal from the queue folder
            except FileNotFoundError:
                if not path.exists():
                    raise
            except OSError:
                pass
            else:
                # Blanked after the rename, so a reader of the old name never sees
                # it change; if another process took the spare meanwhile, the name
                # is gone and this does nothing (its writer overwrites and trims).
                _blank(spare)
                with self._lock:
                    self._count += 1
                    self._names.append(name)
                return
        path.unlink()

    def _next_name(self) -> str | None:
        with self._lock:
            if not self._names:
                self._refill()
            if not self._names:
                return None
            self._count -= 1
            return self._names.popleft()

    def _has_room(self) -> bool:
        with self._lock:
            if self._count < 0:
                self._list()
            elif self._count >= self.limit and time.monotonic() - self._listed_at >= RELIST_AFTER:
                # The count only knows this process's own takes: the other server
                # processes take spares too (they queue mail), so a count at the
                # limit is usually stale. Trusting it would unlink every finished
                # file while the others create new ones: the churn this pool exists
                # to avoid.
                self._list()
            return self._count < self.limit

    def _refill(self) -> None:
        if self._count >= 0 and self._listed_empty and (
            time.monotonic() - self._listed_at < RELIST_AFTER
        ):
            return
        self._list()

    def _list(self) -> None:
        """Take stock of the folder: its names become this process's list."""
        try:
            names = [n for n in os.listdir(self.folder) if not n.startswith(".")]
        except OSError:
            names = []
        self._count = len(names)
        self._names = collections.deque(names)
        self._listed_at = time.monotonic()
        self._listed_empty = not names

    def _new_name(self) -> str:
        pid = os.getpid()
        if pid != self._pid:
            self._pid, self._nonce = pid, os.urandom(4).hex()
        return f"{pid}.{self._nonce}.{next(self._serial)}"


def _blank(path: Path) -> None:
    """Overwrite the content of `path` with zeros, in place (see the module docstring),
    unless it is locked: taken meanwhile by a writer, who overwrites it anyway."""
    try:
        fd = os.open(path, os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return
    try:
        if not try_lock(fd):
            return
        size = os.fstat(fd).st_size
        if size > BLANK_LIMIT:
            os.ftruncate(fd, 0)
        else:
            zeros, offset = memoryview(bytes(size)), 0
            while offset < size:
                offset += os.pwrite(fd, zeros[offset:], offset)
    except OSError:
        pass
    finally:
        os.close(fd)


def try_lock(fd: int) -> bool:
    """Take the file's flock without waiting; False when someone else holds it."""
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def unlink(path: Path) -> bool:
    """Remove `path`; False when it was not there."""
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True
