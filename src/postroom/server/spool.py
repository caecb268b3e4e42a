"""The message being received: held in memory while small, spilled to a spool file when large.

Small messages then touch the disk only inside the commit, which runs in a
worker thread; large ones never sit whole in memory.

The copy filed into Maildirs starts with a `head` the relayed copy lacks: the
Return-Path field a final-delivery host writes (RFC 5321 4.4), which a host
that passes the message on must not add.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from postroom.store.commit import Delivery, MessageWriter, commit_one
from postroom.store.maildir import MailStore

# A message is held in memory until it is this large, then goes to a spool file.
# Small messages thus touch the disk only inside the commit, in a worker thread:
# creating a file on the event loop can block it for milliseconds while the
# filesystem journal commits other sessions' fsyncs.
SPILL_AT = 512 * 1024


class Spool:
    """The message being received: in memory while small, in a spool file past SPILL_AT."""

    __slots__ = ("_store", "_head", "_chunks", "_writer", "size")

    def __init__(self, store: MailStore, head: bytes = b"") -> None:
        self._store = store
        self._head = head  # filed in front of the message, not relayed
        self._chunks: list[bytes] = []
        self._writer: MessageWriter | None = None
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
        writer = self._writer = MessageWriter(self._store)
        writer.write(self._head)
        for chunk in self._chunks:
            writer.write(chunk)
        self._chunks.clear()

    def delivery(self, maildirs: list[Path]) -> Delivery:
        """The copy to file, head first, as a delivery for postroom.store.commit (the
        group commit): its pieces while in memory, else its spool file."""
        if self._writer is not None:
            return self._writer.delivery(maildirs)
        return Delivery(list(maildirs), chunks=[self._head, *self._chunks])

    def commit(self, maildirs: list[Path]) -> list[Path]:
        """Store in every maildir, head first, durably, as a batch of one (BLOCKING:
        run in a worker thread)."""
        if self._writer is not None:
            return self._writer.commit(maildirs)
        return commit_one(self.delivery(maildirs), self._store.hostname)

    @property
    def in_memory(self) -> list[bytes] | None:
        """The pieces of the copy to file, head first, while the message has not been
        spilled to a file; else None."""
        return [self._head, *self._chunks] if self._writer is None else None

    def chunks(self) -> Iterator[bytes]:
        """The message so far without the head, in pieces: the copy to relay
        (BLOCKING when spilled: it reads the file)."""
        if self._writer is None:
            yield from self._chunks
        else:
            yield from self._writer.read_back(skip=len(self._head))

    def insert_head(self, data: bytes) -> bool:
        """Put header lines right after the first piece written (our Received header).

        Possible only while the message is still in memory; False otherwise.
        """
        if self._writer is not None or not self._chunks:
            return False
        self._chunks.insert(1, data)
        self.size += len(data)
        return True

    def abort(self) -> None:
        self._chunks.clear()
        if self._writer is not None:
            self._writer.abort()
