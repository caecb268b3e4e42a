"""DNS lists of client addresses (DNSBL, DNSWL): weighted sites, a score, a verdict.

Sites are written as Postfix's postscreen_dnsbl_sites writes them:
`ZONE[=FILTER][*WEIGHT]`. The client's address is asked for as RFC 5782 2
says (IPv4 octets reversed, IPv6 nibbles reversed, then the zone); a site
counts its weight once when any of its A records passes its filter (RFC 5782
2.3: answers are in 127.0.0.0/8; a filter such as 127.0.0.[2..11] keeps the
codes that mean "listed"). A negative weight makes an allowlist. A list that
fails or has not answered within the timeout counts as not listing the
client: a DNS fault must never turn mail away. A verdict is kept VERDICT_TTL
for the client's next connections (a list that timed out is asked again).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from postroom.resolver import NXDOMAIN, DNSTrouble, Resolver, lookup

log = logging.getLogger("postroom.dnsbl")

# A client's verdict is kept this long, as postscreen keeps its DNSBL result for at
# least postscreen_dnsbl_min_ttl (60 s); the resolver's cache below honours each
# record's own TTL (and NXDOMAIN's, RFC 2308 5) when it asks again.
VERDICT_TTL = 60.0
MAX_VERDICTS = 100_000  # clients remembered at most; the oldest go first

_SITE = re.compile(r"(?P<zone>[A-Za-z0-9._-]+)(?:=(?P<filter>[0-9.\[\];]+))?"
                   r"(?:\*(?P<weight>-?[0-9]+))?")
_RANGE = re.compile(r"([0-9]+)(?:\.\.([0-9]+))?")


def _octet(text: str) -> frozenset[int]:
    """One octet of a filter: N, or [N..M;K;...] (ranges and single values)."""
    inner = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    values: set[int] = set()
    for part in inner.split(";"):
        m = _RANGE.fullmatch(part)
        if not m:
            raise ValueError(f"{text!r} is not an octet, [N..M] or [N;M]")
        low, high = int(m.group(1)), int(m.group(2) or m.group(1))
        if not 0 <= low <= high <= 255:
            raise ValueError(f"{text!r}: octets are 0-255, low to high")
        values.update(range(low, high + 1))
    return frozenset(values)


@dataclass(frozen=True)
class Site:
    """One DNS list: its zone, the answers that count (None: any) and its weight."""

    zone: str
    filter: tuple[frozenset[int], ...] | None = None
    weight: int = 1
    text: str = field(default="", compare=False)

    def counts(self, answer: str) -> bool:
        if self.filter is None:
            return True
        try:
            octets = [int(o) for o in answer.split(".")]
        except ValueError:
            return False
        return len(octets) == 4 and all(o in allowed for o, allowed in zip(octets, self.filter,
                                                                             strict=True))


def parse_site(text: str) -> Site:
    """`zen.example=127.0.0.[2..11]*3` (ValueError naming the fault)."""
    m = _SITE.fullmatch(text.strip())
    if not m:
        raise ValueError(f"{text!r} is not ZONE[=FILTER][*WEIGHT]")
    zone = m.group("zone").strip(".").lower()
    if not zone or ".." in zone:
        raise ValueError(f"{text!r}: no zone name")
    pattern = None
    if m.group("filter"):
        parts = re.findall(r"\[[^\]]*\]|[^.\[\]]+", m.group("filter"))
        if len(parts) != 4:
            raise ValueError(f"{text!r}: a filter has four octets, as 127.0.0.[2..11]")
        pattern = tuple(_octet(p) for p in parts)
    weight = int(m.group("weight")) if m.group("weight") else 1
    if weight == 0:
        raise ValueError(f"{text!r}: a weight of 0 counts for nothing")
    return Site(zone, pattern, weight, text)


def query_name(address: str, zone: str) -> str:
    """RFC 5782 2.1 and 2.4: the name to look up for `address` in `zone`."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if isinstance(ip, ipaddress.IPv4Address):
        labels = reversed(str(ip).split("."))
    else:
        labels = reversed(ip.exploded.replace(":", ""))
    return ".".join(labels) + f".{zone}."


@dataclass(frozen=True)
class Verdict:
    """The score of a client and the sites that listed it, with their answers."""

    score: int
    listed: tuple[tuple[Site, str], ...]
    blocked: bool
    allowed: bool

    def blocking_zones(self) -> list[str]:
        return list(dict.fromkeys(site.zone for site, _ in self.listed if site.weight > 0))

    def summary(self) -> str:
        shown = ", ".join(f"{site.zone}={answer}" for site, answer in self.listed)
        return f"score={self.score}" + (f" ({shown})" if shown else "")


NOT_LISTED = Verdict(0, (), False, False)
TIMED_OUT = object()  # a list that gave no answer: not listed, and not remembered


class DNSLists:
    """Asks every site at once and adds up the weights (postscreen's DNSBL test)."""

    def __init__(self, sites: tuple[str, ...], threshold: int, allowlist_threshold: int,
                 resolver: Resolver | None, timeout: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.sites = [parse_site(s) for s in sites]
        self.threshold = threshold
        self.allowlist_threshold = allowlist_threshold
        self.resolver = resolver
        self.timeout = timeout
        self._clock = clock
        self._verdicts: dict[str, tuple[float, Verdict]] = {}  # address -> (expiry, verdict)

    @property
    def active(self) -> bool:
        return bool(self.sites) and self.resolver is not None

    async def check(self, address: str) -> Verdict:
        if not self.active:
            return NOT_LISTED
        now = self._clock()
        known = self._verdicts.get(address)
        if known is not None and known[0] > now:
            return known[1]
        results = await asyncio.gather(*(self._ask(site, address) for site in self.sites))
        listed = tuple((site, answer) for site, answer in zip(self.sites, results, strict=True)
                       if isinstance(answer, str))
        score = sum(site.weight for site, _ in listed)
        verdict = Verdict(score, listed, score >= self.threshold,
                          score <= self.allowlist_threshold)
        if TIMED_OUT not in results:
            self._verdicts.pop(address, None)
            self._verdicts[address] = (now + VERDICT_TTL, verdict)
            while len(self._verdicts) > MAX_VERDICTS:
                del self._verdicts[next(iter(self._verdicts))]
        return verdict

    async def _ask(self, site: Site, address: str) -> str | None | object:
        """The first answer of `site` for `address` that passes its filter, None, or
        TIMED_OUT."""
        assert self.resolver is not None
        name = query_name(address, site.zone)
        try:
            records = await asyncio.wait_for(lookup(self.resolver, name, "A"), self.timeout)
        except NXDOMAIN:
            return None
        except (DNSTrouble, TimeoutError) as exc:
            log.info("dnsbl: %s did not answer for [%s]: %s (not listed)", site.zone, address,
                     exc or "timeout")
            return TIMED_OUT
        for record in records:
            if site.counts(str(record)):
                return str(record)
        return None
