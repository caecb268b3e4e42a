"""The Maildir backend of api.Mailboxes: DATA/mail/<domain>/<localpart>/ for each mailbox.

A message being received (`Spool`) stays in memory up to SPILL_AT, so that it
touches the disk only in the commit's worker thread (a file made on the event
loop can block it behind other sessions' syncs); a larger one goes to a spool file.
Every message is on disk before its 250 (RFC 5321 6.1): one thread takes every
message waiting when it wakes and files them together (postroom.store.commit),
then wakes each event loop once for all the answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from postroom.batch import BatchThread
from postroom.store.api import check_folder, mailbox_parts
from postroom.store.commit import Delivery, MessageWriter, commit
from postroom.store.maildrop import Maildrop

# A message is held in memory until it is this large, then goes to a spool file.
SPILL_AT = 512 * 1024
SPOOL = ".spool"  # under the mail dir: same filesystem as every maildir, so link(2) works
# A tmp/ or spool file this old is abandoned (the classic Maildir rule; Dovecot removes
# them after 36 hours too): a younger one may be a delivery still being written.
STALE_AFTER = 36 * 3600
MAILDIRS_KEPT = 10_000  # address -> maildir answers remembered


class MaildirMailboxes:
    """api.Mailboxes on the Maildirs under one mail folder (DATA/mail)."""

    def __init__(self, mail_dir: Path, hostname: str) -> None:
        self.mail_dir = Path(mail_dir)
        self.hostname = hostname  # in the names of filed messages
        self.spool_dir = self.mail_dir / SPOOL
        self._commits: BatchThread[Delivery, list[Path]] = BatchThread(
            "postroom-commit", self._commit_batch)
        # Address -> maildir, for the addresses that passed the checks: every
        # message asks again for the same few mailboxes.
        self._maildirs: dict[str, Path] = {}

    def maildir_for(self, address: str) -> Path:
        """The maildir of a canonical local mailbox address (no folders are made).

        ValueError for an address that is not canonical (the domain must be
        lower-case ASCII as `postroom.canonical` writes it) or whose local part
        could escape its folder: "/", "\\", NUL, "..", or a leading ".".
        """
        known = self._maildirs.get(address)
        if known is not None:
            return known
        local, domain = mailbox_parts(address)
        if not local or local.startswith(".") or any(c in local for c in "/\\\0"):
            raise ValueError(f"not usable as a mailbox folder name: {address!r}")
        if len(self._maildirs) >= MAILDIRS_KEPT:
            self._maildirs.clear()
        path = self._maildirs[address] = self.mail_dir / domain / local
        return path

    def receive(self, head: bytes = b"") -> Spool:
        return Spool(self, head)

    async def commit(self, delivery: Delivery) -> list[Path]:
        """File the message in each of its maildirs' new/ (one copy per distinct
        maildir), in the next batch; the copies, parallel to `delivery.maildirs`.
        OSError after removing whatever this message had filed."""
        return await self._commits.submit(delivery)

    def _commit_batch(self, batch: list[Delivery]) -> list[list[Path] | BaseException]:
        commit(batch, self.hostname)
        return [d.error if d.error is not None else d.paths() for d in batch]

    async def open_maildrop(self, address: str) -> Maildrop:
        maildir = self.maildir_for(address)
        return await asyncio.to_thread(Maildrop.open, maildir)

    async def sweep(self) -> int:
        return await asyncio.to_thread(self.clean)

    def close(self) -> None:
        self._commits.close()  # the batch in hand is finished

    def clean(self, older_than: float = STALE_AFTER) -> int:
        """Remove the files deliveries killed midway left, spool files and files in
        every mailbox's tmp/, once `older_than` seconds old (a Maildir may be shared
        with another delivery agent, Dovecot's LDA, whose younger files may still be
        in progress); how many. BLOCKING: one listing per domain, three per mailbox
        and two per folder."""
        cutoff = time.time() - older_than
        removed = _remove_stale(self.spool_dir, cutoff)
        for domain in _folders(self.mail_dir):  # ".spool" and other dot folders are skipped
            for mailbox in _folders(domain):
                removed += _remove_stale(mailbox / "tmp", cutoff)
                for folder in _folders(mailbox, dotted=True):  # Maildir++ folders
                    removed += _remove_stale(folder / "tmp", cutoff)
        return removed


def _folders(parent: Path, *, dotted: bool = False) -> list[Path]:
    """The folders in `parent` whose names do not start with "." (with `dotted`: only
    those that do), none if it is gone."""
    try:
        with os.scandir(parent) as entries:
            return [Path(e.path) for e in entries
                    if e.name.startswith(".") == dotted and e.name not in (".", "..")
                    and e.is_dir(follow_symlinks=False)]
    except (FileNotFoundError, NotADirectoryError):
        return []


def _remove_stale(folder: Path, cutoff: float) -> int:
    """Remove the files in `folder` last modified before `cutoff`; return how many."""
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return 0
    removed = 0
    for entry in entries:
        with contextlib.suppress(FileNotFoundError):
            if entry.is_file(follow_symlinks=False) and entry.stat().st_mtime < cutoff:
                os.unlink(entry.path)
                removed += 1
    return removed


class Spool:
    """api.Incoming for Maildirs: in memory while small, in a spool file past SPILL_AT.
    The filed copies start with `head`, which the relayed copy (`chunks`) lacks."""

    __slots__ = ("_store", "_head", "_chunks", "_writer", "_filed", "_first_end", "_late",
                 "size")

    def __init__(self, store: MaildirMailboxes, head: bytes = b"") -> None:
        self._store = store
        self._head = head
        self._chunks: list[bytes] = []
        self._writer: MessageWriter | None = None
        self._filed: list[Path] = []
        # Spilled: where the first piece ends in the spool file, and the header lines
        # inserted there since (written into the file just before it is filed).
        self._first_end = 0
        self._late = b""
        self.size = 0  # octets of the message, the head left out

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self._writer is not None:
            self._writer.write(data)
            return
        self._chunks.append(data)
        if self.size > SPILL_AT:
            self._spill()

    def _spill(self) -> None:
        writer = self._writer = MessageWriter(self._store.spool_dir, self._store.hostname)
        self._first_end = len(self._head) + (len(self._chunks[0]) if self._chunks else 0)
        writer.write(self._head)
        for chunk in self._chunks:
            writer.write(chunk)
        self._chunks.clear()

    def insert_head(self, data: bytes) -> bool:
        """Put header lines right after the first piece written (our Received header).
        In memory: at once. Spilled: `chunks` yields them in place, and `deliver`
        rewrites the spool file with them before filing it."""
        if self._writer is None:
            if not self._chunks:
                return False
            self._chunks.insert(1, data)
        else:
            self._late += data
        self.size += len(data)
        return True

    def chunks(self) -> Iterator[bytes]:
        if self._writer is None:
            yield from self._chunks
        elif not self._late:
            yield from self._writer.read_back(skip=len(self._head))
        else:
            yield from _spliced(self._writer.read_back(skip=len(self._head)),
                                self._first_end - len(self._head), self._late)

    def _rewrite(self) -> None:
        """BLOCKING: a new spool file with the late header lines in place (a copy, a
        piece at a time: a large message is never held whole)."""
        old = self._writer
        assert old is not None
        new = MessageWriter(self._store.spool_dir, self._store.hostname)
        try:
            for piece in _spliced(old.read_back(), self._first_end, self._late):
                new.write(piece)
            new.flush()
        except BaseException:
            new.abort()
            raise
        old.abort()
        self._writer, self._late = new, b""

    async def deliver(self, mailboxes: Sequence[str], folder: str | None = None) -> list[str]:
        if not mailboxes:
            return []
        maildirs = [self._store.maildir_for(box) for box in mailboxes]
        if folder is not None:
            # Maildir++: folder "Junk" of a mailbox is its subfolder ".Junk" (as Dovecot's
            # maildir layout and Courier name it); made with its maildirfolder marker.
            name = "." + check_folder(folder)
            maildirs = [maildir / name for maildir in maildirs]
        if self._writer is not None and self._late:
            await asyncio.to_thread(self._rewrite)
        writer = self._writer  # the spool file, or the pieces in memory, head first
        delivery = (writer.delivery(maildirs) if writer is not None
                    else Delivery(maildirs, chunks=[self._head, *self._chunks]))
        self._filed = await self._store.commit(delivery)
        return [path.name for path in self._filed]

    def original(self) -> bytes | Path:
        """The octets while in memory; else the first filed copy (the spool file is
        gone once filed)."""
        if self._writer is None:
            return b"".join([self._head, *self._chunks])
        return self._filed[0]

    def abort(self) -> None:
        self._chunks.clear()
        if self._writer is not None:
            self._writer.abort()


def _spliced(pieces: Iterator[bytes], at: int, extra: bytes) -> Iterator[bytes]:
    """`pieces`, with `extra` put in after the first `at` octets."""
    for piece in pieces:
        if 0 <= at < len(piece):
            yield piece[:at]
            yield extra
            yield piece[at:]
        else:
            yield piece
        at -= len(piece)
    if at == 0:
        yield extra
