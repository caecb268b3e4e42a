"""Alias expansion: where mail for a local address goes, whichever backend holds the entries.

An address is a user (its own mailbox), an alias (its targets, expanded in
turn), ``user+detail`` for a user (RFC 5233 subaddress), postmaster@ a local
domain with neither (the administrator's mailbox, RFC 5321 4.5.1), or unknown.
"""

from __future__ import annotations

from typing import Protocol

from postroom.canonical import split
from postroom.store.api import DirectoryError, Expansion

MAX_ALIAS_DEPTH = 10  # nesting limit for alias chains (sendmail's MaxAliasRecursion default)
SUBADDRESS_DELIMITER = "+"  # RFC 5233 subaddress: user+detail@domain
POSTMASTER = "postmaster"  # RFC 5321 4.5.1: the mailbox every domain must have (any case)


class Entries(Protocol):
    """What expansion reads of a directory, in one consistent view."""

    def has_domain(self, domain: str) -> bool: ...
    def is_user(self, address: str) -> bool: ...
    def alias_targets(self, address: str) -> list[str] | None: ...


def expand(
    entries: Entries, key: str, postmaster: str | None, chain: tuple[str, ...] = ()
) -> Expansion | None:
    """Expand the local address `key` (local_address form), reached through the aliases
    in `chain`; None when it is unknown. `postmaster`: the administrator's mailbox."""
    walk = _Walk(entries, postmaster)
    if not walk.address(key, len(chain), chain):
        return None
    return Expansion(tuple(walk.mailboxes), tuple(walk.remote), tuple(walk.unknown),
                     tuple(walk.loops))


class _Walk:
    """One expansion: the buckets it fills, in the order addresses are met."""

    def __init__(self, entries: Entries, postmaster: str | None) -> None:
        self.entries = entries
        self.postmaster = postmaster
        self.mailboxes: list[str] = []
        self.remote: list[str] = []
        self.unknown: list[str] = []
        self.loops: list[str] = []

    @staticmethod
    def _add(bucket: list[str], item: str) -> None:
        if item not in bucket:
            bucket.append(item)

    def address(self, addr: str, depth: int, chain: tuple[str, ...]) -> bool:
        """Expand one address; False when it is local and unknown."""
        local, domain = split(addr)
        entries = self.entries
        if not entries.has_domain(domain):
            self._add(self.remote, addr)
            return True
        addr = f"{local.lower()}@{domain}"
        is_user = entries.is_user(addr)
        if addr in chain:
            # A loop. "a -> a, b" is the usual way to keep a copy while
            # forwarding, so an address met again is its own mailbox if it
            # is a user, and a loop that reaches no one otherwise.
            self._add(self.mailboxes if is_user else self.loops, addr)
            return True
        targets = entries.alias_targets(addr)
        if targets is not None:  # an alias shadows a user of the same name
            if depth >= MAX_ALIAS_DEPTH:
                self._add(self.unknown, addr)
                return True
            for target in targets:
                if not self.address(target, depth + 1, (*chain, addr)):
                    self._add(self.unknown, target)
            return True
        if is_user:
            self._add(self.mailboxes, addr)
            return True
        base, plus, _detail = local.partition(SUBADDRESS_DELIMITER)
        if plus and base:
            return self.address(f"{base}@{domain}", depth, chain)
        if local.lower() == POSTMASTER and self.postmaster is not None:
            return self._administrator(self.postmaster, addr, depth, chain)
        return False

    def _administrator(self, admin: str, addr: str, depth: int, chain: tuple[str, ...]) -> bool:
        """postmaster@ a local domain that has no user or alias of that name (RFC 5321
        4.5.1): the administrator's mailbox, followed like any address. When that is
        no user or alias either (or is this very postmaster), its own folder:
        postmaster never lacks a mailbox."""
        if admin in chain:  # the administrator's own alias leads back here
            return self.address(admin, depth + 1, (*chain, addr))
        if admin != addr and self.entries.has_domain(split(admin)[1]) and self.address(
            admin, depth + 1, (*chain, addr)
        ):
            return True
        self._add(self.mailboxes, admin)
        return True


def check_alias_target(entries: Entries, source: str, target: str, postmaster: str | None) -> None:
    """DirectoryError unless mail from alias `source` to `target` reaches a mailbox (or
    an address on another host, to which it is forwarded)."""
    found = expand(entries, target, postmaster, chain=(source,))
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
