"""New queue files, written durably: one message (`add`) or a batch with one round of syncs.

A queue file is written as a temporary file in messages/ (a spare when there
is one, postroom.queue.spares), flocked while it is written so that `recover`
in another process leaves it alone, data-synced, then given its queue name,
and the folder is synced: only then is the message queued
(postroom.queue.store states the invariants).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from postroom.queue.envelope import Envelope
from postroom.queue.queuefile import envelope_line
from postroom.queue.spares import Taken, try_lock, unlink
from postroom.store import durable

if TYPE_CHECKING:
    from postroom.queue.store import QueueStore

TEMP_SUFFIX = ".tmp"
# What `add` copies from its spool at a time, and what `add_many` gathers into
# one write(2).
COPY_CHUNK = 64 * 1024


def add(store: QueueStore, envelope: Envelope, chunks: Iterable[bytes]) -> None:
    """Queue a message durably; when this returns, a crash cannot lose it.

    The envelope line is made after the last chunk was read, so a caller may
    still complete the envelope while its chunks are read (sendmail learns
    the body type from the last one): the message is spooled to an unnamed
    file first, then queued as `add_many` queues. The server queues with
    `add_many`. Raises FileExistsError if the queue ID is taken (IDs are
    unique, so that is a bug elsewhere, never a silent overwrite).
    """
    store.make_folders(again=True)  # not the hot path: a removed folder is made here
    with tempfile.TemporaryFile(dir=store.messages, prefix=".", suffix=TEMP_SUFFIX) as spool:
        for chunk in chunks:
            spool.write(chunk)
        spool.seek(0)
        error = add_many(store, [(envelope, iter(lambda: spool.read(COPY_CHUNK), b""))])[0]
    if error is not None:
        raise error


def add_many(
    store: QueueStore, items: list[tuple[Envelope, Iterable[bytes]]]
) -> list[BaseException | None]:
    """`add` for several messages with one round of syncs (group commit).

    Every queue file is written first, then all are synced (on a journaling
    filesystem the first sync commits the others' metadata too), then they
    get their names, and the folder is synced once for all of them. Returns,
    per item, None when it is queued or the exception that stopped it (the
    others are not affected).

    No queue lock: the files stay open, and flocked, until they have their
    names, which is all `recover` needs to leave them be, and server
    processes queue from several threads and processes at once, where each
    holder of the lock would make the others wait through its syncs.
    """
    store.make_folders()
    errors: list[BaseException | None] = [None] * len(items)
    written: dict[int, tuple[int, Path]] = {}  # item -> its open temporary file
    for i, (envelope, chunks) in enumerate(items):
        try:
            written[i] = _write_temp(store, envelope, chunks)
        except Exception as e:  # noqa: BLE001 - reported per item
            errors[i] = e
    try:
        try:
            for fd, temp in written.values():
                durable.OS.datasync(fd, temp)
        except OSError as e:
            _fail(errors, written, e)
        placed = []
        for i, (_fd, temp) in written.items():
            if errors[i] is None:
                try:
                    _place_new(store, temp, items[i][0].queue_id)
                    placed.append(i)
                except OSError as e:
                    errors[i] = e
        if placed:
            try:
                durable.sync_dir(store.messages)
            except OSError as e:
                _fail(errors, placed, e)
                for i in placed:
                    unlink(store.message_path(items[i][0].queue_id))
    finally:
        for fd, _temp in written.values():
            os.close(fd)
    for i, (_fd, temp) in written.items():
        if errors[i] is not None:
            unlink(temp)
    return errors


def _write_temp(store: QueueStore, envelope: Envelope, chunks: Iterable[bytes]) -> tuple[int, Path]:
    """One message's temporary queue file, written and still open (flocked); sets
    `envelope.size`."""
    store.message_path(envelope.queue_id)  # a QueueError for an unsafe ID, before any write
    taken = _temp_file(store)
    path = Path(taken.path)
    try:
        line = envelope_line(envelope)
        size = _write_gathered(taken.fd, path, line, chunks)
        taken.trim(len(line) + size)
    except BaseException:
        os.close(taken.fd)
        unlink(path)
        raise
    envelope.size = size
    return taken.fd, path


def _fail(errors: list[BaseException | None], items: Iterable[int], error: OSError) -> None:
    """Give `error` to each of `items` that has no error yet."""
    for i in items:
        if errors[i] is None:
            errors[i] = error


def _temp_file(store: QueueStore) -> Taken:
    """A temporary queue file in the messages folder, open for writing and flocked
    (so `recover` in another process leaves it alone): a spare when there is one.

    Write it from the start, then call `trim` with the octets written.
    """
    taken = store.spares.take(store.messages, TEMP_SUFFIX)
    if taken is not None:
        return taken
    try:
        fd, path = tempfile.mkstemp(dir=store.messages, prefix=".", suffix=TEMP_SUFFIX)
    except FileNotFoundError:  # the folder was removed under us: make it again
        store.make_folders(again=True)
        fd, path = tempfile.mkstemp(dir=store.messages, prefix=".", suffix=TEMP_SUFFIX)
    try_lock(fd)  # a file just made: nobody else holds it
    return Taken(fd, path, 0)


def _place_new(store: QueueStore, temp: Path, queue_id: str) -> None:
    """Give the temporary queue file `temp` its queue name, never over another.

    link(2) fails when the name exists, atomically: without the queue lock,
    two adds of one ID (two processes whose IDs collided) cannot both win,
    as a check followed by a rename could. Where hard links are missing,
    the check and the rename happen under the queue lock instead.
    """
    final = store.message_path(queue_id)
    if store.envelope_path(queue_id).exists():
        raise FileExistsError(f"queue ID {queue_id} is already in use")
    try:
        durable.OS.link(temp, final)
    except FileExistsError:
        raise FileExistsError(f"queue ID {queue_id} is already in use") from None
    except OSError as e:
        if e.errno not in durable.LINK_FALLBACK_ERRNOS:
            raise
        with store.locked():
            if final.exists():
                raise FileExistsError(f"queue ID {queue_id} is already in use") from None
            durable.OS.rename(temp, final)
        return
    unlink(temp)


def _write_gathered(fd: int, path: Path, line: bytes, chunks: Iterable[bytes]) -> int:
    """Write the envelope line and the message's chunks, gathered into writes of
    about COPY_CHUNK octets; returns the message's octets."""
    size = 0
    pending, pending_size = [line], len(line)
    for chunk in chunks:
        pending.append(chunk)
        pending_size += len(chunk)
        size += len(chunk)
        if pending_size >= COPY_CHUNK:
            durable.OS.write(fd, path, pending)
            pending, pending_size = [], 0
    if pending:
        durable.OS.write(fd, path, pending)
    return size
