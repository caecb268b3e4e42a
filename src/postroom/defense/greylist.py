"""Greylisting (RFC 6647): the first try of an unknown triplet is answered "try again later".

A triplet is (the client's network, the sender, the recipient): the client's
/24 for IPv4 or /64 for IPv6, since a sender's retries may leave from another
host of its pool (RFC 6647 4.1). A new triplet gets 450; a retry after
`delay` and within `retry_window` of the first try passes, and from then on
the triplet passes until `lifetime` after its last message. A network that
passed `auto_allow_after` triplets skips greylisting (postgrey's
auto-whitelist). The triplets live in SQLite in the data folder, so a restart
forgets nothing and every server process sees the same ones; what is past its
time is swept every EXPIRE_EVERY checks.
"""

from __future__ import annotations

import asyncio
import ipaddress
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

from postroom.protocol.replies import Reply
from postroom.store import sqlitefile

BUSY_TIMEOUT = 5.0  # seconds SQLite waits for another process's write
IPV4_PREFIX = 24  # RFC 6647 4.1.1: senders retry from other hosts of their network
IPV6_PREFIX = 64
EXPIRE_EVERY = 1000  # checks (in one process) between sweeps of what is past its time

_SCHEMA = """
CREATE TABLE IF NOT EXISTS triplet (
    network TEXT NOT NULL, sender TEXT NOT NULL, recipient TEXT NOT NULL,
    first_seen REAL NOT NULL, last_seen REAL NOT NULL, passed INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (network, sender, recipient)
);
CREATE TABLE IF NOT EXISTS client (
    network TEXT PRIMARY KEY, passes INTEGER NOT NULL, last_seen REAL NOT NULL
);
"""


def client_network(address: str) -> str:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    prefix = IPV4_PREFIX if ip.version == 4 else IPV6_PREFIX
    return str(ipaddress.ip_network((ip, prefix), strict=False))


def greylisted_reply(delay: float) -> Reply:
    return Reply(450, "4.7.1", f"Greylisted: please try again in {int(delay)} seconds "
                 "(RFC 6647)")


class Greylist:
    """The triplet store; `check` says whether a message to one recipient may pass now."""

    def __init__(self, path: Path, *, delay: float, retry_window: float, lifetime: float,
                 auto_allow_after: int, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.delay = delay
        self.retry_window = retry_window
        self.lifetime = lifetime
        self.auto_allow_after = auto_allow_after
        self._clock = clock
        self._local = threading.local()  # one connection per thread (sqlite3's rule)
        self._checks = 0
        self._db()  # made now: a fault shows at start

    def _db(self) -> sqlite3.Connection:
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            db = sqlitefile.connect(self.path, BUSY_TIMEOUT)
            db.executescript(_SCHEMA)
            self._local.db = db
        return db

    async def check(self, client_ip: str, sender: str, recipient: str) -> float:
        """0 when the message may pass; else the seconds the client should wait."""
        return await asyncio.to_thread(self.check_now, client_ip, sender, recipient)

    def check_now(self, client_ip: str, sender: str, recipient: str) -> float:
        self._checks += 1
        if self._checks % EXPIRE_EVERY == 0:
            self.expire()
        network = client_network(client_ip)
        now = self._clock()
        db = self._db()
        with db:  # one transaction: the processes serialise on SQLite's write lock
            db.execute("BEGIN IMMEDIATE")
            if self.auto_allow_after:
                row = db.execute("SELECT passes, last_seen FROM client WHERE network = ?",
                                 (network,)).fetchone()
                if row and row[0] >= self.auto_allow_after and now - row[1] < self.lifetime:
                    db.execute("UPDATE client SET last_seen = ? WHERE network = ?",
                               (now, network))
                    return 0.0
            key = (network, sender.lower(), recipient.lower())
            row = db.execute("SELECT first_seen, last_seen, passed FROM triplet WHERE "
                             "network = ? AND sender = ? AND recipient = ?", key).fetchone()
            if row is not None:
                first, last, passed = row
                if passed and now - last < self.lifetime:
                    db.execute("UPDATE triplet SET last_seen = ? WHERE network = ? AND "
                               "sender = ? AND recipient = ?", (now, *key))
                    return 0.0
                if not passed and now - first < self.delay:
                    return float(self.delay - (now - first))
                if not passed and now - first <= self.retry_window:
                    db.execute("UPDATE triplet SET last_seen = ?, passed = 1 WHERE "
                               "network = ? AND sender = ? AND recipient = ?", (now, *key))
                    db.execute("INSERT INTO client VALUES (?, 1, ?) ON CONFLICT(network) DO "
                               "UPDATE SET passes = passes + 1, last_seen = excluded.last_seen",
                               (network, now))
                    return 0.0
            db.execute("INSERT OR REPLACE INTO triplet VALUES (?, ?, ?, ?, ?, 0)",
                       (*key, now, now))
            return self.delay

    def expire(self) -> int:
        """Forget triplets and networks past their time; how many triplets went."""
        now = self._clock()
        db = self._db()
        with db:
            gone = db.execute("DELETE FROM triplet WHERE (passed AND ? - last_seen >= ?) OR "
                              "(NOT passed AND ? - first_seen > ?)",
                              (now, self.lifetime, now, self.retry_window)).rowcount
            db.execute("DELETE FROM client WHERE ? - last_seen >= ?", (now, self.lifetime))
        return gone
