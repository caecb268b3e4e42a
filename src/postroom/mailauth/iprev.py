"""iprev (RFC 8601 3): the client's forward-confirmed reverse DNS name.

pass: a PTR name of the client's address has an A/AAAA record with that
address; fail: there is no PTR name, or none leads back; temperror: DNS could
not say. `IPRevMemo` keeps each address's result as long as the DNS answers
it came from, so a client that comes back costs no lookup at all.
"""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass

from postroom import resolver as dns_resolver
from postroom.mailauth.spf import ip_of

MAX_PTR_NAMES = 10  # names tried per address, as SPF's ptr limit (RFC 7208 4.6.4)
MAX_REMEMBERED = 10_000  # addresses kept by IPRevMemo before it starts afresh

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class IPRevResult:
    result: str  # pass, fail, temperror
    ip: str
    name: str  # the confirmed name ("" when none)
    reason: str


async def check_iprev(resolver: dns_resolver.Resolver, ip: str) -> IPRevResult:
    result, _until = await _check(resolver, ip_of(ip))
    return result


class IPRevMemo:
    """iprev results by client address, each until the first of its DNS answers expires
    (a result from a negative answer or a DNS error is not kept)."""

    def __init__(self, resolver: dns_resolver.Resolver) -> None:
        self.resolver = resolver
        self._known: dict[Address, tuple[float, IPRevResult]] = {}

    async def check(self, address: Address) -> IPRevResult:
        known = self._known.get(address)
        if known is not None and known[0] > time.time():
            return known[1]
        result, until = await _check(self.resolver, address)
        if until > time.time():
            if len(self._known) >= MAX_REMEMBERED:
                self._known.clear()
            self._known[address] = (until, result)
        return result


async def _check(resolver: dns_resolver.Resolver, address: Address) -> tuple[IPRevResult, float]:
    """The result, and until when it holds (0: not to be kept)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    ip = str(address)
    try:
        ptrs, until = await dns_resolver.lookup_until(resolver, address.reverse_pointer + ".",
                                                      "PTR")
    except dns_resolver.NXDOMAIN:
        return IPRevResult("fail", ip, "", "no PTR record"), 0.0
    except dns_resolver.DNSTrouble as e:
        return IPRevResult("temperror", ip, "", str(e)), 0.0
    if not ptrs:
        return IPRevResult("fail", ip, "", "no PTR record"), until
    rdtype = "A" if address.version == 4 else "AAAA"
    trouble = ""
    for ptr in ptrs[:MAX_PTR_NAMES]:
        name = ptr.target.to_text(omit_final_dot=True).lower()
        try:
            records, expires = await dns_resolver.lookup_until(resolver, name + ".", rdtype)
        except dns_resolver.NXDOMAIN:
            until = 0.0
            continue
        except dns_resolver.DNSTrouble as e:
            trouble, until = str(e), 0.0
            continue
        until = min(until, expires)
        if any(ip_of(r.address) == address for r in records):
            return IPRevResult("pass", ip, name, "forward-confirmed"), until
    if trouble:
        return IPRevResult("temperror", ip, "", trouble), 0.0
    return IPRevResult("fail", ip, "", "no PTR name leads back to the address"), until
