"""The store's shared types: what every user directory answers with, and refuses with.

`UserDirectory` is the interface the server and the CLI use; its embedded
backend is postroom.store.users (SQLite).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from postroom.addresses import canonical, split


class DirectoryError(Exception):
    """A user-directory operation was refused; str() is one line that says why."""


class UnknownDomainError(DirectoryError):
    pass


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
    def targets(self) -> list[str]:
        return [*self.mailboxes, *self.remote]

    @property
    def broken(self) -> bool:
        """An alias that exists but reaches no one: its targets are gone or loop."""
        return not self.mailboxes and not self.remote


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
