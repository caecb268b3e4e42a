"""The Maildir POP3 maildrop (api.Maildrop): the exclusive lock, the snapshot, the Update state.

RFC 1939 8 lets a server lock the maildrop for the session; we do, with
flock(2) on a lock file inside the Maildir. The kernel drops an flock when the
process dies, so a crashed server never leaves a user locked out. The snapshot
taken under that lock comes from the maildrop's index (postroom.store.dropindex),
which only the lock holder writes.

Deletion is crash-safe because every step is one atomic directory operation:
a message is unlinked (gone whole) or not (there whole); a message that was
read moves from new/ to cur/ by rename(2), keeping its unique name and so its
UIDL (Maildir: the part of the name before ":" is the message's identity).
The folders are synced before the Update state's +OK (postroom.store.durable),
so what QUIT was told is done stays done after a power cut.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from postroom.store import dropindex, durable
from postroom.store.api import LATER, Later, MaildropBusy
from postroom.store.dropindex import CRLF, READ_CHUNK, file_sent_size, uid_for
from postroom.store.maildir import ensure_maildir

__all__ = ["Maildrop", "file_sent_size", "uid_for", "LOCK_NAME"]

LOCK_NAME = "postroom-pop3.lock"  # a dot-less name would be listed as mail by some readers
# Messages above this size are read in a worker thread, not on the event loop.
THREAD_READ_ABOVE = 1024 * 1024


@dataclass
class Maildrop:
    """One locked session's view of a Maildir: the snapshot as parallel sequences
    (postroom.store.dropindex.Listing, its names and UIDLs packed, read only),
    message N at index N - 1."""

    root: Path
    listing: dropindex.Listing = field(default_factory=dropindex.Listing)
    retrieved: bytearray = field(default_factory=bytearray)  # 1: RETR read it, cur/ at QUIT
    _lock_fd: int | None = None
    _ahead: tuple[int, list[bytes]] | None = None  # (number, bytes) read before asked
    _moved: dict[int, str] = field(default_factory=dict)  # number -> name found since

    @classmethod
    def open(cls, root: Path) -> Maildrop:
        """Lock the maildrop and take the snapshot (BLOCKING: run in a thread).

        Raises MaildropBusy when another session has it, OSError on storage faults.
        """
        ensure_maildir(root)
        fd = os.open(root / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise MaildropBusy(str(root)) from None
        except OSError:
            os.close(fd)
            raise
        drop = cls(root, _lock_fd=fd)
        try:
            drop.listing = dropindex.load(root)  # the index is written under the lock
        except OSError:
            drop.close()
            raise
        drop.retrieved = bytearray(len(drop.listing.names))
        return drop

    @property
    def sizes(self) -> Sequence[int]:
        return self.listing.sizes

    @property
    def uids(self) -> Sequence[str]:
        return self.listing.uids

    def crlf(self, number: int) -> bool:
        return bool(self.listing.flags[number - 1] & CRLF)

    def name(self, number: int) -> str:
        """Message `number`'s "new/NAME" or "cur/NAME" where its file was last seen."""
        return self._moved.get(number) or self.listing.names[number - 1]

    def path(self, number: int) -> Path:
        """Where message `number`'s file was last seen."""
        return self.root / self.name(number)

    def _locate(self, number: int) -> bool:
        """Find a message another Maildir reader renamed (new/ -> cur/, new flags) by
        its unique name; False when it is really gone. Updates where it was seen."""
        if self.path(number).exists():
            return True
        unique = self.name(number).partition("/")[2].partition(":")[0]
        for sub in ("cur", "new"):
            try:
                names = os.listdir(self.root / sub)
            except FileNotFoundError:
                continue
            for name in names:
                if name == unique or name.startswith(unique + ":"):
                    self._moved[number] = f"{sub}/{name}"
                    return True
        return False

    def read_now(self, number: int, *, seen: bool = True) -> list[bytes] | None | Later:
        """`read_chunks`, or LATER for a message too large to read on the event loop."""
        if self.listing.sizes[number - 1] > THREAD_READ_ABOVE:
            return LATER
        return self.read_chunks(number, seen=seen)

    async def read(self, number: int, *, seen: bool = True) -> list[bytes] | None:
        chunks = self.read_now(number, seen=seen)
        if chunks is LATER:
            return await asyncio.to_thread(self.read_chunks, number, seen=seen)
        return chunks

    def read_chunks(self, number: int, *, seen: bool = True) -> list[bytes] | None:
        """The message's bytes in pieces (BLOCKING for large files), or None if it is gone.

        `seen`: RETR files the message as read (cur/, flag S) at QUIT; TOP does not.
        """
        ahead = self._ahead
        if ahead is not None and ahead[0] == number:
            self._ahead = None
            chunks: list[bytes] | None = ahead[1]
        else:
            chunks = self._read(number, READ_CHUNK)
        if chunks is not None:
            self.retrieved[number - 1] |= seen
        return chunks

    def read_ahead(self, number: int, limit: int) -> None:
        """Read message `number` now when it has at most `limit` octets, so that the
        RETR that usually follows (clients download in order) is answered without
        waiting for the disk. A fault is left for that RETR to meet. BLOCKING."""
        if not 1 <= number <= len(self.retrieved) or self.listing.sizes[number - 1] > limit:
            return
        with contextlib.suppress(OSError):
            chunks = self._read(number, limit + 1)
            if chunks is not None:
                self._ahead = (number, chunks)

    def _read(self, number: int, chunk_size: int) -> list[bytes] | None:
        size = self.listing.sizes[number - 1]
        for _attempt in range(3):  # a rename may race with the open
            try:
                # Plain os calls: a buffered file object costs more syscalls and
                # more time than the read itself for a typical 4 KiB message.
                fd = os.open(self.path(number), os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                if not self._locate(number):
                    return None
                continue
            try:
                # The size from the name (S=) lets a small message come in one read:
                # asking for one octet more shows the end without a second read.
                asked = min(size + 1, chunk_size) if size else chunk_size
                first = os.read(fd, asked)
                chunks = [first] if first else []
                if len(first) == asked:  # not known to be the end yet: read on
                    while chunk := os.read(fd, chunk_size):
                        chunks.append(chunk)
            finally:
                os.close(fd)
            return chunks
        return None

    async def update(self, deleted: list[int]) -> int:
        """RFC 1939 6, the Update state, in a worker thread (`_apply`)."""
        return await asyncio.to_thread(self._apply, deleted)

    def _apply(self, deleted_numbers: list[int]) -> int:
        """Delete the marked messages, file the read ones in cur/ as seen, then sync
        the folders. Returns how many deletions failed (a deletion whose folder could
        not be synced counts: it may come back). BLOCKING."""
        failures = 0
        deleted = set(deleted_numbers)
        removed_from: dict[Path, int] = {}  # folder -> deletions made in it
        moved: set[Path] = set()
        for number in range(1, len(self.retrieved) + 1):
            if number in deleted:
                if not self._remove(number):
                    failures += 1
                    continue
                folder = self.path(number).parent
                removed_from[folder] = removed_from.get(folder, 0) + 1
            elif self.retrieved[number - 1] and self.name(number).startswith("new/"):
                path = self.path(number)
                target = self.root / "cur" / f"{path.name}:2,S"
                with contextlib.suppress(OSError):  # a failed move loses nothing
                    durable.OS.rename(path, target)
                    moved.update((path.parent, target.parent))
        failed = durable.sync_folders([*removed_from, *moved])
        return failures + sum(removed_from.get(folder, 0) for folder in failed)

    def _remove(self, number: int) -> bool:
        """Unlink the message wherever another reader moved it; True once it is gone."""
        for _attempt in range(3):  # another reader may rename it meanwhile
            try:
                durable.OS.unlink(self.path(number))
                return True
            except FileNotFoundError:
                if not self._locate(number):
                    return True  # already gone: what QUIT asked for is true
            except OSError:
                return False
        return False

    def close(self) -> None:
        """Release the lock (also released by the kernel if the process dies) and
        the snapshot."""
        self.listing = dropindex.Listing()
        self.retrieved = bytearray()
        self._ahead = None
        self._moved = {}
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
