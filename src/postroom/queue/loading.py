"""Loads the scheduler's schedule from the queue folder, in the background.

At start (and on an operator's rescan) every envelope is read, chunk by chunk
in the reading thread (postroom.queue.reading), and each chunk's entries join
the schedule as they come: the server takes mail and delivers what is due
meanwhile. To recover from a lost notification (a process killed between
queuing a message and naming it to the server) only the folder's names are
compared with the schedule, and only the new ones read.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from postroom.queue.reading import EnvelopeReader
from postroom.queue.schedule import ACTIVE, Entry, Schedule

log = logging.getLogger("postroom.queue")


async def load_schedule(reader: EnvelopeReader, schedule: Schedule, poke: Callable[[], None],
                        words: str, *, reread: bool = False) -> None:
    """Read the whole folder into `schedule`, calling `poke` after each chunk. At start
    an entry already there (woken meanwhile) is kept; on a rescan (`reread`) each
    entry not in flight is replaced, and those whose files are gone are dropped."""
    before = set(schedule.entries) if reread else set()
    seen: set[str] = set()

    def take(entries: list[tuple[str, Entry]]) -> None:
        for queue_id, entry in entries:
            if reread:  # only a rescan drops what it did not see
                seen.add(queue_id)
            current = schedule.entries.get(queue_id)
            if current is None or (reread and current.where != ACTIVE):
                schedule.put(queue_id, entry)
        poke()

    await reader.load(take)
    for queue_id in before - seen:
        schedule.remove(queue_id)
    log.info("queue: %s %d message(s)", words, len(schedule))


async def recover_schedule(reader: EnvelopeReader, schedule: Schedule,
                           poke: Callable[[], None]) -> None:
    """Read the messages whose names `schedule` lacks; drop the entries whose files are
    gone (both left by lost notifications)."""
    before = set(schedule.entries)
    try:
        names = await asyncio.to_thread(lambda: set(reader.store.scan_ids()))
    except OSError as e:
        log.error("queue: cannot read the queue folder: %s", e)
        return
    gone = before - names
    for queue_id in gone:
        schedule.remove(queue_id)
    new = names - set(schedule.entries)
    if new or gone:
        log.info("queue: %d message(s) found unannounced, %d gone", len(new), len(gone))
    if not new:
        return

    def take(entries: list[tuple[str, Entry]]) -> None:
        for queue_id, entry in entries:
            if queue_id not in schedule.entries:
                schedule.put(queue_id, entry)
        poke()

    await reader.load(take, iter(sorted(new)))
