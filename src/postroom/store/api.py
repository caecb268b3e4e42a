"""The store interface: what the server, POP3 and the CLI ask of users and mailboxes.

postroom.store.factory.open_store builds a `Store` (the `Directory` the server asks,
the `UserDirectory` the CLI changes, the `Mailboxes`) from `StoreSettings`, values
the config gives. Storage faults are OSError everywhere: callers answer them with
a temporary failure (451 4.3.0, -ERR [SYS/TEMP]) and lose nothing.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from postroom.canonical import canonical, canonical_domain, split


class DirectoryError(Exception):
    """A user-directory operation was refused; str() is one line that says why."""


class MaildropBusy(Exception):
    """Another session holds this maildrop (answered with -ERR [IN-USE], RFC 2449 8.1.2)."""


def local_address(address: str) -> str:
    """Canonical form with a lower-case local part: the key of users and aliases.

    Local parts of virtual users compare case-insensitively, as Postfix and
    Dovecot do by default, though RFC 5321 2.4 lets a host treat them as
    case-sensitive. ValueError for what is no address.
    """
    local, domain = split(canonical(address))
    return f"{local.lower()}@{domain}"


def user_key(address: str) -> str | None:
    """`local_address`, or None for what is no address."""
    try:
        return local_address(address)
    except ValueError:
        return None


@dataclass(frozen=True)
class Expansion:
    """Where mail for one address goes, sorted out by kind (order kept, no repeats)."""

    mailboxes: tuple[str, ...]  # local users' mailbox addresses
    remote: tuple[str, ...]  # addresses outside the local domains (to relay)
    unknown: tuple[str, ...]  # alias targets in a local domain that nobody owns,
    # or chains deeper than MAX_ALIAS_DEPTH: mail for them cannot be delivered
    loops: tuple[str, ...] = ()  # aliases (not users) met again inside their own expansion

    @property
    def broken(self) -> bool:
        """An alias that exists but reaches no one: its targets are gone or loop."""
        return not self.mailboxes and not self.remote


def mailbox_parts(address: str) -> tuple[str, str]:
    """(local part, domain) of an address that can name a mailbox in either backend:
    its domain already in canonical form (ASCII, lower case, not a literal); else
    ValueError. Each backend adds what its own names forbid in the local part."""
    local, domain = split(address)
    try:
        canon = canonical_domain(domain)
    except ValueError:
        raise ValueError(f"not a mailbox address: {address!r}") from None
    if canon != domain or domain.startswith("["):
        raise ValueError(f"domain is not in canonical form: {address!r}")
    return local, domain


def check_folder(name: str) -> str:
    """`name` if it can name a mailbox folder, else ValueError.

    A Maildir++ folder name: "." separates levels ("Archive.2024"), as Dovecot's
    maildir layout and Courier write them; no level is empty, none is "." or "..",
    and no "/" or control character could move it out of the mailbox.
    """
    bad_char = any(c in "/\\\x7f" or ord(c) < 0x20 for c in name)
    if not name or bad_char or any(level in ("", "..") for level in name.split(".")):
        raise ValueError(f"not usable as a mailbox folder name: {name!r}")
    return name


# -- the user directory -----------------------------------------------------------


class Directory(Protocol):
    """The user directory as the server asks it for every message, on the event loop:
    answered from memory where the backend can, a change made elsewhere seen within
    a second."""

    def is_local_domain(self, domain: str) -> bool:
        """`domain` (canonical) is ours. Synchronous: every recipient asks, and the
        domains are few enough to answer from memory."""

    async def expand(self, address: str) -> Expansion | None:
        """Where mail for `address` goes (aliases, subaddresses); None for no local
        user or alias."""

    async def verify_password(self, address: str, password: str) -> bool:
        """As slow for a user who does not exist (no enumeration by timing)."""

    async def apop_secret(self, address: str) -> str | None:
        """The user's APOP secret (RFC 1939 7) if the user opted in."""


class UserDirectory(Protocol):
    """The user directory as the command line changes it (synchronous); a refused
    change raises DirectoryError saying why."""

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
    def add_alias(
        self, source: str, targets: Iterable[str], *, replace_user: bool = False
    ) -> None: ...
    def remove_alias(self, source: str, targets: Iterable[str] | None = None) -> None: ...
    def list_aliases(self) -> dict[str, list[str]]: ...
    def expand(self, address: str) -> Expansion | None: ...
    def set_apop_secret(self, address: str, secret: str | None) -> None: ...
    def close(self) -> None: ...


# The server's bound on password checks (server.passwords): runs
# verify(address, password) in its turn.
PasswordGate = Callable[[Callable[[str, str], bool], str, str], Awaitable[bool]]


# -- the mailboxes ----------------------------------------------------------------


