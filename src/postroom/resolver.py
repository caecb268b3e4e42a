"""The one asynchronous DNS resolver: the configured nameservers, a TTL cache, timeouts.

Every DNS question postroom asks (MX routing, and any check that needs DNS)
goes through a resolver made here, so a slow or dead server is bounded by one
lifetime, answers are cached for their TTL (RFC 2308 5 for negative answers)
capped at `max_ttl`, and no lookup ever blocks the event loop (dnspython's
asyncio resolver).

`lookup` reduces dnspython's many exceptions to the three outcomes a caller
acts on: records (possibly none), NXDOMAIN (the name does not exist), or
DNSTrouble (may succeed later: timeout, SERVFAIL, REFUSED, no server).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver
from dns.resolver import NXDOMAIN

__all__ = ["DNSTrouble", "NXDOMAIN", "Resolver", "lookup", "lookup_until", "make_resolver"]

MAX_CACHE_TTL = 300.0  # seconds: a DNS change takes effect within five minutes
MAX_MEMO = 10_000  # answers kept by name text, before the memo starts afresh
DNS_LIFETIME = 10.0  # seconds for one lookup, all retries included
TRY_TIMEOUT = 2.0  # seconds per try; the lifetime bounds the retries

Resolver = dns.asyncresolver.Resolver


class DNSTrouble(Exception):
    """A lookup that may succeed later: timeout, SERVFAIL, REFUSED, no server reachable."""


class _CappedCache(dns.resolver.Cache):
    """dnspython's TTL-honouring cache, with every entry's life capped at max_ttl.

    dnspython keeps positive answers for their TTL and negative ones (no such
    name, no such record) for the SOA minimum (RFC 2308 5); the cap keeps a
    zone's week-long TTL from pinning a stale record in a long-running server.
    """

    def __init__(self, max_ttl: float) -> None:
        super().__init__()
        self.max_ttl = max_ttl
        # `lookup`'s answers by (name text, type) until they expire: a hit skips
        # parsing the name and dnspython's cache walk, which cost more than a mail
        # check's own work when every message asks the same few questions.
        self.memo: dict[tuple[str, str], tuple[float, list[Any]]] = {}

    def put(self, key: Any, value: dns.resolver.Answer) -> None:
        value.expiration = min(value.expiration, time.time() + self.max_ttl)
        super().put(key, value)

    def remember(self, name: str, rdtype: str, expiration: float, records: list[Any]) -> None:
        if len(self.memo) >= MAX_MEMO:
            self.memo.clear()
        self.memo[(name, rdtype)] = (expiration, records)

    def recall(self, name: str, rdtype: str) -> tuple[list[Any], float] | None:
        known = self.memo.get((name, rdtype))
        if known is None or known[0] <= time.time():
            return None
        return list(known[1]), known[0]

    def flush(self, key: Any = None) -> None:
        self.memo.clear()
        super().flush(key)


def make_resolver(
    nameservers: Sequence[Any] = (),
    *,
    lifetime: float = DNS_LIFETIME,
    max_ttl: float = MAX_CACHE_TTL,
) -> Resolver:
    """An async resolver for `nameservers` (objects with .host and .port).

    No servers: the system's (/etc/resolv.conf); dnspython raises
    NoResolverConfiguration (a DNSException) when there is none.
    """
    if nameservers:
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [
            dns.nameserver.Do53Nameserver(ns.host, ns.port) for ns in nameservers
        ]
    else:
        resolver = dns.asyncresolver.Resolver(configure=True)
    resolver.lifetime = lifetime
    resolver.timeout = min(lifetime, TRY_TIMEOUT)
    resolver.cache = _CappedCache(max_ttl)
    return resolver


def _no_nameservers_text(error: dns.resolver.NoNameservers) -> str:
    # Each entry is (server, tcp, port, error or rcode text, response).
    reasons = []
    for entry in error.kwargs.get("errors") or []:
        problem = entry[3]
        reasons.append(problem if isinstance(problem, str) else type(problem).__name__)
    return ", ".join(dict.fromkeys(reasons)) or "no nameserver answered"


async def lookup(resolver: Resolver, name: str, rdtype: str) -> list[Any]:
    """The records of one type at `name` ([] when it has none); NXDOMAIN or DNSTrouble.

    The name is absolute: never completed with a search-list suffix. A CNAME
    chain is followed and ends in records of the asked type, or in none.
    """
    records, _expiration = await lookup_until(resolver, name, rdtype)
    return records


async def lookup_until(resolver: Resolver, name: str, rdtype: str) -> tuple[list[Any], float]:
    """`lookup`, and the time (time.time()) until which the answer holds: what is
    derived from it may be kept as long."""
    cache = resolver.cache
    if isinstance(cache, _CappedCache):
        known = cache.recall(name, rdtype)
        if known is not None:
            return known
    try:
        qname = dns.name.from_text(name)
    except dns.exception.DNSException as e:
        raise DNSTrouble(f"{rdtype} lookup of {name!r}: not a DNS name ({e})") from None
    try:
        answer = await resolver.resolve(
            qname, dns.rdatatype.from_text(rdtype), search=False, raise_on_no_answer=False
        )
    except NXDOMAIN:
        raise
    except dns.exception.Timeout:
        raise DNSTrouble(f"{rdtype} lookup of {name} timed out") from None
    except dns.resolver.NoNameservers as e:
        raise DNSTrouble(f"{rdtype} lookup of {name}: {_no_nameservers_text(e)}") from None
    except dns.exception.DNSException as e:
        raise DNSTrouble(f"{rdtype} lookup of {name}: {e}") from None
    records = [] if answer.rrset is None else list(answer.rrset)
    if isinstance(cache, _CappedCache):
        cache.remember(name, rdtype, answer.expiration, records)
    return list(records), answer.expiration
