"""The PostgreSQL backend of api.Mailboxes: messages in bytea chunks, filed by group commit.

A message being received (`PGIncoming`) stays in memory up to SPILL_AT and
goes to a spool file in the data folder past it, so a 50 MB message is never
held whole: it is copied into the database CHUNK octets at a time. Every
message is in a committed transaction before its 250 (RFC 5321 6.1): one task
takes every delivery waiting when it wakes and files them all in one
transaction (pipelined: one round trip for the batch, not one per statement),
then answers each. A copy shared by several mailboxes is stored once.

The POP3 side is postroom.store.pgmaildrop; its leases are renewed here, for
every session of the process in one statement.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import tempfile
import time
from collections.abc import Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
import psycopg_pool

from postroom.store.api import check_folder, mailbox_parts
from postroom.store.mailboxes import STALE_AFTER, _remove_stale
from postroom.store.maildir import LineEnds
from postroom.store.pgconnect import POOL_TIMEOUT, StoreUnavailable, conninfo, describe, faults

if TYPE_CHECKING:
    from postroom.store.pgmaildrop import PGMaildrop

log = logging.getLogger("postroom.store")

SPILL_AT = 512 * 1024  # octets held in memory before a message goes to a spool file
CHUNK = 256 * 1024  # octets per stored chunk of a spooled message (and per read)
POOL_SIZE = 10  # connections per server process: commits are batched, reads short
# A POP3 maildrop lock is a lease its node renews every LEASE_SECONDS / 3: when a
# node dies, its sessions' maildrops are free again within this many seconds
# (RFC 1939 8 leaves the lock's form to the server).
LEASE_SECONDS = 10.0
RENEW_EVERY = LEASE_SECONDS / 3


def check_mailbox(address: str) -> str:
    """`address` when it can name a mailbox (canonical, ASCII domain), else ValueError."""
    local, _domain = mailbox_parts(address)
    if not local or "\0" in local:
        raise ValueError(f"not usable as a mailbox name: {address!r}")
    return address


def new_uid() -> str:
    """A UIDL no other message gets (RFC 1939 7: 1 to 70 characters 0x21-0x7E)."""
    return f"{int(time.time())}.{secrets.token_hex(10)}"


@dataclass
class _Job:
    """One message's delivery in a batch."""

    mailboxes: list[str]
    parts: list[bytes]  # the message (head first) when in memory
    spool: Path | None  # else the spool file holding it
    stored: int  # octets
    sent: int  # octets as RETR sends them
    crlf: bool
    folder: str = ""  # the inbox
    uids: list[str] = field(default_factory=list)


