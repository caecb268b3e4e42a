"""The Maildir POP3 maildrop (api.Maildrop): the exclusive lock, the snapshot, the Update state.

RFC 1939 8 lets a server lock the maildrop for the session; we do, with
flock(2) on a lock file inside the Maildir. The kernel drops an flock when the
process dies, so a crashed server never leaves a user locked out.

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
import functools
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from postroom.store import durable
from postroom.store.api import LATER, DropEntry, Later, MaildropBusy
from postroom.store.maildir import LineEnds, ensure_maildir, list_messages

LOCK_NAME = "postroom-pop3.lock"  # a dot-less name would be listed as mail by some readers
MAX_UID = 70  # RFC 1939 7: a unique-id is 1 to 70 characters in the range 0x21 to 0x7E
# Messages above this size are read in a worker thread, not on the event loop.
THREAD_READ_ABOVE = 1024 * 1024
READ_CHUNK = 256 * 1024  # octets asked of read(2) at a time


# Sizes as sent of files whose names do not carry them (no W=, as other MDAs
# name files), read once and kept: (unique name, size stored) -> (size as sent,
# no bare LF). Maildir files never change once delivered.
_sent_sizes: dict[tuple[str, int], tuple[int, bool]] = {}
SENT_SIZES_KEPT = 100_000


def _cached_sent_size(path: Path, unique: str, stored: int) -> tuple[int, bool]:
    key = (unique, stored)
    known = _sent_sizes.get(key)
    if known is None:
        if len(_sent_sizes) >= SENT_SIZES_KEPT:
            _sent_sizes.clear()
        known = _sent_sizes[key] = file_sent_size(path)
    return known


def file_sent_size(path: Path) -> tuple[int, bool]:
    """The octets RETR sends for the file before byte-stuffing (maildir.LineEnds),
    and whether the file has no bare CR or LF. BLOCKING: reads the whole file."""
    with open(path, "rb") as file:
        counter = LineEnds(iter(functools.partial(file.read, READ_CHUNK), b""))
    return counter.sent, counter.bare_lf == 0 and counter.bare_cr == 0


def uid_for(base_name: str) -> str:
    """The UIDL of a Maildir message: its base name when that fits RFC 1939 7, or a
    digest of it (long host names make long Maildir names)."""
    if len(base_name) <= MAX_UID and all(0x21 <= ord(c) <= 0x7E for c in base_name):
        return base_name
    return hashlib.sha256(base_name.encode("utf-8", "surrogateescape")).hexdigest()[:40]


@dataclass
class DropMessage(DropEntry):
    path: Path = field(kw_only=True)  # where the file was last seen
    retrieved: bool = False  # RETR read it: filed in cur/ as seen at QUIT

    @property
    def unique(self) -> str:
        """The Maildir unique name: the file name up to the ":" that starts the flags."""
        return self.path.name.split(":", 1)[0]


@dataclass
class Maildrop:
    """One locked session's view of a Maildir."""

    root: Path
    messages: list[DropMessage] = field(default_factory=list)
    _lock_fd: int | None = None
    _ahead: tuple[int, list[bytes]] | None = None  # (number, bytes) read before asked

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
            for entry in list_messages(root):
                size, crlf = entry.size, entry.crlf
                if not entry.exact:
                    try:
                        size, crlf = _cached_sent_size(entry.path, entry.uid_base_name, entry.size)
                    except FileNotFoundError:
                        continue  # gone while listing: not part of the snapshot
                drop.messages.append(
                    DropMessage(size, uid_for(entry.uid_base_name), crlf, path=entry.path))
        except OSError:
            drop.close()
            raise
        return drop

    def _locate(self, msg: DropMessage) -> bool:
        """Find a message another Maildir reader renamed (new/ -> cur/, new flags) by
        its unique name; False when it is really gone. Updates msg.path."""
        if msg.path.exists():
            return True
        for sub in ("cur", "new"):
            try:
                names = os.listdir(self.root / sub)
            except FileNotFoundError:
                continue
            for name in names:
                if name == msg.unique or name.startswith(msg.unique + ":"):
                    msg.path = self.root / sub / name
                    return True
        return False

    def read_now(self, number: int, *, seen: bool = True) -> list[bytes] | None | Later:
        """`read_chunks`, or LATER for a message too large to read on the event loop."""
        if self.messages[number - 1].size > THREAD_READ_ABOVE:
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
        msg = self.messages[number - 1]
        ahead = self._ahead
        if ahead is not None and ahead[0] == number:
            self._ahead = None
            chunks: list[bytes] | None = ahead[1]
        else:
            chunks = self._read(msg, READ_CHUNK)
        if chunks is not None:
            msg.retrieved = msg.retrieved or seen
        return chunks

    def read_ahead(self, number: int, limit: int) -> None:
        """Read message `number` now when it has at most `limit` octets, so that the
        RETR that usually follows (clients download in order) is answered without
        waiting for the disk. A fault is left for that RETR to meet. BLOCKING."""
        if not 1 <= number <= len(self.messages) or self.messages[number - 1].size > limit:
            return
        with contextlib.suppress(OSError):
            chunks = self._read(self.messages[number - 1], limit + 1)
            if chunks is not None:
                self._ahead = (number, chunks)

    def _read(self, msg: DropMessage, chunk_size: int) -> list[bytes] | None:
        for _attempt in range(3):  # a rename may race with the open
            try:
                # Plain os calls: a buffered file object costs more syscalls and
                # more time than the read itself for a typical 4 KiB message.
                fd = os.open(msg.path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                if not self._locate(msg):
                    return None
                continue
            try:
                # The size from the name (S=) lets a small message come in one read:
                # asking for one octet more shows the end without a second read.
                asked = min(msg.size + 1, chunk_size) if msg.size else chunk_size
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
        for number, msg in enumerate(self.messages, start=1):
            if number in deleted:
                if not self._remove(msg):
                    failures += 1
                    continue
                folder = msg.path.parent
                removed_from[folder] = removed_from.get(folder, 0) + 1
            elif msg.retrieved and msg.path.parent.name == "new":
                target = self.root / "cur" / f"{msg.path.name}:2,S"
                with contextlib.suppress(OSError):  # a failed move loses nothing
                    durable.OS.rename(msg.path, target)
                    moved.update((msg.path.parent, target.parent))
        failed = durable.sync_folders([*removed_from, *moved])
        return failures + sum(removed_from.get(folder, 0) for folder in failed)

    def _remove(self, msg: DropMessage) -> bool:
        """Unlink the message wherever another reader moved it; True once it is gone."""
        for _attempt in range(3):  # another reader may rename it meanwhile
            try:
                durable.OS.unlink(msg.path)
                return True
            except FileNotFoundError:
                if not self._locate(msg):
                    return True  # already gone: what QUIT asked for is true
            except OSError:
                return False
        return False

    def close(self) -> None:
        """Release the lock (also released by the kernel if the process dies)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
