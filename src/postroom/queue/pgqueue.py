"""The relay queue in PostgreSQL: envelopes with per-recipient state, messages in chunks, leases.

`PGQueueStore` is the queue store (postroom.queue.store.QueueStore's methods)
for nodes that share one database. Every message row carries an owner (the
node delivering it) and a lease: the owner's scheduler renews the leases of all
it holds every LEASE_SECONDS / 3, in one statement, from a thread of its own. A
message whose owner stopped renewing (a node that died) is free again when
its lease runs out, and the first node to look takes it (`FOR UPDATE SKIP
LOCKED`: two nodes never take the same row, and neither waits for the other).
The renewing thread also notices free messages and calls `on_free`, so a
node's scheduler takes over a dead node's queue within about a lease.

Only the owner writes an envelope, delivers or removes a message (checked in
the statement itself); a node that lost its lease (cut off from the database
for longer than LEASE_SECONDS) finds its writes refused with NotQueued, as for
a message removed behind its back, and the new owner carries on from the
last state written. So a message is delivered twice only when it was in
flight at the moment its owner was lost, as after a crash of one node.

The command line (owner None) sees and changes every message, and adds ones
any node may take. The envelope is the JSON of postroom.queue.envelope, one
row per message; the state of each recipient is in it.
"""

from __future__ import annotations

import builtins
import contextlib
import logging
import os
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import psycopg

from postroom.queue.content import Content
from postroom.queue.envelope import Envelope
from postroom.queue.store import CorruptEnvelope, NotQueued, QueueStore, check_queue_id
from postroom.store.pgconnect import StoreUnavailable, connect, faults

log = logging.getLogger("postroom.queue")

# A node that stops renewing loses its messages to the other nodes after this many
# seconds; it renews every third of it.
LEASE_SECONDS = 15.0
RENEW_EVERY = LEASE_SECONDS / 3
CHUNK = 256 * 1024  # octets per stored piece of a message
SCAN_BATCH = 1000  # queue IDs read per query by scan_ids

# Rows a node may take: nobody's, or whose owner's lease ran out.
_FREE = "(owner IS NULL OR lease < now())"