class PGMailboxes:
    """api.Mailboxes in PostgreSQL. `spool_dir` holds messages past SPILL_AT while
    they are received; `node` names this host in lease holders."""

    def __init__(self, url: str, hostname: str, spool_dir: Path) -> None:
        self.url = url
        self.hostname = hostname
        self.spool_dir = Path(spool_dir)
        self._pool: psycopg_pool.AsyncConnectionPool | None = None
        self._pool_pid = 0
        self._waiting: list[tuple[_Job, asyncio.Future[list[str]]]] = []
        self._committer: asyncio.Task[None] | None = None
        self._closed = False
        self.leases: dict[str, str] = {}  # mailbox -> holder, this process's sessions
        self._keeper: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[object]] = set()
        self.node = f"{socket.gethostname()}:{os.getpid()}"

    # -- connections ---------------------------------------------------------

    async def pool(self) -> psycopg_pool.AsyncConnectionPool:
        """The process's pool, opened on first use (after any fork)."""
        if self._pool is None or self._pool_pid != os.getpid():
            self._pool_pid = os.getpid()
            self._pool = psycopg_pool.AsyncConnectionPool(
                conninfo(self.url), min_size=1, max_size=POOL_SIZE, open=False,
                kwargs={"autocommit": True}, timeout=POOL_TIMEOUT,
                name=f"postroom-{os.getpid()}")
            await self._pool.open(wait=False)
        return self._pool

    def spawn(self, work: Coroutine[Any, Any, object]) -> None:
        """Run a coroutine in the background, kept referenced until done."""
        task: asyncio.Task[object] = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def start(self) -> None:
        """Renew this process's POP3 leases until `stop` (on the running loop)."""
        if self._keeper is None:
            self._keeper = asyncio.get_running_loop().create_task(self._renew())

    async def stop(self) -> None:
        if self._keeper is not None:
            self._keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keeper
            self._keeper = None
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._committer is not None:
            with contextlib.suppress(Exception):
                await self._committer
        if self._pool is not None and self._pool_pid == os.getpid():
            await self._pool.close()
            self._pool = None

    async def _renew(self) -> None:
        """Every RENEW_EVERY seconds, push back the expiry of every lease held here."""
        while True:
            await asyncio.sleep(RENEW_EVERY)
            held = dict(self.leases)
            if not held:
                continue
            try:
                with faults(self.url):
                    pool = await self.pool()
                    async with pool.connection() as conn:
                        await conn.execute(
                            b"UPDATE maildrop_leases SET expires = now() + make_interval("
                            b"secs => %s) FROM unnest(%s::text[], %s::text[]) AS h(m, who) "
                            b"WHERE mailbox = h.m AND holder = h.who",
                            (LEASE_SECONDS, list(held), list(held.values())))
            except OSError as exc:
                log.warning("store: cannot renew %d POP3 maildrop lease(s): %s", len(held), exc)

    # -- receiving -------------------------------------------------------------

    def receive(self, head: bytes = b"") -> PGIncoming:
        return PGIncoming(self, head)

    async def commit(self, job: _Job) -> list[str]:
        """File `job` in the next batch; its UIDLs. StoreUnavailable when the batch's
        transaction did not commit (nothing of it is kept)."""
        if self._closed:
            raise StoreUnavailable("the store is closing")
        future: asyncio.Future[list[str]] = asyncio.get_running_loop().create_future()
        self._waiting.append((job, future))
        if self._committer is None or self._committer.done():
            self._committer = asyncio.get_running_loop().create_task(self._commit_batches())
        return await future

    async def _commit_batches(self) -> None:
        while self._waiting:
            batch, self._waiting = self._waiting, []
            try:
                await self._commit(batch)
            except Exception as exc:  # every waiting session gets the fault
                error = exc if isinstance(exc, OSError) else StoreUnavailable(str(exc))
                for _job, future in batch:
                    if not future.done():
                        future.set_exception(error)
                continue
            for job, future in batch:
                if not future.done():
                    future.set_result(job.uids)

    async def _commit(self, batch: list[tuple[_Job, asyncio.Future[list[str]]]]) -> None:
        with faults(self.url):
            pool = await self.pool()
            async with pool.connection() as conn:
                cur = await conn.execute(
                    b"SELECT nextval('contents_id_seq') FROM generate_series(1, %s)",
                    (len(batch),))
                ids = [row[0] for row in await cur.fetchall()]
                async with conn.transaction(), conn.pipeline():
                    for (job, _future), content in zip(batch, ids, strict=True):
                        await self._file(conn, job, content)

    async def _file(self, conn: psycopg.AsyncConnection, job: _Job, content: int) -> None:
        await conn.execute(b"INSERT INTO contents (id, size) VALUES (%s, %s)",
                           (content, job.stored))
        if job.spool is None:
            await conn.execute(b"INSERT INTO chunks (content, seq, data) VALUES (%s, 0, %s)",
                               (content, b"".join(job.parts)))
        else:
            with open(job.spool, "rb") as spool:
                seq = 0
                while data := await asyncio.to_thread(spool.read, CHUNK):
                    await conn.execute(
                        b"INSERT INTO chunks (content, seq, data) VALUES (%s, %s, %s)",
                        (content, seq, data))
                    seq += 1
        job.uids = [new_uid() for _ in job.mailboxes]
        async with conn.cursor() as cur:
            await cur.executemany(
                b"INSERT INTO messages (mailbox, uid, content, size, crlf, folder) "
                b"VALUES (%s, %s, %s, %s, %s, %s)",
                [(box, uid, content, job.sent, job.crlf, job.folder)
                 for box, uid in zip(job.mailboxes, job.uids, strict=True)])

    # -- POP3 ------------------------------------------------------------------

    async def open_maildrop(self, address: str) -> PGMaildrop:
        from postroom.store.pgmaildrop import PGMaildrop

        return await PGMaildrop.open(self, check_mailbox(address))

    async def sweep(self) -> int:
        """Remove contents no message refers to (a crash between two steps of an
        Update), leases long expired, and spool files deliveries killed midway left."""
        removed = await asyncio.to_thread(_remove_stale, self.spool_dir,
                                          time.time() - STALE_AFTER)
        with faults(self.url):
            pool = await self.pool()
            async with pool.connection() as conn:
                cur = await conn.execute(
                    b"DELETE FROM contents c WHERE NOT EXISTS "
                    b"(SELECT 1 FROM messages m WHERE m.content = c.id)")
                removed += max(cur.rowcount, 0)
                await conn.execute(b"DELETE FROM maildrop_leases WHERE expires < now()")
        return removed

    def close(self) -> None:
        self._closed = True

    def describe(self) -> str:
        return describe(self.url)


