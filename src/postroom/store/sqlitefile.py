"""Opening a SQLite file that several processes share, in WAL mode.

WAL lets readers go on while one process writes (https://sqlite.org/wal.html).
The journal mode is stored in the file, but switching to it takes the
exclusive lock: when two processes open a new file at once, each holds a
shared lock and wants the exclusive one, so SQLite answers SQLITE_BUSY at once
instead of calling the busy handler (waiting could only deadlock). The switch
is therefore retried until `busy_timeout`; once either process has switched,
the other finds the file in WAL mode already.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

RETRY_SECONDS = 0.005  # between two tries of the switch to WAL


def connect(path: Path, busy_timeout: float) -> sqlite3.Connection:
    """An autocommit connection that waits `busy_timeout` s for other writers."""
    conn = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None)
    try:
        _use_wal(conn, time.monotonic() + busy_timeout)
    except BaseException:
        conn.close()
        raise
    return conn


def _use_wal(conn: sqlite3.Connection, deadline: float) -> None:
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as e:
            if e.sqlite_errorcode != sqlite3.SQLITE_BUSY or time.monotonic() > deadline:
                raise
        time.sleep(RETRY_SECONDS)
