"""What the demo shows of the boss's mailbox, in either store: its Maildir files or its rows.

With `postroom demo --store URL` the receiving host keeps its users and mail
in a PostgreSQL database the demo makes for itself (`demo_database`) and drops
at the end.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from postroom.store.maildir import list_messages


@dataclass(frozen=True)
class MaildirView:
    """The Maildir of one mailbox; paths shown relative to `root`."""

    maildir: Path
    root: Path
    where: str = "the Maildir"

    def listing(self) -> list[str]:
        return [f"Maildir file: {entry.path.relative_to(self.root)}"
                for entry in list_messages(self.maildir)]


@dataclass(frozen=True)
class PostgresView:
    """One mailbox's messages in the PostgreSQL store at `url`."""

    url: str
    mailbox: str
    where: str = "PostgreSQL"

    def listing(self) -> list[str]:
        import psycopg

        with psycopg.connect(self.url) as conn:
            rows = conn.execute("SELECT uid, size FROM messages WHERE mailbox = %s "
                                "AND folder = '' ORDER BY id", (self.mailbox,)).fetchall()
        return [f"PostgreSQL row of messages: UIDL {uid}, {size} octets" for uid, size in rows]


@contextlib.contextmanager
def demo_database(server_url: str, *, keep: bool = False) -> Iterator[str]:
    """A new database on the server `server_url` names, for this run alone: its URL.
    Dropped at the end unless `keep`."""
    import psycopg

    name = f"postroom_demo_{secrets.token_hex(4)}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"'.encode())
    parts = urlsplit(server_url)
    try:
        yield urlunsplit(parts._replace(path=f"/{name}"))
    finally:
        if not keep:
            with contextlib.suppress(psycopg.Error), \
                    psycopg.connect(server_url, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'.encode())
