"""Directory answers for the SMTP hot path, cached until the database changes on disk.

Every RCPT asks "is this domain ours?" and "where does this address go?". The
SQLite directory answers in tens of microseconds, but at thousands of
recipients a second that is a large share of the server's time, and `postroom
user add` in another process must still take effect at once. So answers are
kept while the database files are unchanged: SQLite in WAL mode appends every
commit to the -wal file and checkpoints into the main file, so a commit always
changes the size or modification time of one of them. Timestamps are only as
fine as the kernel's clock tick, and a WAL reused after a checkpoint keeps its
size, so answers also expire after MAX_AGE seconds whatever the files say.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from postroom.store.api import Expansion, UserDirectory

MAX_ENTRIES = 50_000  # a bound on memory for a flood of distinct addresses
MAX_AGE = 1.0  # seconds: the longest a change can go unseen
RECHECK_AFTER = 0.05  # seconds between looks at the files: stat(2) is not free either


class CachedLookups:
    """`has_domain` and `expand` of a directory, remembered while its files are unchanged."""

    def __init__(self, directory: UserDirectory, db_path: Path) -> None:
        self._directory = directory
        self._files = (str(db_path), str(db_path) + "-wal")
        self._stamp: tuple[tuple[int, int], ...] | None = None
        self._since = 0.0
        self._checked = -1.0
        self._domains: dict[str, bool] = {}
        self._expansions: dict[str, Expansion | None] = {}

    def _fresh(self) -> None:
        now = time.monotonic()
        if now - self._checked < RECHECK_AFTER:
            return
        self._checked = now
        stamp = tuple(self._stat(name) for name in self._files)
        if stamp != self._stamp or now - self._since > MAX_AGE or (
            len(self._expansions) > MAX_ENTRIES
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

    def has_domain(self, domain: str) -> bool:
        self._fresh()
        known = self._domains.get(domain)
        if known is None:
            known = self._domains[domain] = self._directory.has_domain(domain)
        return known

    def expand(self, address: str) -> Expansion | None:
        self._fresh()
        if address in self._expansions:
            return self._expansions[address]
        result = self._expansions[address] = self._directory.expand(address)
        return result
