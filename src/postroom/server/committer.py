"""Group commit: one thread files the messages the SMTP sessions received, in batches.

Every message must be on disk before its 250 (RFC 5321 6.1). Filing each one
alone costs two journal commits (its file, then its new/ folder) and a hand-off
of the interpreter lock between the event loop and a thread. Here a single
thread takes every message waiting when it wakes and files them all with
postroom.store.commit, whatever their size: one data sync per message, one
sync per new/ folder for the whole batch, then one wake-up of each event loop
for all the answers. Under load the batch grows by itself; idle, a batch is one
message and costs what filing it alone would.
"""

from __future__ import annotations

from pathlib import Path

from postroom.batch import BatchThread
from postroom.store.commit import Delivery, commit


class GroupCommitter:
    """Files messages into Maildirs, durably, in batches."""

    def __init__(self, hostname: str) -> None:
        self._hostname = hostname
        self._thread: BatchThread[Delivery, list[Path]] = BatchThread(
            "postroom-commit", self._run_batch
        )

    async def deliver(self, delivery: Delivery) -> list[Path]:
        """File the message in each of its maildirs' new/ (one copy per distinct
        maildir); return the final paths, parallel to `delivery.maildirs`. Raises
        OSError on failure, after removing whatever this message had filed."""
        return await self._thread.submit(delivery)

    def close(self) -> None:
        """Let the thread finish the batch in hand and end."""
        self._thread.close()

    def _run_batch(self, batch: list[Delivery]) -> list[list[Path] | BaseException]:
        commit(batch, self._hostname)
        return [d.error if d.error is not None else d.paths() for d in batch]
