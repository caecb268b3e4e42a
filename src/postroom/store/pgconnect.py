"""Connections to the PostgreSQL store: where a URL points (no password) and faults as OSError.

The store interface (postroom.store.api) promises OSError for every storage
fault, which the server answers with a temporary failure (451 4.3.0, -ERR
[SYS/TEMP]). psycopg raises its own errors, and the pool its timeouts:
`faults` turns both into OSError naming the server.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from urllib.parse import urlsplit

import psycopg
import psycopg_pool

CONNECT_TIMEOUT = 5  # seconds for one connection attempt (libpq's connect_timeout)
POOL_TIMEOUT = 10.0  # seconds a session waits for a pooled connection before a 4xx
NOTIFY_CHANNEL = "postroom_directory"  # NOTIFY after every change to the user directory


def is_postgres_url(url: str | None) -> bool:
    return bool(url) and str(url).startswith(("postgresql://", "postgres://"))


def describe(url: str) -> str:
    """host:port/database of `url`, without user name or password (for messages)."""
    parts = urlsplit(url)
    host = parts.hostname or "localhost"
    port = parts.port or 5432
    return f"{host}:{port}{parts.path or '/'}"


def conninfo(url: str) -> str:
    """`url` with the connect timeout postroom uses unless the URL names one."""
    if "connect_timeout=" in url:
        return url
    return url + ("&" if "?" in url else "?") + f"connect_timeout={CONNECT_TIMEOUT}"


class StoreUnavailable(OSError):
    """The PostgreSQL server cannot be reached or refused the work: a temporary fault."""


@contextlib.contextmanager
def faults(url: str) -> Iterator[None]:
    """Turn psycopg's and the pool's errors inside the block into StoreUnavailable."""
    try:
        yield
    except (psycopg.Error, psycopg_pool.PoolTimeout, psycopg_pool.PoolClosed) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StoreUnavailable(f"PostgreSQL at {describe(url)}: {first}") from exc


def connect(url: str, *, autocommit: bool = False) -> psycopg.Connection:
    """One connection (StoreUnavailable when the server does not answer)."""
    with faults(url):
        return psycopg.connect(conninfo(url), autocommit=autocommit)