class PGIncoming:
    """api.Incoming for PostgreSQL: in memory while small, in a spool file past
    SPILL_AT. The filed copies start with `head`, which the relayed copy lacks."""

    __slots__ = ("_store", "_head", "_chunks", "_spool", "_file", "_ends", "size")

    def __init__(self, store: PGMailboxes, head: bytes = b"") -> None:
        self._store = store
        self._head = head
        self._chunks: list[bytes] = []
        self._spool: Path | None = None
        self._file: int | None = None
        self._ends: LineEnds | None = None  # counted as written once spooled
        self.size = 0

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self._file is not None:
            self._put(data)
            return
        self._chunks.append(data)
        if self.size > SPILL_AT:
            self._spill()

    def _put(self, data: bytes) -> None:
        assert self._file is not None and self._ends is not None
        view = memoryview(data)
        while view:
            view = view[os.write(self._file, view):]
        self._ends.feed(data)

    def _spill(self) -> None:
        self._store.spool_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=self._store.spool_dir, prefix="pg.")
        self._file, self._spool, self._ends = fd, Path(name), LineEnds()
        self._put(self._head)
        for chunk in self._chunks:
            self._put(chunk)
        self._chunks.clear()

    def insert_head(self, data: bytes) -> bool:
        if self._file is not None or not self._chunks:
            return False
        self._chunks.insert(1, data)
        self.size += len(data)
        return True

    def chunks(self) -> Iterator[bytes]:
        if self._spool is None:
            yield from self._chunks
            return
        with open(self._spool, "rb") as spool:
            spool.seek(len(self._head))
            while data := spool.read(CHUNK):
                yield data

    async def deliver(self, mailboxes: Sequence[str], folder: str | None = None) -> list[str]:
        if not mailboxes:
            return []
        folder = "" if folder is None else check_folder(folder)
        boxes = list(dict.fromkeys(check_mailbox(box) for box in mailboxes))
        if self._spool is None:
            parts = [self._head, *self._chunks]
            ends = LineEnds(parts)
            stored = len(self._head) + self.size
        else:
            assert self._ends is not None
            parts, ends, stored = [], self._ends, self._ends.size
        crlf = ends.bare_lf == 0 and ends.bare_cr == 0
        job = _Job(boxes, parts, self._spool, stored, ends.sent, crlf, folder)
        uids = dict(zip(boxes, await self._store.commit(job), strict=True))
        return [uids[box] for box in mailboxes]

    def original(self) -> bytes | Path:
        if self._spool is None:
            return b"".join([self._head, *self._chunks])
        return self._spool

    def abort(self) -> None:
        self._chunks.clear()
        if self._file is not None:
            with contextlib.suppress(OSError):
                os.close(self._file)
            self._file = None
        if self._spool is not None:
            with contextlib.suppress(OSError):
                self._spool.unlink()
            self._spool = None

