"""The PostgreSQL POP3 maildrop (api.Maildrop): a lease as the lock, a snapshot, the Update state.

RFC 1939 8 lets a server lock the maildrop for the session. Across nodes the
lock is a row in maildrop_leases that its process renews (pgmailboxes renews
all of a process's leases in one statement every RENEW_EVERY seconds), so no
connection is held per session, idle or not, and the maildrops of a node that
dies are free again within LEASE_SECONDS. Taking a lease succeeds only where
none is held or the one held has expired.

The Update state runs in one transaction that first checks the lease is still
this session's (a session whose node lost contact with the database for longer
than the lease deletes nothing), then deletes the marked messages, marks the
retrieved ones seen, and removes contents no message refers to any more.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from array import array
from collections.abc import Sequence
from typing import TYPE_CHECKING

from postroom.store.api import LATER, Later, MaildropBusy
from postroom.store.pgconnect import StoreUnavailable, faults
from postroom.store.pgmailboxes import LEASE_SECONDS

# A client that downloads in order gets the messages after the one it asked for
# in the same query: up to this many, and this many octets, held per session.
AHEAD_MESSAGES = 64
AHEAD_OCTETS = 1024 * 1024

if TYPE_CHECKING:
    from postroom.store.pgmailboxes import PGMailboxes


class PGMaildrop:
    """One locked session's snapshot: message N at index N - 1 of each sequence."""

    def __init__(self, store: PGMailboxes, mailbox: str, holder: str) -> None:
        self._store = store
        self.mailbox = mailbox
        self.holder = holder
        self.ids: array[int] = array("q")
        self.contents: array[int] = array("q")
        self._sizes: array[int] = array("q")
        self._uids: list[str] = []
        self._crlf = bytearray()
        self.retrieved = bytearray()  # 1: RETR read it, marked seen at QUIT
        self._cache: dict[int, list[bytes] | None] = {}  # fetched ahead, by number
        self._window: set[int] = set()  # the numbers of the window held or on its way
        self._pending: asyncio.Task[None] | None = None  # the window on its way
        self._open = True

    @classmethod
    async def open(cls, store: PGMailboxes, mailbox: str) -> PGMaildrop:
        """Take the lease and the snapshot; MaildropBusy while another session holds
        an unexpired lease, OSError when the database cannot be reached."""
        drop = cls(store, mailbox, f"{store.node}:{secrets.token_hex(6)}")
        with faults(store.url):
            pool = await store.pool()
            async with pool.connection() as conn:
                cur = await conn.execute(
                    b"INSERT INTO maildrop_leases (mailbox, holder, expires) "
                    b"VALUES (%s, %s, now() + make_interval(secs => %s)) "
                    b"ON CONFLICT (mailbox) DO UPDATE SET holder = EXCLUDED.holder, "
                    b"expires = EXCLUDED.expires WHERE maildrop_leases.expires < now() "
                    b"RETURNING holder", (mailbox, drop.holder, LEASE_SECONDS))
                if await cur.fetchone() is None:
                    raise MaildropBusy(mailbox)
                store.leases[mailbox] = drop.holder
                try:
                    cur = await conn.execute(
                        b"SELECT id, content, size, uid, crlf FROM messages "
                        b"WHERE mailbox = %s AND folder = '' ORDER BY id", (mailbox,))
                    async for row in cur:
                        drop.ids.append(row[0])
                        drop.contents.append(row[1])
                        drop._sizes.append(row[2])
                        drop._uids.append(row[3])
                        drop._crlf.append(row[4])
                except BaseException:
                    drop.close()
                    raise
        drop.retrieved = bytearray(len(drop.ids))
        return drop

    @property
    def sizes(self) -> Sequence[int]:
        return self._sizes

    @property
    def uids(self) -> Sequence[str]:
        return self._uids

    def crlf(self, number: int) -> bool:
        return bool(self._crlf[number - 1])

    def read_now(self, number: int, *, seen: bool = True) -> list[bytes] | None | Later:
        """The message if an earlier read fetched it along (clients download in
        order); else LATER."""
        if number not in self._cache:
            return LATER
        chunks = self._cache.pop(number)
        if chunks is not None:
            self.retrieved[number - 1] |= seen
        return chunks

    async def read(self, number: int, *, seen: bool = True) -> list[bytes] | None:
        """The message (None when removed meanwhile); the ones after it that fit in
        AHEAD_OCTETS come in the same query and wait for `read_now`."""
        pending = self._pending
        if number not in self._cache and pending is not None and number in self._window:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                await asyncio.shield(pending)
        if number in self._cache:
            chunks = self._cache.pop(number)
        else:
            window = self._window_from(number, AHEAD_OCTETS)
            fetched = await self._fetch(window)
            chunks = fetched.pop(number)
            self._keep(window, fetched)
        if chunks is not None:
            self.retrieved[number - 1] |= seen
        return chunks

    def _window_from(self, number: int, limit: int) -> list[int]:
        """`number` and the messages after it, while they fit in AHEAD_MESSAGES and
        AHEAD_OCTETS and none is larger than `limit`."""
        window, total = [number], self._sizes[number - 1]
        for n in range(number + 1, min(len(self.ids), number + AHEAD_MESSAGES - 1) + 1):
            size = self._sizes[n - 1]
            if size > limit or total + size > AHEAD_OCTETS:
                break
            window.append(n)
            total += size
        return window

    def _keep(self, window: list[int], fetched: dict[int, list[bytes] | None]) -> None:
        """Hold one window ahead of the client, no more."""
        self._cache = fetched
        self._window = set(window)

    async def _fetch(self, numbers: list[int]) -> dict[int, list[bytes] | None]:
        """The messages' chunks in one query, each in order; None for one removed."""
        by_content: dict[int, list[int]] = {}
        for n in numbers:
            by_content.setdefault(self.contents[n - 1], []).append(n)
        found: dict[int, list[bytes]] = {}
        with faults(self._store.url):
            pool = await self._store.pool()
            async with pool.connection() as conn:
                cur = await conn.execute(
                    b"SELECT content, data FROM chunks WHERE content = ANY(%s) "
                    b"ORDER BY content, seq", (list(by_content),))
                async for content, data in cur:
                    found.setdefault(content, []).append(bytes(data))
        result: dict[int, list[bytes] | None] = {}
        for content, wanted in by_content.items():
            for n in wanted:
                result[n] = found.get(content)
        return result

    def read_ahead(self, number: int, limit: int) -> None:
        """Fetch the next window from `number` in the background when the one held
        does not have it (none of its messages larger than `limit`)."""
        if (not 1 <= number <= len(self.ids) or number in self._cache
                or number in self._window or self._sizes[number - 1] > limit):
            return
        window = self._window_from(number, limit)
        self._window = set(window)
        self._cache = {}

        async def fetch() -> None:
            fetched = await self._fetch(window)
            if self._window == set(window):
                self._cache = fetched

        task = asyncio.get_running_loop().create_task(fetch())
        task.add_done_callback(_quiet)
        self._pending = task

    async def update(self, deleted: list[int]) -> int:
        """RFC 1939 6 in one transaction; StoreUnavailable (nothing changed) when the
        lease is no longer this session's or the database fails."""
        gone = sorted({self.ids[n - 1] for n in deleted})
        contents = sorted({self.contents[n - 1] for n in deleted})
        deleted_set = set(deleted)
        seen = [self.ids[i] for i, flag in enumerate(self.retrieved)
                if flag and i + 1 not in deleted_set]
        with faults(self._store.url):
            pool = await self._store.pool()
            async with pool.connection() as conn, conn.transaction():
                cur = await conn.execute(
                    b"SELECT holder FROM maildrop_leases WHERE mailbox = %s FOR UPDATE",
                    (self.mailbox,))
                row = await cur.fetchone()
                if row is None or row[0] != self.holder:
                    raise StoreUnavailable(
                        f"the POP3 lock of {self.mailbox} expired and was taken: "
                        "nothing deleted")
                if gone:
                    # Locked in id order first: two sessions deleting copies of one
                    # message take turns, and the second sees the first's deletion.
                    await conn.execute(
                        b"SELECT id FROM contents WHERE id = ANY(%s) ORDER BY id FOR UPDATE",
                        (contents,))
                    await conn.execute(b"DELETE FROM messages WHERE id = ANY(%s)", (gone,))
                    await conn.execute(
                        b"DELETE FROM contents c WHERE c.id = ANY(%s) AND NOT EXISTS "
                        b"(SELECT 1 FROM messages m WHERE m.content = c.id)", (contents,))
                if seen:
                    await conn.execute(
                        b"UPDATE messages SET seen = true WHERE id = ANY(%s)", (seen,))
        return 0

    def close(self) -> None:
        """Give the lease back (in the background; it expires anyway) and the snapshot."""
        if not self._open:
            return
        self._open = False
        store = self._store
        if store.leases.get(self.mailbox) == self.holder:
            del store.leases[self.mailbox]
        if self._pending is not None:
            self._pending.cancel()
        self._cache, self._window, self._pending = {}, set(), None
        store.spawn(self._release())

    async def _release(self) -> None:
        try:
            with faults(self._store.url):
                pool = await self._store.pool()
                async with pool.connection() as conn:
                    await conn.execute(
                        b"DELETE FROM maildrop_leases WHERE mailbox = %s AND holder = %s",
                        (self.mailbox, self.holder))
        except OSError:
            pass  # the lease runs out by itself


def _quiet(task: asyncio.Task[None]) -> None:
    """Read-ahead faults are met again by the read that follows."""
    if not task.cancelled():
        task.exception()
