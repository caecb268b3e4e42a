"""The user directory in PostgreSQL: the embedded directory's rules and SQL, on a shared server.

`PGUserDirectory` is the SQLite directory's logic (postroom.store.users) over
PostgreSQL connections: the SQL there is portable but for its placeholders and
one upsert, which `_Dialect` translates. Every change is written under one
advisory lock (as SQLite's BEGIN IMMEDIATE: check-then-insert sequences of two
nodes cannot interleave) and sends a NOTIFY on NOTIFY_CHANNEL in its transaction,
so every node's cache (postroom.store.pgdirectory) drops what it knew as soon as
the change commits.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Iterator
from typing import Any

import psycopg
from argon2 import PasswordHasher

from postroom.canonical import mail_domain
from postroom.store.api import local_address
from postroom.store.passwords import Hashes
from postroom.store.pgconnect import NOTIFY_CHANNEL, connect, faults
from postroom.store.users import SQLiteUserDirectory, _refused

# An arbitrary constant naming the directory's write lock (pg_advisory_xact_lock).
WRITE_LOCK = 0x706F7374726F6F6E

_UPSERTS = {
    "INSERT OR REPLACE INTO apop_secrets (address, secret) VALUES (?, ?)":
        "INSERT INTO apop_secrets (address, secret) VALUES (%s, %s) "
        "ON CONFLICT (address) DO UPDATE SET secret = EXCLUDED.secret",
}


class _Dialect:
    """A psycopg connection that takes SQLite's SQL (placeholders `?`); faults as OSError."""

    __slots__ = ("conn", "url")

    def __init__(self, conn: psycopg.Connection, url: str) -> None:
        self.conn = conn
        self.url = url

    def execute(self, sql: str, params: tuple[Any, ...] | list[Any] = ()) -> psycopg.Cursor:
        translated = _UPSERTS.get(sql) or sql.replace("?", "%s")
        with faults(self.url):
            return self.conn.execute(translated.encode(), params)


class PGUserDirectory(SQLiteUserDirectory):
    """api.UserDirectory in PostgreSQL, one connection per thread (autocommit: a read
    holds no transaction open), opened again after the server restarts."""

    def __init__(
        self,
        url: str,
        static_domains: Iterable[str] = (),
        hasher: PasswordHasher | None = None,
        postmaster: str | None = None,
        config_source: str = "the config file",
    ) -> None:
        # Not SQLiteUserDirectory.__init__: there is no file.
        self.url = url
        self.config_source = config_source
        self.static_domains = frozenset(_refused(mail_domain, d) for d in static_domains)
        self.postmaster = local_address(postmaster) if postmaster is not None else None
        self.hashes = Hashes(hasher)
        self._local = threading.local()

    def _connect(self) -> _Dialect:  # type: ignore[override]
        current: _Dialect | None = getattr(self._local, "conn", None)
        if current is not None and not current.conn.closed and not current.conn.broken:
            return current
        if current is not None:
            with contextlib.suppress(psycopg.Error):
                current.conn.close()
        current = self._local.conn = _Dialect(connect(self.url, autocommit=True), self.url)
        return current

    @contextlib.contextmanager
    def _write(self) -> Iterator[_Dialect]:  # type: ignore[override]
        conn = self._connect()
        with faults(self.url), conn.conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(?)", (WRITE_LOCK,))
            yield conn
            conn.execute(f"NOTIFY {NOTIFY_CHANNEL}")

    def close(self) -> None:
        current: _Dialect | None = getattr(self._local, "conn", None)
        if current is not None:
            with contextlib.suppress(psycopg.Error):
                current.conn.close()
            self._local.conn = None

    def stored_domains(self) -> frozenset[str]:
        """The domains in the database (not the config's)."""
        return frozenset(r[0] for r in self._connect().execute("SELECT name FROM domains"))

