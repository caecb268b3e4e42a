"""The server's `Directory` over the SQLite directory: answers cached until the database changes.

Every RCPT asks "is this domain ours?" and "where does this address go?", and a
change the CLI makes in another process must be seen at once. An answer is kept
while the database files are unchanged (in WAL mode every commit changes the size
or modification time of the main file or the -wal file), and never longer than
MAX_AGE: timestamps are as coarse as the kernel's clock tick, and a WAL reused
after a checkpoint keeps its size.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable

from postroom.store.api import Expansion, PasswordGate
from postroom.store.users import SQLiteUserDirectory

MAX_ENTRIES = 50_000  # a bound on memory for a flood of distinct addresses or domains
MAX_AGE = 1.0  # seconds: the longest a change can go unseen
RECHECK_AFTER = 0.05  # seconds between looks at the files: stat(2) is not free either


class CachedDirectory:
    """api.Directory: `users`' answers, remembered while its files are unchanged.

    `password_gate` runs the password checks (the server bounds them,
    server.passwords); without one each runs in a thread of its own.
    `clock` is for tests.
    """

    def __init__(self, users: SQLiteUserDirectory, password_gate: PasswordGate | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._users = users
        self._gate: PasswordGate = password_gate or asyncio.to_thread
        self._clock = clock
        self._static = users.static_domains  # canonical already
        self._files = (str(users.path), str(users.path) + "-wal")
        self._stamp: tuple[tuple[int, int], ...] | None = None
        self._since = 0.0
        self._checked = -1.0
        self._domains: dict[str, bool] = {}
        self._expansions: dict[str, Expansion | None] = {}

    def _fresh(self) -> None:
        now = self._clock()
        if now - self._checked < RECHECK_AFTER:
            return
        self._checked = now
        stamp = tuple(self._stat(name) for name in self._files)
        if stamp != self._stamp or now - self._since > MAX_AGE or (
            len(self._expansions) + len(self._domains) > MAX_ENTRIES
        ):
            self._stamp = stamp
            self._since = now
            self._domains.clear()
            self._expansions.clear()

    @staticmethod
    def _stat(name: str) -> tuple[int, int]:
        try:
            st = os.stat(name)
        except FileNotFoundError:
            return (0, 0)
        return (st.st_mtime_ns, st.st_size)

    def is_local_domain(self, domain: str) -> bool:
        if domain in self._static:  # the config's: no lookup, no cache
            return True
        self._fresh()
        known = self._domains.get(domain)
        if known is None:
            known = self._domains[domain] = self._users.has_domain(domain)
        return known

    async def expand(self, address: str) -> Expansion | None:
        self._fresh()
        if address in self._expansions:
            return self._expansions[address]
        result = self._expansions[address] = self._users.expand(address)
        return result

    async def verify_password(self, address: str, password: str) -> bool:
        return await self._gate(self._users.verify_password, address, password)

    async def apop_secret(self, address: str) -> str | None:
        return self._users.apop_secret(address)
