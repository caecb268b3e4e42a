"""The user directory: local domains, users with argon2id passwords, aliases, address resolution.

`UserDirectory` is the interface the server and the CLI use; `SQLiteUserDirectory`
is the embedded backend (one SQLite file in WAL mode, so the CLI can change
users while a long-running server reads them). Every address is stored in
canonical form with a lower-case local part: local parts of virtual users
compare case-insensitively here, as Postfix and Dovecot do by default, even
though RFC 5321 2.4 lets a host treat them as case-sensitive.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import sqlite3
import threading
import time
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from postroom.addresses import canonical, canonical_domain, mail_domain, mailbox_address, split

if TYPE_CHECKING:
    from postroom.config import Config

MAX_ALIAS_DEPTH = 10  # nesting limit for alias chains (sendmail's MaxAliasRecursion default)
SUBADDRESS_DELIMITER = "+"  # RFC 5233 subaddress: user+detail@domain
POSTMASTER = "postmaster"  # RFC 5321 4.5.1: the mailbox every domain must have (any case)
MAX_PASSWORD = 1024  # octets; argon2 takes more, but nothing sane needs more
BUSY_TIMEOUT_MS = 10_000  # wait this long for another process's write transaction

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


class DirectoryError(Exception):
    """A user-directory operation was refused; str() is one line that says why."""


class UnknownDomainError(DirectoryError):
    pass


class UserDirectory(Protocol):
    """What the server and the CLI need from a user directory (SQLite now, PostgreSQL later).

    All methods are synchronous and quick, except `verify_password`, which costs
    one argon2 hash: call it from a worker thread in async code.
    """

    def add_domain(self, domain: str) -> None: ...
    def remove_domain(self, domain: str) -> None: ...
    def list_domains(self) -> list[str]: ...
    def has_domain(self, domain: str) -> bool: ...
    def check_new_user(self, address: str) -> str: ...
    def add_user(self, address: str, password: str) -> None: ...
    def set_password(self, address: str, password: str) -> None: ...
    def remove_user(self, address: str) -> None: ...
    def list_users(self, domain: str | None = None) -> list[str]: ...
    def has_user(self, address: str) -> bool: ...
    def verify_password(self, address: str, password: str | bytes) -> bool: ...
    def add_alias(
        self, source: str, targets: Iterable[str], *, replace_user: bool = False
    ) -> None: ...
    def remove_alias(self, source: str, targets: Iterable[str] | None = None) -> None: ...
    def list_aliases(self) -> dict[str, list[str]]: ...
    def resolve(self, address: str) -> list[str] | None: ...
    def expand(self, address: str) -> Expansion | None: ...
    def set_apop_secret(self, address: str, secret: str | None) -> None: ...
    def apop_secret(self, address: str) -> str | None: ...


@dataclass(frozen=True)
class Expansion:
    """Where mail for one address goes, sorted out by kind (order kept, no repeats)."""

    mailboxes: tuple[str, ...]  # local users' mailbox addresses
    remote: tuple[str, ...]  # addresses outside the local domains (to relay)
    unknown: tuple[str, ...]  # alias targets in a local domain that nobody owns,
    # or chains deeper than MAX_ALIAS_DEPTH: mail for them cannot be delivered
    loops: tuple[str, ...] = ()  # aliases (not users) met again inside their own expansion

    @property
    def targets(self) -> list[str]:
        return [*self.mailboxes, *self.remote]

    @property
    def broken(self) -> bool:
        """An alias that exists but reaches no one: its targets are gone or loop."""
        return not self.mailboxes and not self.remote


def local_address(address: str) -> str:
    """Canonical form with a lower-case local part: the key of users and aliases."""
    local, domain = split(canonical(address))
    return f"{local.lower()}@{domain}"


def normalize_password(password: str) -> str:
    """RFC 8265 4.2 OpaqueString: non-ASCII spaces become U+0020, then NFC.

    So the same password typed on two systems that compose characters
    differently still matches.
    """
    mapped = "".join(" " if unicodedata.category(ch) == "Zs" else ch for ch in password)
    return unicodedata.normalize("NFC", mapped)


def _check_password(password: str) -> str:
    if not password:
        raise DirectoryError("the password is empty")
    if any(ch in "\0\r\n" for ch in password):
        # SASL PLAIN (RFC 4616) separates fields with NUL; POP3 PASS ends at CRLF.
        raise DirectoryError("the password must not contain NUL, CR or LF")
    password = normalize_password(password)
    if len(password.encode("utf-8")) > MAX_PASSWORD:
        raise DirectoryError(f"the password is longer than {MAX_PASSWORD} octets")
    return password


def _user_address(address: str) -> str:
    """Canonical key for a new user or alias source, or DirectoryError."""
    try:
        return mailbox_address(address)
    except ValueError as e:
        raise DirectoryError(str(e)) from None


def _domain_name(domain: str) -> str:
    """A name that may become a local domain (not an IP address), or DirectoryError."""
    try:
        return mail_domain(domain)
    except ValueError as e:
        raise DirectoryError(str(e)) from None


def _stored_domain_name(domain: str) -> str:
    """Lenient: a domain stored before a rule was tightened must still be named."""
    try:
        return canonical_domain(domain)
    except ValueError as e:
        raise DirectoryError(str(e)) from None


class SQLiteUserDirectory:
    """UserDirectory on one SQLite file.

    `static_domains` are local domains that come from the config file: they
    count as local (users may be added to them) without being in the database.
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
    ) -> None:
        self.path = Path(path)
        self.static_domains = frozenset(_domain_name(d) for d in static_domains)
        self.postmaster = local_address(postmaster) if postmaster is not None else None
        self.hasher = hasher or PasswordHasher()  # argon2id, RFC 9106 parameters
        self._local = threading.local()
        self._dummy_hash: str | None = None
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
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        with self._init_lock:
            if not self._initialized:
                self._create_schema(conn)
                self._initialized = True
        self._local.conn = conn
        return conn

    @staticmethod
    def _create_schema(conn: sqlite3.Connection) -> None:
        # WAL lets readers (the server) proceed while a writer (the CLI) commits.
        conn.execute("PRAGMA journal_mode = WAL")
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
        name = _domain_name(domain)
        if name in self.static_domains:
            raise DirectoryError(
                f"domain {name} is a local domain already: the config file's `domains` lists it"
            )
        with self._write() as conn:
            if conn.execute("SELECT 1 FROM domains WHERE name = ?", (name,)).fetchone():
                raise DirectoryError(f"domain {name} already exists")
            conn.execute("INSERT INTO domains (name, created) VALUES (?, ?)", (name, time.time()))

    def remove_domain(self, domain: str) -> None:
        name = _stored_domain_name(domain)
        if name in self.static_domains:
            # Removing a stored copy would change nothing: the config keeps it local.
            raise DirectoryError(
                f"domain {name} is listed in the config file's `domains`; remove it there"
            )
        with self._write() as conn:
            if not conn.execute("SELECT 1 FROM domains WHERE name = ?", (name,)).fetchone():
                raise UnknownDomainError(f"no such domain: {name}")
            if self.postmaster is not None and split(self.postmaster)[1] == name:
                raise DirectoryError(
                    f"domain {name} holds the administrator's mailbox (postmaster = "
                    f"{self.postmaster} in the config file); name another one there first"
                )
            users = [r[0] for r in conn.execute(
                "SELECT address FROM users WHERE domain = ? ORDER BY address", (name,)
            )]
            if users:
                raise DirectoryError(
                    f"domain {name} still has {len(users)} user(s) ({users[0]}...); "
                    f"remove them first: postroom user del {users[0]}"
                )
            aliases = [r[0] for r in conn.execute(
                "SELECT DISTINCT source FROM aliases WHERE source LIKE ? ESCAPE '\\' "
                "ORDER BY source",
                ("%@" + name.replace("%", "\\%").replace("_", "\\_"),),
            )]
            if aliases:
                raise DirectoryError(
                    f"domain {name} still has {len(aliases)} alias(es) ({aliases[0]}...); "
                    f"remove them first: postroom alias del {aliases[0]}"
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
            raise UnknownDomainError(
                f"{domain} is not a local domain; add the domain first: "
                f"postroom domain add {domain}"
            )

    # -- users ---------------------------------------------------------------

    def check_new_user(self, address: str) -> str:
        """The key a new user `address` would have, or DirectoryError saying why it cannot.

        Cheap (no password hashing): the CLI asks before prompting for a password.
        """
        key = _user_address(address)
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
        hashed = self.hasher.hash(_check_password(password))
        with self._write() as conn:
            if conn.execute("SELECT 1 FROM users WHERE address = ?", (key,)).fetchone():
                raise DirectoryError(
                    f"user {key} already exists (change the password with: "
                    f"postroom user passwd {key})"
                )
            conn.execute(
                "INSERT INTO users (address, domain, password, created) VALUES (?, ?, ?, ?)",
                (key, domain, hashed, time.time()),
            )

    def set_password(self, address: str, password: str) -> None:
        key = self._existing_key(address)
        hashed = self.hasher.hash(_check_password(password))
        with self._write() as conn:
            cur = conn.execute("UPDATE users SET password = ? WHERE address = ?", (hashed, key))
            if cur.rowcount == 0:
                raise DirectoryError(f"no such user: {key}")

    def remove_user(self, address: str) -> None:
        key = self._existing_key(address)
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
        key = self._existing_key(address)
        with self._write() as conn:
            if not conn.execute("SELECT 1 FROM users WHERE address = ?", (key,)).fetchone():
                raise DirectoryError(f"no such user: {key}")
            if secret is None:
                conn.execute("DELETE FROM apop_secrets WHERE address = ?", (key,))
                return
            conn.execute(
                "INSERT OR REPLACE INTO apop_secrets (address, secret) VALUES (?, ?)",
                (key, normalize_password(_check_password(secret))),
            )

    def apop_secret(self, address: str) -> str | None:
        """The user's APOP secret when the user opted in, else None."""
        try:
            key = local_address(address)
        except ValueError:
            return None
        row = self._connect().execute(
            "SELECT secret FROM apop_secrets WHERE address = ?", (key,)
        ).fetchone()
        return str(row[0]) if row else None

    def _existing_key(self, address: str) -> str:
        try:
            return local_address(address)
        except ValueError as e:
            raise DirectoryError(str(e)) from None

    def list_users(self, domain: str | None = None) -> list[str]:
        conn = self._connect()
        if domain is None:
            rows = conn.execute("SELECT address FROM users ORDER BY domain, address")
        else:
            rows = conn.execute(
                "SELECT address FROM users WHERE domain = ? ORDER BY address",
                (_stored_domain_name(domain),),
            )
        return [r[0] for r in rows]

    def has_user(self, address: str) -> bool:
        try:
            key = local_address(address)
        except ValueError:
            return False
        row = self._connect().execute("SELECT 1 FROM users WHERE address = ?", (key,))
        return row.fetchone() is not None

    def verify_password(self, address: str, password: str | bytes) -> bool:
        """True when `password` is the user's. Costs one argon2 hash, also for unknown users.

        Unknown users are checked against a dummy hash so that the answer takes
        about as long as for a real user (no user enumeration by timing). When
        the stored hash used older parameters, it is replaced by a new one.
        """
        if isinstance(password, bytes):
            try:
                password = password.decode("utf-8")
            except UnicodeDecodeError:
                password = "\0"  # cannot match: stored passwords never contain NUL
        password = normalize_password(password)
        try:
            key: str | None = local_address(address)
        except ValueError:
            key = None
        row = None
        if key is not None:
            row = self._connect().execute(
                "SELECT password FROM users WHERE address = ?", (key,)
            ).fetchone()
        if row is None:
            with contextlib.suppress(VerificationError, InvalidHashError):
                self.hasher.verify(self._dummy(), password)
            return False
        stored: str = row[0]
        try:
            self.hasher.verify(stored, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False
        if self.hasher.check_needs_rehash(stored):
            with self._write() as conn:
                conn.execute(
                    "UPDATE users SET password = ? WHERE address = ? AND password = ?",
                    (self.hasher.hash(password), key, stored),
                )
        return True

    def _dummy(self) -> str:
        if self._dummy_hash is None:
            self._dummy_hash = self.hasher.hash(secrets.token_urlsafe(16))
        return self._dummy_hash

    # -- aliases -------------------------------------------------------------

    def add_alias(
        self, source: str, targets: Iterable[str], *, replace_user: bool = False
    ) -> None:
        """Make `source` (in a local domain) forward to `targets`, adding to any it has.

        Refused, with DirectoryError saying why, when mail to the alias could
        not be delivered: a target outside the local domains (forwarding off
        this host is not supported, so RCPT would refuse every message), a
        target that is no user, alias or postmaster here, or a loop back to
        `source`. A `source` that is a user would lose its mail to the alias,
        so that takes `replace_user` (naming the user among its own targets
        keeps a copy in its mailbox).
        """
        key = _user_address(source)
        self._require_domain(split(key)[1])
        wanted: list[str] = []
        for target in targets:
            try:
                t = self._target_key(target)
            except ValueError as e:
                raise DirectoryError(f"alias target {target!r}: {e}") from None
            if t not in wanted:
                wanted.append(t)
        if not wanted:
            raise DirectoryError(f"alias {key} needs at least one target")
        for t in wanted:
            if not self.has_domain(split(t)[1]):
                raise DirectoryError(
                    f"alias target {t} is not in a local domain: this host delivers aliases "
                    "to local mailboxes only (it does not forward mail to other hosts), so "
                    "every message to the alias would be refused"
                )
        with self._write() as conn:
            if not replace_user and self._is_user(conn, key):
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
                self._check_target(conn, key, t)

    def _check_target(self, conn: sqlite3.Connection, source: str, target: str) -> None:
        """DirectoryError unless mail from alias `source` to `target` reaches a mailbox."""
        found = self._expand(conn, target, chain=(source,))
        if found is None:
            raise DirectoryError(
                f"alias target {target}: no such user or alias (add it first: "
                f"postroom user add {target})"
            )
        if found.loops:
            raise DirectoryError(
                f"alias {source} -> {target} would make a loop ({target} leads back to "
                f"{found.loops[0]}), so its mail would reach no mailbox"
            )
        if found.unknown:
            raise DirectoryError(
                f"alias target {target} leads to {found.unknown[0]}, which is no user or "
                f"alias here (or the chain of aliases is deeper than {MAX_ALIAS_DEPTH})"
            )
        if found.remote:
            raise DirectoryError(
                f"alias target {target} forwards to {found.remote[0]}, outside the local "
                "domains, which this host does not do"
            )

    @staticmethod
    def _is_user(conn: sqlite3.Connection, key: str) -> bool:
        row = conn.execute("SELECT 1 FROM users WHERE address = ?", (key,)).fetchone()
        return row is not None

    def _target_key(self, target: str) -> str:
        # Local targets are matched case-insensitively; remote ones keep their
        # local part as written (RFC 5321 2.4: only their host may fold case).
        addr = canonical(target)
        local, domain = split(addr)
        if self.has_domain(domain):
            return f"{local.lower()}@{domain}"
        return addr

    def remove_alias(self, source: str, targets: Iterable[str] | None = None) -> None:
        """Remove the alias, or only some of its targets."""
        key = self._existing_key(source)
        with self._write() as conn:
            if targets is None:
                cur = conn.execute("DELETE FROM aliases WHERE source = ?", (key,))
                if cur.rowcount == 0:
                    raise DirectoryError(f"no such alias: {key}")
                return
            for target in targets:
                try:
                    t = self._target_key(target)
                except ValueError as e:
                    raise DirectoryError(f"alias target {target!r}: {e}") from None
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

    def _alias_targets(self, conn: sqlite3.Connection, key: str) -> list[str] | None:
        rows = conn.execute(
            "SELECT target FROM aliases WHERE source = ? ORDER BY position", (key,)
        ).fetchall()
        return [r[0] for r in rows] if rows else None

    # -- resolution ----------------------------------------------------------

    def resolve(self, address: str) -> list[str] | None:
        """The addresses mail for `address` reaches: local mailboxes, then remote ones.

        A user gives [itself]; an alias its targets, expanded recursively; an
        unknown ``user+tag`` falls back to ``user`` (RFC 5233 subaddress).
        None when the address is not local, unknown, or reaches nothing
        deliverable (so the server can refuse it with 550).
        """
        expansion = self.expand(address)
        if expansion is None or not expansion.targets:
            return None
        return expansion.targets

    def expand(self, address: str) -> Expansion | None:
        """Like `resolve`, but also tells which alias targets lead nowhere."""
        try:
            key = local_address(address)
        except ValueError:
            return None
        if not self.has_domain(split(key)[1]):
            return None
        return self._expand(self._connect(), key)

    def _expand(
        self, conn: sqlite3.Connection, key: str, chain: tuple[str, ...] = ()
    ) -> Expansion | None:
        """Expand the local address `key`, reached through the aliases in `chain`."""
        mailboxes: list[str] = []
        remote: list[str] = []
        unknown: list[str] = []
        loops: list[str] = []

        def add(bucket: list[str], item: str) -> None:
            if item not in bucket:
                bucket.append(item)

        def walk(addr: str, depth: int, chain: tuple[str, ...]) -> bool:
            """Expand one address; False when it is local and unknown."""
            local, domain = split(addr)
            if not self.has_domain(domain):
                add(remote, addr)
                return True
            addr = f"{local.lower()}@{domain}"
            is_user = self._is_user(conn, addr)
            if addr in chain:
                # A loop. "a -> a, b" is the usual way to keep a copy while
                # forwarding, so an address met again is its own mailbox if it
                # is a user, and a loop that reaches no one otherwise.
                add(mailboxes if is_user else loops, addr)
                return True
            targets = self._alias_targets(conn, addr)
            if targets is not None:  # an alias shadows a user of the same name
                if depth >= MAX_ALIAS_DEPTH:
                    add(unknown, addr)
                    return True
                for target in targets:
                    if not walk(target, depth + 1, (*chain, addr)):
                        add(unknown, target)
                return True
            if is_user:
                add(mailboxes, addr)
                return True
            base, plus, _detail = local.partition(SUBADDRESS_DELIMITER)
            if plus and base:
                return walk(f"{base}@{domain}", depth, chain)
            if local.lower() == POSTMASTER and self.postmaster is not None:
                return administrator(addr, depth, chain)
            return False

        def administrator(addr: str, depth: int, chain: tuple[str, ...]) -> bool:
            """postmaster@ a local domain that has no user or alias of that name
            (RFC 5321 4.5.1): the administrator's mailbox, followed like any
            address. When that is no user or alias either (or is this very
            postmaster), its own folder: postmaster never lacks a mailbox."""
            admin = self.postmaster
            assert admin is not None
            if admin in chain:  # the administrator's own alias leads back here
                return walk(admin, depth + 1, (*chain, addr))
            if admin != addr and self.has_domain(split(admin)[1]) and walk(
                admin, depth + 1, (*chain, addr)
            ):
                return True
            add(mailboxes, admin)
            return True

        if not walk(key, len(chain), chain):
            return None
        return Expansion(tuple(mailboxes), tuple(remote), tuple(unknown), tuple(loops))


def open_user_directory(config: Config) -> SQLiteUserDirectory:
    """The user directory a config names (DATA/users.sqlite3), with its static domains
    and the administrator who receives postmaster@'s mail."""
    return SQLiteUserDirectory(
        config.users_db, static_domains=config.domains, postmaster=config.postmaster
    )


def local_domains(config: Config, directory: UserDirectory) -> set[str]:
    """Every domain this host accepts mail for: the config's plus the directory's."""
    return {canonical_domain(d) for d in config.domains} | set(directory.list_domains())