class PGQueueStore(QueueStore):
    """The queue in PostgreSQL at `url`, as node `owner` (None: the command line).
    `spool_dir` holds messages read back for delivery (unlinked files)."""

    def __init__(self, url: str, owner: str | None, spool_dir: Path) -> None:
        # Not QueueStore.__init__: there are no folders.
        self.url = url
        self.owner = owner
        self.spool_dir = Path(spool_dir)
        self.dir = self.messages = self.envelopes = self.spool_dir  # no queue files
        self.on_free: Callable[[], None] | None = None  # called from the renewing thread
        self._local = threading.local()
        self._renewer: threading.Thread | None = None
        self._stop = threading.Event()

    # -- connections -------------------------------------------------------------

    def _conn(self) -> psycopg.Connection:
        conn: psycopg.Connection | None = getattr(self._local, "conn", None)
        if conn is None or conn.closed or conn.broken:
            if conn is not None:
                with contextlib.suppress(psycopg.Error):
                    conn.close()
            conn = self._local.conn = connect(self.url, autocommit=True)
        return conn

    def close(self) -> None:
        self._stop.set()
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            with contextlib.suppress(psycopg.Error):
                conn.close()
            self._local.conn = None

    def _mine(self) -> str:
        """The condition that a row is this node's to change (anything, for the CLI)."""
        return "TRUE" if self.owner is None else "owner = %(owner)s"

    # -- adding --------------------------------------------------------------------

    def make_folders(self, *, again: bool = False) -> None:
        """Nothing to make: the schema is (postroom.store.pgschema)."""

    def add(self, envelope: Envelope, chunks: Iterable[bytes]) -> None:
        """Queue one message; when this returns, its transaction has committed."""
        error = self.add_many([(envelope, chunks)])[0]
        if error is not None:
            raise error

    def add_many(self, items: builtins.list[tuple[Envelope, Iterable[bytes]]]
                 ) -> builtins.list[BaseException | None]:
        """Queue several messages in one transaction (group commit); per item None, or
        the error that kept all of them out."""
        try:
            with faults(self.url):
                conn = self._conn()
                with conn.transaction():
                    for envelope, chunks in items:
                        self._insert(conn, envelope, chunks)
        except Exception as exc:  # noqa: BLE001 - reported per item, as QueueStore does
            return [exc] * len(items)
        return [None] * len(items)

    def _insert(self, conn: psycopg.Connection, envelope: Envelope,
                chunks: Iterable[bytes]) -> None:
        queue_id = check_queue_id(envelope.queue_id)
        conn.execute(b"INSERT INTO queue (id, envelope, size, owner, lease) VALUES "
                     b"(%s, '', 0, %s, now() + make_interval(secs => %s))",
                     (queue_id, self.owner, LEASE_SECONDS))
        seq = size = 0
        buffer = bytearray()
        for chunk in chunks:
            buffer += chunk
            while len(buffer) >= CHUNK:
                self._put(conn, queue_id, seq, bytes(buffer[:CHUNK]))
                del buffer[:CHUNK]
                seq, size = seq + 1, size + CHUNK
        if buffer:
            self._put(conn, queue_id, seq, bytes(buffer))
            size += len(buffer)
        # The envelope last: a caller may complete it while its chunks are read.
        conn.execute(b"UPDATE queue SET envelope = %s, size = %s WHERE id = %s",
                     (envelope.to_json().decode(), size, queue_id))

    @staticmethod
    def _put(conn: psycopg.Connection, queue_id: str, seq: int, data: bytes) -> None:
        conn.execute(b"INSERT INTO queue_chunks (id, seq, data) VALUES (%s, %s, %s)",
                     (queue_id, seq, data))

    # -- reading ---------------------------------------------------------------------

    def load(self, queue_id: str) -> Envelope:
        """The envelope, taken by this node if it is free; NotQueued when it is gone or
        another node's."""
        with faults(self.url):
            conn = self._conn()
            if self.owner is None:
                row = conn.execute(b"SELECT envelope FROM queue WHERE id = %s",
                                   (queue_id,)).fetchone()
            else:
                row = conn.execute(
                    f"UPDATE queue SET owner = %(owner)s, lease = now() + make_interval("
                    f"secs => %(lease)s) WHERE id = %(id)s AND (owner = %(owner)s OR {_FREE}) "
                    "RETURNING envelope".encode(),
                    {"owner": self.owner, "lease": LEASE_SECONDS, "id": queue_id}).fetchone()
        if row is None:
            raise NotQueued(queue_id)
        return _parse(queue_id, row[0])

    def ids(self) -> builtins.list[str]:
        with faults(self.url):
            return [r[0] for r in self._conn().execute(b"SELECT id FROM queue ORDER BY id")]

    def scan_ids(self) -> Iterator[str]:
        """The IDs of the node's messages, after taking every free one (the command line:
        all), in ID order, a batch at a time: the scheduler's load and recovery read
        these, `postroom queue list` too."""
        self._start_renewing()
        if self.owner is not None:
            with faults(self.url):
                self._take_free(self._conn())
        last = ""
        while True:
            with faults(self.url):
                rows = self._conn().execute(
                    f"SELECT id FROM queue WHERE id > %(last)s AND {self._mine()} "
                    "ORDER BY id LIMIT %(batch)s".encode(),
                    {"last": last, "owner": self.owner, "batch": SCAN_BATCH}).fetchall()
            yield from (row[0] for row in rows)
            if len(rows) < SCAN_BATCH:
                return
            last = rows[-1][0]

    def list(self) -> builtins.list[Envelope]:
        """The node's messages, after taking every free one; the command line: all."""
        self._start_renewing()
        with faults(self.url):
            conn = self._conn()
            if self.owner is not None:
                self._take_free(conn)
                rows = conn.execute(b"SELECT id, envelope FROM queue WHERE owner = %s",
                                    (self.owner,)).fetchall()
            else:
                rows = conn.execute(b"SELECT id, envelope FROM queue ORDER BY id").fetchall()
        result = []
        for queue_id, text in rows:
            try:
                result.append(_parse(queue_id, text))
            except CorruptEnvelope as exc:
                log.error("queue: %s", exc)
        return result

    def _take_free(self, conn: psycopg.Connection) -> int:
        cur = conn.execute(
            f"UPDATE queue SET owner = %(owner)s, lease = now() + make_interval("
            f"secs => %(lease)s) WHERE id IN (SELECT id FROM queue WHERE {_FREE} "
            "FOR UPDATE SKIP LOCKED)".encode(),
            {"owner": self.owner, "lease": LEASE_SECONDS})
        taken = max(cur.rowcount, 0)
        if taken:
            log.info("queue: took %d message(s) no live node held", taken)
        return taken

    def open_content(self, queue_id: str) -> Content:
        """The message copied to an unlinked spool file, a piece at a time."""
        self.spool_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        with faults(self.url):
            conn = self._conn()
            if conn.execute(b"SELECT 1 FROM queue WHERE id = %s", (queue_id,)).fetchone() is None:
                raise NotQueued(queue_id)
            fd, name = tempfile.mkstemp(dir=self.spool_dir, prefix="queue.")
            os.unlink(name)
            try:
                size = 0
                with conn.transaction(), conn.cursor(name="content") as cur:
                    cur.execute(b"SELECT data FROM queue_chunks WHERE id = %s ORDER BY seq",
                                (queue_id,))
                    while rows := cur.fetchmany(8):
                        for (data,) in rows:
                            view = memoryview(data)
                            size += len(view)
                            while view:
                                view = view[os.write(fd, view):]
            except BaseException:
                os.close(fd)
                raise
        return Content(fd, 0, size)

    # -- changing --------------------------------------------------------------------

    def update(self, queue_id: str, change: Callable[[Envelope], object]) -> Envelope:
        with faults(self.url):
            conn = self._conn()
            with conn.transaction():
                row = conn.execute(
                    f"SELECT envelope FROM queue WHERE id = %(id)s AND {self._mine()} "
                    "FOR UPDATE".encode(), {"id": queue_id, "owner": self.owner}).fetchone()
                if row is None:
                    raise NotQueued(queue_id)
                envelope = _parse(queue_id, row[0])
                change(envelope)
                conn.execute(b"UPDATE queue SET envelope = %s WHERE id = %s",
                             (envelope.to_json().decode(), queue_id))
        return envelope

    def update_many(
        self, changes: builtins.list[tuple[str, Callable[[Envelope], object]]]
    ) -> builtins.list[Envelope | BaseException]:
        """`update` for several messages in one transaction (one commit for all, as the
        folder queue shares one sync); per change, the envelope written or why not."""
        results: builtins.list[Envelope | BaseException] = []
        try:
            with faults(self.url):
                conn = self._conn()
                with conn.transaction():
                    for queue_id, change in changes:
                        row = conn.execute(
                            f"SELECT envelope FROM queue WHERE id = %(id)s AND {self._mine()} "
                            "FOR UPDATE".encode(), {"id": queue_id, "owner": self.owner},
                        ).fetchone()
                        if row is None:
                            results.append(NotQueued(queue_id))
                            continue
                        try:
                            envelope = _parse(queue_id, row[0])
                        except CorruptEnvelope as exc:
                            results.append(exc)
                            continue
                        change(envelope)
                        conn.execute(b"UPDATE queue SET envelope = %s WHERE id = %s",
                                     (envelope.to_json().decode(), queue_id))
                        results.append(envelope)
        except StoreUnavailable as exc:  # nothing was committed
            return [exc] * len(changes)
        return results

    def remove(self, queue_id: str) -> None:
        error = self.remove_many([queue_id])[0]
        if error is not None:
            raise error

    def remove_many(self, queue_ids: builtins.list[str], *, reuse: bool = False
                    ) -> builtins.list[BaseException | None]:
        try:
            with faults(self.url):
                rows = self._conn().execute(
                    f"DELETE FROM queue WHERE id = ANY(%(ids)s) AND {self._mine()} "
                    "RETURNING id".encode(),
                    {"ids": builtins.list(queue_ids), "owner": self.owner}).fetchall()
        except StoreUnavailable as exc:
            return [exc] * len(queue_ids)
        gone = {r[0] for r in rows}
        return [None if queue_id in gone else NotQueued(queue_id) for queue_id in queue_ids]

    def recover(self) -> int:
        """Nothing is left half-written: every add is one transaction."""
        return 0

    # -- leases ----------------------------------------------------------------------

    def _start_renewing(self) -> None:
        if self.owner is None or self._renewer is not None:
            return
        self._renewer = threading.Thread(target=self._renew, name="postroom-queue-lease",
                                         daemon=True)
        self._renewer.start()

    def _renew(self) -> None:
        """Every RENEW_EVERY seconds: push back this node's leases; call `on_free` when
        a message is free for the taking (its node died, or the command line added it)."""
        while not self._stop.wait(RENEW_EVERY):
            try:
                with faults(self.url):
                    conn = self._conn()
                    conn.execute(b"UPDATE queue SET lease = now() + make_interval(secs => %s) "
                                 b"WHERE owner = %s", (LEASE_SECONDS, self.owner))
                    free = conn.execute(
                        f"SELECT EXISTS (SELECT 1 FROM queue WHERE {_FREE})".encode()
                    ).fetchone()
            except OSError as exc:
                log.warning("queue: cannot renew the leases of this node's messages: %s", exc)
                continue
            if free and free[0] and self.on_free is not None:
                self.on_free()


def _parse(queue_id: str, text: str) -> Envelope:
    try:
        envelope = Envelope.from_json(text.encode())
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptEnvelope(f"{queue_id}: unreadable envelope: {exc}") from None
    if envelope.queue_id != queue_id:
        raise CorruptEnvelope(f"{queue_id}: holds the envelope of {envelope.queue_id!r}")
    return envelope
