"""The message being received: held in memory while small, spilled to a spool file when large.

Small messages then touch the disk only inside the commit, which runs in a
worker thread; large ones never sit whole in memory.
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

    __slots__ = ("_store", "_chunks", "_writer", "size")

    def __init__(self, store: MailStore) -> None:
        self._store = store
        self._chunks: list[bytes] = []
        self._writer: MessageWriter | None = None
        self.size = 0

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
        for chunk in self._chunks:
            writer.write(chunk)
        self._chunks.clear()

    def delivery(self, maildirs: list[Path]) -> Delivery:
        """The message as a delivery for postroom.store.commit (the group commit):
        its pieces while in memory, else its spool file."""
        if self._writer is not None:
            return self._writer.delivery(maildirs)
        return Delivery(list(maildirs), chunks=self._chunks)

    def commit(self, maildirs: list[Path]) -> list[Path]:
        """Store in every maildir, durably, as a batch of one (BLOCKING: run in a
        worker thread)."""
        if self._writer is not None:
            return self._writer.commit(maildirs)
        return commit_one(self.delivery(maildirs), self._store.hostname)

    def chunks(self) -> Iterator[bytes]:
        """The message so far, in pieces (BLOCKING when spilled: it reads the file)."""
        if self._writer is None:
            yield from self._chunks
        else:
            yield from self._writer.read_back()

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
