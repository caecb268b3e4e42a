"""Reads envelopes for the scheduler: those just woken, one before each attempt, and the
whole folder in the background when the schedule is loaded.

The scheduler keeps no envelope in memory (postroom.queue.schedule keeps a
small entry per message): it reads a message's envelope when its attempt
starts, in the reading thread, since a message that waited for its retry may
be long out of the page cache. A message just woken (queued by another
process, or flushed) is read at once, to learn its destination; that copy is
kept for its attempt (`fresh`), up to FRESH_LIMIT of them, so a new message
is read once.

A few envelopes (READ_IN_LOOP) are read right in the event loop: each is the
first line of a small file, usually just written by another server process
and still in the page cache (Postfix's queue manager reads its queue files in
its event loop too). A burst and the reads before a retry go to the reading
thread, so the loop never stalls on many files at once.

Loading (`load`) reads the folder in chunks of LOAD_CHUNK envelopes in a
thread and hands each chunk's entries to the loop as it comes: the schedule
fills while the server already takes mail and delivers what is due.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator

from postroom.batch import BatchThread
from postroom.queue.envelope import Envelope
from postroom.queue.schedule import Entry, destination_of
from postroom.queue.store import NotQueued, QueueError, QueueStore

log = logging.getLogger("postroom.queue")

# At most this many envelopes are read in the event loop at once; more go to the
# reading thread.
READ_IN_LOOP = 8
# Envelopes read ahead for the attempts to come (woken messages); past this many a
# woken message is read again when its attempt starts, so memory stays bounded
# when a destination is down and woken mail piles up.
FRESH_LIMIT = 1000
# Envelopes read per trip to the loading thread: large enough that the hand-offs
# cost little, small enough that the loop takes each chunk in a few milliseconds.
LOAD_CHUNK = 2000


def entry_of(envelope: Envelope) -> Entry:
    """The schedule's entry for an envelope."""
    pending = [r.address for r in envelope.recipients if not r.final]
    return Entry(envelope.next_attempt, envelope.created, destination_of(pending),
                 envelope.held, tried=any(r.attempts for r in envelope.recipients))


class EnvelopeReader:
    """Reads envelopes from `store`; keeps `fresh` copies of woken ones for their attempts."""

    def __init__(self, store: QueueStore) -> None:
        self.store = store
        self.fresh: dict[str, Envelope] = {}
        self.reads = 0  # envelopes read from disk (for tests that count the work)
        self._reader: BatchThread[list[str], list[Envelope | Exception]] = BatchThread(
            "postroom-queue-read", lambda jobs: [self._read_envelopes(ids) for ids in jobs]
        )

    def close(self) -> None:
        self._reader.close()

    def keep(self, envelope: Envelope) -> None:
        """An envelope this process has just written or read, for its coming attempt."""
        if len(self.fresh) < FRESH_LIMIT:
            self.fresh[envelope.queue_id] = envelope

    async def read_woken(self, ids: list[str]) -> list[tuple[str, Envelope | None]]:
        """Read the envelopes of messages just queued (or flushed), all in one go; None
        for one that is gone or unreadable (logged)."""
        if len(ids) <= READ_IN_LOOP:
            read = self._read_envelopes(ids)
        else:
            read = await self._reader.submit(ids)
        result = []
        for queue_id, envelope in zip(ids, read, strict=True):
            kept = self._checked(queue_id, envelope)
            if kept is not None:
                self.keep(kept)
            result.append((queue_id, kept))
        return result

    async def for_attempt(self, queue_id: str) -> Envelope | None:
        """The envelope as it is now on disk (the command line may have changed it),
        read in the reading thread unless it was read a moment ago; None if gone."""
        envelope = self.fresh.pop(queue_id, None)
        if envelope is not None:
            return envelope
        read = await self._reader.submit([queue_id])
        return self._checked(queue_id, read[0])

    def _read_envelopes(self, queue_ids: list[str]) -> list[Envelope | Exception]:
        """BLOCKING: each envelope, or why it could not be read."""
        read: list[Envelope | Exception] = []
        for queue_id in queue_ids:
            self.reads += 1
            try:
                read.append(self.store.load(queue_id))
            except (QueueError, OSError) as e:  # NotQueued is a QueueError
                read.append(e)
        return read

    @staticmethod
    def _checked(queue_id: str, read: Envelope | Exception) -> Envelope | None:
        if isinstance(read, NotQueued):
            return None
        if isinstance(read, Exception):
            # Forget it until a rescan finds it readable again (never spin on it).
            log.error("%s: cannot read its envelope: %s", queue_id, read)
            return None
        return read

    async def load(self, take: Callable[[list[tuple[str, Entry]]], None],
                   ids: Iterator[str] | None = None) -> None:
        """Read every envelope of the folder (or of `ids`) in the loading thread, chunk
        by chunk, and give each chunk's entries to `take` in the loop. Unreadable
        ones are skipped and logged (once) by the store."""
        names = self.store.scan_ids() if ids is None else ids

        def chunk() -> tuple[list[tuple[str, Entry]], bool]:
            """BLOCKING: up to LOAD_CHUNK entries, and whether the names are exhausted."""
            entries = []
            for count, queue_id in enumerate(names, 1):
                self.reads += 1
                envelope = self.store.try_load(queue_id)
                if envelope is not None:
                    entries.append((queue_id, entry_of(envelope)))
                if count >= LOAD_CHUNK:
                    return entries, False
            return entries, True

        try:
            done = False
            while not done:
                entries, done = await asyncio.to_thread(chunk)
                if entries:
                    take(entries)
        except OSError as e:
            log.error("queue: cannot read the queue folder: %s", e)
        finally:
            close = getattr(names, "close", None)
            if close is not None:
                close()
