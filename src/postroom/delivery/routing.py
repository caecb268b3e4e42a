"""Next-hop lookup for a recipient domain: local, a static route, MX records, or a failure.

RFC 5321 5.1 is the recipe: look up the domain's MX records, try them in
order of preference (randomizing those of equal preference), each MX host's
addresses in turn; with no MX records the domain's own A/AAAA records are an
"implicit MX" of preference 0. RFC 7505 adds the null MX (a single "." MX of
preference 0): the domain takes no mail at all. A static route (the
config's [routes]) replaces the MX lookup for its domain, and a domain
literal ([192.0.2.1], RFC 5321 4.1.3) names its one host directly. The
router gets its settings as values (RouterOptions), never the config.

The router never connects anywhere; it returns the hops to try and leaves
connecting to the remote courier. DNS answers are cached for their TTL, capped
at a few minutes, so a queue run over many messages to one domain asks once.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import itertools
import random
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import dns.exception
import dns.name

from postroom import resolver as dns_resolver
from postroom.canonical import canonical_domain
from postroom.delivery.smtp_out import Hop

MAX_HOPS = 10  # addresses tried per delivery attempt; the queue retries the rest later
MAX_CACHE_TTL = dns_resolver.MAX_CACHE_TTL  # a new MX takes effect within five minutes
DNS_LIFETIME = dns_resolver.DNS_LIFETIME
# RFC 6761 6.3: "localhost" names the loopback host; it is never sent to DNS.
LOCALHOST_ADDRESSES = ("127.0.0.1", "::1")


# -- what a lookup can return --------------------------------------------------


@dataclass(frozen=True)
class Local:
    """The domain is one of ours: the local courier delivers its mail."""


@dataclass(frozen=True)
class Hops:
    """The hosts to try, in order; the first that takes the message ends the attempt."""

    hops: list[Hop]


@dataclass(frozen=True)
class Failure:
    """No hop to try: permanent (bounce now) or temporary (the queue tries again)."""

    permanent: bool
    dsn_status: str  # RFC 3463
    text: str


RouteResult = Local | Hops | Failure


class RouteTarget(Protocol):
    """A static next hop (the config's Route): a smarthost may insist on TLS and take
    a login (RFC 4954)."""

    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def tls(self) -> str: ...  # "opportunistic" | "required" | "none"
    @property
    def auth(self) -> tuple[str, str] | None: ...  # (user, password)


@dataclass(frozen=True)
class RouterOptions:
    """Where mail goes: the static routes, the DNS servers, and who this host is."""

    routes: Mapping[str, RouteTarget] = field(default_factory=dict)  # domain -> next hop
    nameservers: Sequence[Any] = ()  # objects with .host and .port; none: the system's
    mx_port: int = 25  # RFC 5321 4.5.4: the port of hosts found by MX lookup
    # Itself, for loop detection (RFC 5321 5.1): its name, and its listeners'
    # addresses (a host name or a wildcard address is not recognised).
    own_hostname: str | None = None
    own_endpoints: Collection[tuple[str, int]] = ()
    dns_lifetime: float = DNS_LIFETIME
    max_cache_ttl: float = MAX_CACHE_TTL


@functools.lru_cache(maxsize=1024)
def _is_ip(text: str) -> bool:
    # Asked for every message sent through a static route: ipaddress learns the
    # answer from an exception, which is slow, and routes are few.
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


# -- the router --------------------------------------------------------------------


class Router:
    """Finds where mail for a domain goes (see the module docstring)."""

    def __init__(
        self,
        options: RouterOptions,
        local_domains: Callable[[str], bool],
        *,
        rng: random.Random | None = None,
        resolver: dns_resolver.Resolver | None = None,
    ) -> None:
        self._routes = {canonical_domain(d): target for d, target in options.routes.items()}
        self._mx_port = options.mx_port
        self._is_local = local_domains
        # RFC 5321 5.1: a relay that finds itself in a domain's MX list must
        # drop that record and every one with the same or a higher preference.
        own_name = options.own_hostname
        self._own_name = own_name.lower().rstrip(".") if own_name else None
        self._own_endpoints = {(str(ipaddress.ip_address(h)), p)
                               for h, p in options.own_endpoints if _is_ip(h)}
        self._rng = rng if rng is not None else random.Random()
        self._resolver: dns_resolver.Resolver | None = resolver
        self._resolver_error: str | None = None
        if resolver is None:
            try:
                self._resolver = dns_resolver.make_resolver(
                    options.nameservers,
                    lifetime=options.dns_lifetime,
                    max_ttl=options.max_cache_ttl,
                )
            except dns.exception.DNSException as e:
                # No /etc/resolv.conf: start anyway; remote mail waits in the queue.
                self._resolver_error = f"no DNS resolver configured ({e})"

    async def route(self, domain: str) -> RouteResult:
        """Where mail for `domain` goes now: Local(), Hops([...]) or Failure(...)."""
        try:
            domain = canonical_domain(domain)
        except ValueError:
            return Failure(True, "5.1.2", f"{domain!r} is not a valid domain name")
        if self._is_local(domain):
            return Local()
        static = self._routes.get(domain)
        if static is not None:
            return await self._static(domain, static)
        if domain.startswith("["):
            # RFC 5321 4.1.3: [192.0.2.1] or [IPv6:2001:db8::1] names the host itself.
            inner = domain[1:-1]
            address = inner[5:] if inner[:5].lower() == "ipv6:" else inner
            return Hops([Hop(host=address, port=self._mx_port, name=address)])
        return await self._mx(domain)

    # -- static routes

    async def _static(self, domain: str, target: RouteTarget) -> RouteResult:
        tls, auth = target.tls, target.auth
        host = target.host.lower().rstrip(".")
        if _is_ip(host):
            return Hops([Hop(host=host, port=target.port, name=host, tls=tls, auth=auth)])
        if host == "localhost" or host.endswith(".localhost"):
            addresses: list[str] = list(LOCALHOST_ADDRESSES)
        else:
            addresses, trouble = await self._addresses(host)
            if not addresses:
                # A route the administrator wrote is worth waiting for, never a bounce.
                why = trouble or "it has no A or AAAA record"
                return Failure(
                    False, "4.4.3", f"static route for {domain}: cannot resolve {host}: {why}"
                )
        hops = [Hop(host=a, port=target.port, name=host, tls=tls, auth=auth) for a in addresses]
        return Hops(hops[: MAX_HOPS])

    # -- MX lookup

    async def _mx(self, domain: str) -> RouteResult:
        if self._resolver_error is not None:
            return Failure(False, "4.4.3", self._resolver_error)
        try:
            records = await self._query(domain, "MX")
        except dns_resolver.NXDOMAIN:
            return Failure(True, "5.1.2", f"domain {domain} does not exist (DNS: NXDOMAIN)")
        except dns_resolver.DNSTrouble as e:
            return Failure(False, "4.4.3", f"DNS lookup of MX records for {domain} failed: {e}")
        if not records:
            return await self._implicit_mx(domain)
        mxs = sorted((int(r.preference), r.exchange) for r in records)
        if len(mxs) == 1 and mxs[0][0] == 0 and mxs[0][1] == dns.name.root:
            # RFC 7505 3, 4.1: the domain says it accepts no mail; 556 5.1.10 is the reply
            # a client reports for it (RFC 7505 4.3, RFC 7504).
            return Failure(
                True, "5.1.10", f"556 5.1.10 {domain} does not accept mail (null MX, RFC 7505)"
            )
        # A "." among other MX records names no host (RFC 7505 3: it must stand alone).
        ordered = self._order([(p, x) for p, x in mxs if x != dns.name.root])
        names = [(pref, x.to_text(omit_final_dot=True).lower()) for pref, x in ordered]
        looked_up = await asyncio.gather(*(self._addresses(name) for _, name in names))

        # RFC 5321 5.1: discard ourselves and every MX not better than us.
        own_pref = min(
            (
                pref for (pref, name), (addrs, _) in zip(names, looked_up, strict=True)
                if self._is_own(name, addrs)
            ),
            default=None,
        )
        hops: list[Hop] = []
        seen: set[str] = set()  # two MX names for one address: one try is enough
        unusable: list[str] = []
        for (pref, name), (addrs, trouble) in zip(names, looked_up, strict=True):
            if own_pref is not None and pref >= own_pref:
                continue
            if not addrs:
                unusable.append(f"{name}: {trouble or 'no address'}")
            hops.extend(
                Hop(host=a, port=self._mx_port, name=name) for a in addrs if a not in seen
            )
            seen.update(addrs)
        if not hops:
            if own_pref is not None:
                return Failure(
                    True, "5.4.6", f"mail for {domain} loops back to myself (best MX is this host)"
                )
            # RFC 5321 5.1: MX records without a usable host are an error; addresses
            # may appear later (a zone being fixed), so the queue tries again.
            return Failure(
                False, "4.4.3",
                f"no MX host of {domain} has an address ({'; '.join(unusable)})",
            )
        return Hops(hops[: MAX_HOPS])

    async def _implicit_mx(self, domain: str) -> RouteResult:
        # RFC 5321 5.1: no MX records: the domain's own address, as if an MX of
        # preference 0 pointed at it.
        addresses, trouble = await self._addresses(domain)
        if not addresses:
            if trouble:
                return Failure(False, "4.4.3", f"DNS lookup of {domain} failed: {trouble}")
            return Failure(
                True, "5.1.2", f"domain {domain} has no MX and no A/AAAA record: it takes no mail"
            )
        if self._is_own(domain, addresses):
            return Failure(True, "5.4.6", f"mail for {domain} loops back to myself")
        hops = [Hop(host=a, port=self._mx_port, name=domain) for a in addresses]
        return Hops(hops[: MAX_HOPS])

    def _order(self, mxs: list[tuple[int, dns.name.Name]]) -> list[tuple[int, dns.name.Name]]:
        """Preference order, with equal preferences shuffled (RFC 5321 5.1, to spread load)."""
        ordered: list[tuple[int, dns.name.Name]] = []
        for _preference, same in itertools.groupby(mxs, key=lambda mx: mx[0]):
            group = list(same)
            self._rng.shuffle(group)
            ordered.extend(group)
        return ordered

    def _is_own(self, name: str, addresses: list[str]) -> bool:
        if self._own_name is not None and name == self._own_name:
            return True
        return any((a, self._mx_port) in self._own_endpoints for a in addresses)

    async def _addresses(self, host: str) -> tuple[list[str], str | None]:
        """The IPv4 then IPv6 addresses of `host`, and what went wrong if a lookup failed.

        Both lookups run at once; one family answering is enough.
        """
        results = await asyncio.gather(
            self._query(host, "A"), self._query(host, "AAAA"), return_exceptions=True
        )
        addresses: list[str] = []
        trouble: str | None = None
        for result in results:
            if isinstance(result, dns_resolver.NXDOMAIN):
                continue
            if isinstance(result, dns_resolver.DNSTrouble):
                trouble = str(result)
            elif isinstance(result, BaseException):
                raise result
            else:
                addresses.extend(r.address for r in result)
        return addresses, trouble

    async def _query(self, name: str, rdtype: str) -> list[Any]:
        """The records of one type ([] when the name has none); NXDOMAIN or DNSTrouble."""
        if self._resolver is None:
            raise dns_resolver.DNSTrouble(self._resolver_error or "no DNS resolver")
        return await dns_resolver.lookup(self._resolver, name, rdtype)
