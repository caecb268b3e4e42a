"""The embedded user directory: local domains, users, aliases and APOP secrets in one SQLite file.

It is the `UserDirectory` of postroom.store.api; postroom.store.cache puts the
server's `Directory` in front of it. The file is in WAL mode, so the CLI can
change users while a long-running server reads them. Every address is stored
in canonical form with a lower-case local part (api.local_address).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from argon2 import PasswordHasher

from postroom.canonical import canonical, canonical_domain, mail_domain, mailbox_address, split
from postroom.store import sqlitefile
from postroom.store.api import DirectoryError, Expansion, local_address, user_key
from postroom.store.expansion import SUBADDRESS_DELIMITER, check_alias_target, expand
from postroom.store.passwords import Hashes, check_password

BUSY_TIMEOUT = 10.0  # seconds to wait for another process's write transaction

SCHEMA_VERSION = 2
_SCHEMA = """
CREATE TABLE IF NOT EXISTS domains (
    name     TEXT PRIMARY KEY,
    created  REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS users (
    address  TEXT PRIMARY KEY,
    domain   TEXT NOT NULL,
    password TEXT NOT NULL,          -- argon2id encoded hash ($argon2id$v=19$...)
    created  REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS users_domain ON users (domain);
CREATE TABLE IF NOT EXISTS aliases (
    source   TEXT NOT NULL,
    position INTEGER NOT NULL,       -- keeps targets in the order they were given
    target   TEXT NOT NULL,
    PRIMARY KEY (source, target)
);
CREATE TABLE IF NOT EXISTS apop_secrets (
    address  TEXT PRIMARY KEY,       -- a user who opted in to POP3 APOP
    secret   TEXT NOT NULL           -- readable on purpose: APOP (RFC 1939 7) needs it
);
"""


def _refused(convert: Callable[[str], str], value: str) -> str:
    """`convert(value)`, its ValueError turned into the DirectoryError that says why."""
    try:
        return convert(value)
    except ValueError as e:
        raise DirectoryError(str(e)) from None


class SQLiteUserDirectory:
    """UserDirectory on one SQLite file.

    `static_domains` are local domains that come from the config file (named
    `config_source` in messages): they count as local (users may be added to
    them) without being in the database.
    `postmaster` is the administrator's mailbox: mail for postmaster@ any local
    domain that has no user or alias of that name goes there (RFC 5321 4.5.1);
    None leaves postmaster@ to users and aliases alone.
    `hasher` lets tests use cheaper argon2 parameters.
    """

    def __init__(
        self,
        path: Path,
        static_domains: Iterable[str] = (),
        hasher: PasswordHasher | None = None,
        postmaster: str | None = None,
        config_source: str = "the config file",
    ) -> None:
        self.path = Path(path)
        self.config_source = config_source
        self.static_domains = frozenset(_refused(mail_domain, d) for d in static_domains)
        self.postmaster = local_address(postmaster) if postmaster is not None else None
        self.hashes = Hashes(hasher)
        self._local = threading.local()
        self._init_lock = threading.Lock()
        self._initialized = False

    # -- connections ---------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not self.path.exists():
            # Password hashes are secrets: create the file 0600 before SQLite does;
            # SQLite gives the -wal and -shm files the same mode.
            with contextlib.suppress(FileExistsError):
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        conn = sqlitefile.connect(self.path, BUSY_TIMEOUT)
        with self._init_lock:
            if not self._initialized:
                self._create_schema(conn)
                self._initialized = True
        self._local.conn = conn
        return conn

    @staticmethod
    def _create_schema(conn: sqlite3.Connection) -> None:
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        if version > SCHEMA_VERSION:
            raise DirectoryError(
                f"the user database was made by a newer postroom (schema {version})"
            )
        if version < SCHEMA_VERSION:
            conn.execute("BEGIN IMMEDIATE")
            try:
                # executescript() would commit early; run the statements one by one.
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        # BEGIN IMMEDIATE takes the write lock up front, so check-then-insert
        # sequences cannot interleave with another process's.
        conn = self._connect()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def close(self) -> None:
        """Close this thread's connection (others close when their threads end)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # -- domains -------------------------------------------------------------

    def add_domain(self, domain: str) -> None:
        name = _refused(mail_domain, domain)
        if name in self.static_domains:
            raise DirectoryError(
                f"domain {name} is a local domain already: `domains` in {self.config_source} "
                "lists it"
            )
        with self._write() as conn:
            if conn.execute("SELECT 1 FROM domains WHERE name = ?", (name,)).fetchone():
                raise DirectoryError(f"domain {name} already exists")
            conn.execute("INSERT INTO domains (name, created) VALUES (?, ?)", (name, time.time()))

    def remove_domain(self, domain: str) -> None:
        name = _refused(canonical_domain, domain)  # also one stored before a rule
        if name in self.static_domains:
            # Removing a stored copy would change nothing: the config keeps it local.
            raise DirectoryError(
                f"domain {name} is listed in `domains` in {self.config_source}; remove it there"
            )
        with self._write() as conn:
            if not conn.execute("SELECT 1 FROM domains WHERE name = ?", (name,)).fetchone():
                raise DirectoryError(f"no such domain: {name}")
            if self.postmaster is not None and split(self.postmaster)[1] == name:
                raise DirectoryError(
                    f"domain {name} holds the administrator's mailbox (postmaster = "
                    f"{self.postmaster} in {self.config_source}); name another one there first"
                )
            users = conn.execute(
                "SELECT COUNT(*), MIN(address) FROM users WHERE domain = ?", (name,)
            ).fetchone()
            aliases = conn.execute(
                "SELECT COUNT(DISTINCT source), MIN(source) FROM aliases "
                "WHERE source LIKE ? ESCAPE '\\'",
                ("%@" + name.replace("%", "\\%").replace("_", "\\_"),),
            ).fetchone()
            for (count, first), what, kind in ((users, "user(s)", "user"),
                                               (aliases, "alias(es)", "alias")):
                if count:
                    raise DirectoryError(
                        f"domain {name} still has {count} {what} ({first}...); "
                        f"remove them first: postroom {kind} del {first}"
                    )
            conn.execute("DELETE FROM domains WHERE name = ?", (name,))

    def list_domains(self) -> list[str]:
        rows = self._connect().execute("SELECT name FROM domains").fetchall()
        return sorted({r[0] for r in rows} | self.static_domains)

    def has_domain(self, domain: str) -> bool:
        try:
            name = canonical_domain(domain)
        except ValueError:
            return False
        if name in self.static_domains:
            return True
        row = self._connect().execute("SELECT 1 FROM domains WHERE name = ?", (name,))
        return row.fetchone() is not None

    def _require_domain(self, domain: str) -> None:
        if not self.has_domain(domain):
            raise DirectoryError(
                f"{domain} is not a local domain; add the domain first: "
                f"postroom domain add {domain}"
            )

    # -- users ---------------------------------------------------------------

    def check_new_user(self, address: str) -> str:
        """The key a new user `address` would have, or DirectoryError saying why it cannot.

        Cheap (no password hashing): the CLI asks before prompting for a password.
        """
        key = _refused(mailbox_address, address)
        local, domain = split(key)
        if SUBADDRESS_DELIMITER in local:
            base = local.partition(SUBADDRESS_DELIMITER)[0]
            reaches = f": mail to {key} reaches {base}@{domain}" if base else ""
            raise DirectoryError(
                f"{address}: a user name cannot contain {SUBADDRESS_DELIMITER!r}, the "
                f"subaddress delimiter (RFC 5233){reaches}"
            )
        self._require_domain(domain)
        return key

    def add_user(self, address: str, password: str) -> None:
        key = self.check_new_user(address)
        domain = split(key)[1]
        hashed = self.hashes.hash(password)
        with self._write() as conn:
            if self.is_user(key):
                raise DirectoryError(
                    f"user {key} already exists (change the password with: "
                    f"postroom user passwd {key})"
                )
            conn.execute(
                "INSERT INTO users (address, domain, password, created) VALUES (?, ?, ?, ?)",
                (key, domain, hashed, time.time()),
            )

    def set_password(self, address: str, password: str) -> None:
        key = _refused(local_address, address)
        hashed = self.hashes.hash(password)
        with self._write() as conn:
            cur = conn.execute("UPDATE users SET password = ? WHERE address = ?", (hashed, key))
            if cur.rowcount == 0:
                raise DirectoryError(f"no such user: {key}")

    def remove_user(self, address: str) -> None:
        key = _refused(local_address, address)
        with self._write() as conn:
            cur = conn.execute("DELETE FROM users WHERE address = ?", (key,))
            if cur.rowcount == 0:
                raise DirectoryError(f"no such user: {key}")
            conn.execute("DELETE FROM apop_secrets WHERE address = ?", (key,))

    # -- APOP (opt-in) --------------------------------------------------------

    def set_apop_secret(self, address: str, secret: str | None) -> None:
        """Turn APOP on for a user with its own shared secret, or off (None).

        APOP (RFC 1939 7) proves the client knows a secret by an MD5 digest of
        the server's greeting timestamp and the secret, so the server must be
        able to read the secret: it is stored as given, NOT hashed. It is
        therefore a second secret, never the login password (whose hash stays
        the only copy of that one).
        """
        key = _refused(local_address, address)
        with self._write() as conn:
            if not self.is_user(key):
                raise DirectoryError(f"no such user: {key}")
            if secret is None:
                conn.execute("DELETE FROM apop_secrets WHERE address = ?", (key,))
                return
            conn.execute(
                "INSERT OR REPLACE INTO apop_secrets (address, secret) VALUES (?, ?)",
                (key, check_password(secret)),
            )

    def apop_secret(self, address: str) -> str | None:
        """The user's APOP secret when the user opted in, else None."""
        row = self._connect().execute(
            "SELECT secret FROM apop_secrets WHERE address = ?", (user_key(address),)
        ).fetchone()
        return str(row[0]) if row else None

    def list_users(self, domain: str | None = None) -> list[str]:
        conn = self._connect()
        if domain is None:
            rows = conn.execute("SELECT address FROM users ORDER BY domain, address")
        else:
            rows = conn.execute(
                "SELECT address FROM users WHERE domain = ? ORDER BY address",
                (_refused(canonical_domain, domain),),
            )
        return [r[0] for r in rows]

    def has_user(self, address: str) -> bool:
        key = user_key(address)
        return key is not None and self.is_user(key)

    def verify_password(self, address: str, password: str) -> bool:
        """True when `password` is the user's: one argon2 hash, also for unknown users
        (Hashes.verify). A hash made with older parameters is replaced."""
        key = user_key(address)
        row = self._connect().execute(
            "SELECT password FROM users WHERE address = ?", (key,)
        ).fetchone()
        stored: str | None = row[0] if row else None
        good, renewed = self.hashes.verify(stored, password)
        if renewed is not None:
            with self._write() as conn:
                conn.execute(
                    "UPDATE users SET password = ? WHERE address = ? AND password = ?",
                    (renewed, key, stored),
                )
        return good

    # -- aliases -------------------------------------------------------------

    def add_alias(
        self, source: str, targets: Iterable[str], *, replace_user: bool = False
    ) -> None:
        """Make `source` (in a local domain) forward to `targets`, adding to any it has.

        Refused, with DirectoryError saying why, when mail to the alias could
        not be delivered: a target that is no user, alias or postmaster here,
        or a loop back to `source`. A target outside the local domains is
        forwarded (the server relays it with an SRS sender and an ARC seal). A
        `source` that is a user would lose its mail to the alias,
        so that takes `replace_user` (naming the user among its own targets
        keeps a copy in its mailbox).
        """
        key = _refused(mailbox_address, source)
        self._require_domain(split(key)[1])
        wanted = list(dict.fromkeys(self._target_key(target) for target in targets))
        if not wanted:
            raise DirectoryError(f"alias {key} needs at least one target")
        with self._write() as conn:
            if not replace_user and self.is_user(key):
                raise DirectoryError(
                    f"{key} is a user: an alias of the same name would take all of its mail "
                    f"(to do that, use --force; to keep a copy in its mailbox, name {key} "
                    "among the targets too)"
                )
            existing = {r[0] for r in conn.execute(
                "SELECT target FROM aliases WHERE source = ?", (key,)
            )}
            (last,) = conn.execute(
                "SELECT COALESCE(MAX(position), -1) FROM aliases WHERE source = ?", (key,)
            ).fetchone()
            for t in wanted:
                if t not in existing:
                    last += 1
                    conn.execute(
                        "INSERT INTO aliases (source, position, target) VALUES (?, ?, ?)",
                        (key, last, t),
                    )
            # Checked inside the transaction, on the aliases as they would be:
            # a refusal rolls the insertions back.
            for t in wanted:
                check_alias_target(self, key, t, self.postmaster)

    def _target_key(self, target: str) -> str:
        # Local targets are matched case-insensitively; remote ones keep their
        # local part as written (RFC 5321 2.4: only their host may fold case).
        try:
            addr = canonical(target)
        except ValueError as e:
            raise DirectoryError(f"alias target {target!r}: {e}") from None
        local, domain = split(addr)
        if self.has_domain(domain):
            return f"{local.lower()}@{domain}"
        return addr

    def remove_alias(self, source: str, targets: Iterable[str] | None = None) -> None:
        """Remove the alias, or only some of its targets."""
        key = _refused(local_address, source)
        with self._write() as conn:
            if targets is None:
                cur = conn.execute("DELETE FROM aliases WHERE source = ?", (key,))
                if cur.rowcount == 0:
                    raise DirectoryError(f"no such alias: {key}")
                return
            for target in targets:
                t = self._target_key(target)
                cur = conn.execute(
                    "DELETE FROM aliases WHERE source = ? AND target = ?", (key, t)
                )
                if cur.rowcount == 0:
                    raise DirectoryError(f"alias {key} has no target {t}")

    def list_aliases(self) -> dict[str, list[str]]:
        result: dict[str, list[str]] = {}
        for source, target in self._connect().execute(
            "SELECT source, target FROM aliases ORDER BY source, position"
        ):
            result.setdefault(source, []).append(target)
        return result

    # -- resolution (the expansion.Entries of `expand`, in this thread's connection) --

    def is_user(self, address: str) -> bool:
        row = self._connect().execute("SELECT 1 FROM users WHERE address = ?", (address,))
        return row.fetchone() is not None

    def alias_targets(self, address: str) -> list[str] | None:
        rows = self._connect().execute(
            "SELECT target FROM aliases WHERE source = ? ORDER BY position", (address,)
        ).fetchall()
        return [r[0] for r in rows] if rows else None

    def expand(self, address: str) -> Expansion | None:
        """Where mail for `address` goes (postroom.store.expansion); None when it is no
        user or alias here, or not local."""
        key = user_key(address)
        if key is None or not self.has_domain(split(key)[1]):
            return None
        return expand(self, key, self.postmaster)
