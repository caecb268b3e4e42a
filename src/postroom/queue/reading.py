"""The scheduler's copy of the queue's envelopes, kept in step with the queue folder.

All of them are read at start and at each rescan (the command line and
`postroom sendmail` change the folder behind the server's back), new ones as
they are woken, and each again just before its attempt, unless it was read a
moment ago. Envelopes whose attempt is in flight keep their in-memory state:
the attempt writes it.

A few envelopes (READ_IN_LOOP) are read right in the event loop: each is the
first line of a small file, usually just written by another server process
and still in the page cache (Postfix's queue manager reads its queue files in
its event loop too). A burst and the reads before a retry go to the reading
thread, so the loop never stalls on many files at once.
"""

from __future__ import annotations

import asyncio
import logging

from postroom.batch import BatchThread
from postroom.queue.envelope import Envelope
from postroom.queue.store import NotQueued, QueueError, QueueStore

log = logging.getLogger("postroom.queue")

# At most this many envelopes are read in the event loop at once; more go to the
# reading thread.
READ_IN_LOOP = 8


class EnvelopeReader:
    """`envelopes` by queue ID, read from `store`; `in_flight` names those the
    scheduler is delivering (kept as they are in memory)."""

    def __init__(self, store: QueueStore) -> None:
        self.store = store
        self.envelopes: dict[str, Envelope] = {}
        self.in_flight: set[str] = set()
        self._fresh: set[str] = set()  # just read: the attempt need not read them again
        self._reader: BatchThread[list[str], list[Envelope | Exception]] = BatchThread(
            "postroom-queue-read", lambda jobs: [self._read_envelopes(ids) for ids in jobs]
        )

    def close(self) -> None:
        self._reader.close()

    def take(self, envelope: Envelope) -> None:
        """An envelope this process has just written: taken as it is, not read back."""
        self.envelopes[envelope.queue_id] = envelope
        self._fresh.add(envelope.queue_id)

    async def load_all(self) -> None:
        """Adopt the folder's envelopes; those in flight keep their in-memory state."""
        try:
            on_disk = await asyncio.to_thread(self.store.list)
        except OSError as e:
            log.error("queue: cannot read the queue folder: %s", e)
            return
        seen = set()
        for envelope in on_disk:
            seen.add(envelope.queue_id)
            if envelope.queue_id not in self.in_flight:
                self.envelopes[envelope.queue_id] = envelope
        for queue_id in list(self.envelopes):
            if queue_id not in seen and queue_id not in self.in_flight:
                del self.envelopes[queue_id]

    async def load_ids(self, ids: set[str]) -> None:
        """Read the envelopes of messages just queued (or flushed), all in one go, and
        make them due now."""
        wanted = [queue_id for queue_id in ids if queue_id not in self.in_flight]
        if not wanted:
            return
        if len(wanted) <= READ_IN_LOOP:
            read = self._read_envelopes(wanted)
        else:
            read = await self._reader.submit(wanted)
        for queue_id, result in zip(wanted, read, strict=True):
            envelope = self._adopt(queue_id, result)
            if envelope is not None:
                envelope.next_attempt = 0.0
                self._fresh.add(queue_id)

    async def for_attempt(self, queue_id: str) -> Envelope | None:
        """The envelope as it is now on disk (the command line may have changed it),
        read in the reading thread unless it was read a moment ago; None if gone."""
        if queue_id in self._fresh:
            self._fresh.discard(queue_id)
            return self.envelopes.get(queue_id)
        read = await self._reader.submit([queue_id])
        return self._adopt(queue_id, read[0])

    def _read_envelopes(self, queue_ids: list[str]) -> list[Envelope | Exception]:
        """BLOCKING: each envelope, or why it could not be read."""
        read: list[Envelope | Exception] = []
        for queue_id in queue_ids:
            try:
                read.append(self.store.load(queue_id))
            except (QueueError, OSError) as e:  # NotQueued is a QueueError
                read.append(e)
        return read

    def _adopt(self, queue_id: str, read: Envelope | Exception) -> Envelope | None:
        """Take a freshly read envelope as the scheduler's copy; None if it is gone."""
        if isinstance(read, NotQueued):
            if self.envelopes.pop(queue_id, None) is not None:
                log.info("%s: removed from the queue by someone else", queue_id)
            return None
        if isinstance(read, Exception):
            # Forget it until a rescan finds it readable again (never spin on it).
            log.error("%s: cannot read its envelope: %s", queue_id, read)
            self.envelopes.pop(queue_id, None)
            return None
        self.envelopes[queue_id] = read
        return read
