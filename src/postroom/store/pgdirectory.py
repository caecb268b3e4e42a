"""The server's `Directory` over PostgreSQL: answers cached in memory, dropped on every NOTIFY.

Every RCPT asks "is this domain ours?" and "where does this address go?", and
a change made on any node must be seen by every node within a second. One
connection per process LISTENs on NOTIFY_CHANNEL (postroom.store.pgusers sends
it in the transaction of every change): a notice drops the cached expansions
and reloads the domains. While that connection is down, nothing is cached (each
answer comes from the database), so no change can go unseen; the domains keep
their last value, and are read again on reconnecting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import psycopg

from postroom.store.api import Expansion, PasswordGate
from postroom.store.pgconnect import NOTIFY_CHANNEL, conninfo, describe
from postroom.store.pgusers import PGUserDirectory

log = logging.getLogger("postroom.store")

MAX_ENTRIES = 50_000  # a bound on memory for a flood of distinct addresses
RECONNECT_AFTER = 1.0  # seconds between attempts to listen again after a fault

class PGDirectory:
    """api.Directory on PGUserDirectory, cached while change notices arrive."""

    def __init__(self, users: PGUserDirectory,
                 password_gate: PasswordGate | None = None) -> None:
        self._users = users
        self._gate: PasswordGate = password_gate or asyncio.to_thread
        self._static = users.static_domains
        self._domains: frozenset[str] = frozenset()
        self._expansions: dict[str, Expansion | None] = {}
        self._generation = 0  # bumped by every notice: answers read before it are stale
        self._listening = False
        self._task: asyncio.Task[None] | None = None
        self.changes = 0  # notices received (tests wait on it)

    def load_domains(self) -> None:
        """Read the stored domains (BLOCKING; OSError when the database is down)."""
        self._domains = self._users.stored_domains()

    def start(self) -> None:
        """Listen for change notices until `stop` (on the running loop)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._listen())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def _forget(self) -> None:
        self._generation += 1
        self._expansions.clear()

    async def _listen(self) -> None:
        url = self._users.url
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(conninfo(url), autocommit=True)
                async with conn:
                    await conn.execute(f"LISTEN {NOTIFY_CHANNEL}".encode())
                    # Listening first, then reading: no change falls between the two.
                    await self._reload()
                    self._listening = True
                    log.info("store: listening for directory changes at %s", describe(url))
                    async for _notice in conn.notifies():
                        self._forget()
                        await self._reload()
                        self.changes += 1
            except (psycopg.Error, OSError) as exc:
                if self._listening:
                    log.warning("store: directory change notices stopped (%s); "
                                "answering from the database until they resume", exc)
            self._listening = False
            self._forget()
            await asyncio.sleep(RECONNECT_AFTER)

    async def _reload(self) -> None:
        await asyncio.to_thread(self.load_domains)

    def is_local_domain(self, domain: str) -> bool:
        return domain in self._static or domain in self._domains

    async def expand(self, address: str) -> Expansion | None:
        if self._listening and address in self._expansions:
            return self._expansions[address]
        generation = self._generation
        result = await asyncio.to_thread(self._users.expand, address)
        if self._listening and generation == self._generation:
            if len(self._expansions) >= MAX_ENTRIES:
                self._expansions.clear()
            self._expansions[address] = result
        return result

    async def verify_password(self, address: str, password: str) -> bool:
        return await self._gate(self._users.verify_password, address, password)

    async def apop_secret(self, address: str) -> str | None:
        return await asyncio.to_thread(self._users.apop_secret, address)