class Incoming(Protocol):
    """A message being received for local mailboxes, written on the event loop a
    piece at a time; never held whole in memory when large."""

    size: int  # octets written so far, the head left out

    def write(self, data: bytes) -> None:
        """Append `data`, stored as given. OSError: the message cannot be filed."""

    def insert_head(self, data: bytes) -> bool:
        """Put header lines right after the first piece written; False when too late."""

    def chunks(self) -> Iterator[bytes]:
        """The message without the head: the copy to relay. BLOCKING (it may read
        storage): iterate it in a worker thread."""

    async def deliver(self, mailboxes: Sequence[str], folder: str | None = None) -> list[str]:
        """File the message, head first, into each mailbox (one copy per distinct
        one), durably, in a commit shared with other sessions; the copies' names.
        `folder`: into that folder of each mailbox instead of its inbox (a Maildir++
        folder name such as "Junk", made when missing; see `check_folder`).
        All or nothing: OSError after taking back every copy (a retry cannot
        duplicate it); ValueError, before any, for a name no mailbox or folder can have."""

    def original(self) -> bytes | Path:
        """After `deliver`: the message as filed (for a delivery report, RFC 3464)."""

    def abort(self) -> None:
        """Drop what is held of the message (also after `deliver`); safe twice."""


class Later(enum.Enum):
    """`Maildrop.read_now`'s answer for a message that only `read` can get."""

    LATER = "later"


LATER = Later.LATER


class Maildrop(Protocol):
    """One POP3 session's locked snapshot of a mailbox (RFC 1939 8): no other session
    opens it until `close`, and only `update` removes anything. Message N (from 1,
    as at login) is at index N - 1 of `sizes` and `uids`, sequences rather than an
    object per message (a maildrop may hold hundreds of thousands)."""

    @property
    def sizes(self) -> Sequence[int]:
        """Each message's octets as RETR sends them (CRLF line ends, before
        byte-stuffing): what LIST reports (RFC 1939 5)."""

    @property
    def uids(self) -> Sequence[str]:
        """Each message's UIDL (RFC 1939 7): the same in every session."""

    def crlf(self, number: int) -> bool:
        """The stored octets have no bare CR or LF: sent as they are."""

    def read_now(self, number: int, *, seen: bool = True) -> list[bytes] | None | Later:
        """The octets, if they come without waiting on more than local storage, else
        LATER; None when another program removed the message. `seen`: RETR (filed
        as read at QUIT), not TOP. OSError on a storage fault."""

    async def read(self, number: int, *, seen: bool = True) -> list[bytes] | None:
        """`read_now`, waiting where it must."""

    def read_ahead(self, number: int, limit: int) -> None:
        """A hint: `number` is likely asked next; fetch it now if at most `limit`
        octets (a fault is left for the read that follows)."""

    async def update(self, deleted: list[int]) -> int:
        """RFC 1939 6: remove `deleted`, file the messages RETR read as seen, durably;
        how many deletions failed."""

    def close(self) -> None:
        """Release the maildrop (a process that dies releases it too)."""


class Mailboxes(Protocol):
    """Where local mail is filed, and read by POP3."""

    def receive(self, head: bytes = b"") -> Incoming:
        """A new message; `head` heads the filed copies only (RFC 5321 4.4's
        Return-Path)."""

    async def open_maildrop(self, address: str) -> Maildrop:
        """Lock a mailbox for one POP3 session and take its snapshot. MaildropBusy
        while another session has it; OSError, ValueError."""

    async def sweep(self) -> int:
        """Remove what deliveries killed midway left (nothing acknowledged); how many."""

    def close(self) -> None:
        """Finish the commits in hand; take no more."""


@dataclass(frozen=True)
class StoreSettings:
    """What a store is built from: values the config gives (Config.store)."""

    users_db: Path  # the embedded user directory, one SQLite file
    mail_dir: Path  # the embedded mailboxes, one Maildir each below it
    hostname: str  # in the names of filed messages
    domains: tuple[str, ...] = ()  # local domains from the config file, besides the directory's
    postmaster: str | None = None  # the administrator's mailbox (RFC 5321 4.5.1)
    config_source: str = "the config file"  # where those two come from, for messages
    url: str | None = None  # postgresql://...: the PostgreSQL store instead of the two above
    spool_dir: Path | None = None  # the PostgreSQL store's messages being received, when large


class Background(Protocol):
    """What a backend runs while the server runs (PostgreSQL: change notices, lease renewal)."""

    def start(self) -> None:
        """Begin, on the running event loop."""

    async def stop(self) -> None:
        """End, and let go of connections."""


@dataclass(frozen=True)
class Store:
    """One backend's directory (both views) and mailboxes."""

    users: UserDirectory
    directory: Directory
    mailboxes: Mailboxes
    background: tuple[Background, ...] = ()

    def start(self) -> None:
        """Start the backend's background work (server only, on the event loop)."""
        for part in self.background:
            part.start()

    async def stop(self) -> None:
        for part in self.background:
            await part.stop()

    def close(self) -> None:
        self.mailboxes.close()
        self.users.close()
