"""iprev (RFC 8601 3): the client's forward-confirmed reverse DNS name.

pass: a PTR name of the client's address has an A/AAAA record with that
address; fail: there is no PTR name, or none leads back; temperror: DNS could
not say.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from postroom import resolver as dns_resolver
from postroom.mailauth.spf import ip_of

MAX_PTR_NAMES = 10  # names tried per address, as SPF's ptr limit (RFC 7208 4.6.4)


@dataclass(frozen=True)
class IPRevResult:
    result: str  # pass, fail, temperror
    ip: str
    name: str  # the confirmed name ("" when none)
    reason: str


async def check_iprev(resolver: dns_resolver.Resolver, ip: str) -> IPRevResult:
    address = ipaddress.ip_address(ip)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    try:
        ptrs = await dns_resolver.lookup(resolver, address.reverse_pointer + ".", "PTR")
    except dns_resolver.NXDOMAIN:
        return IPRevResult("fail", str(address), "", "no PTR record")
    except dns_resolver.DNSTrouble as e:
        return IPRevResult("temperror", str(address), "", str(e))
    if not ptrs:
        return IPRevResult("fail", str(address), "", "no PTR record")
    rdtype = "A" if address.version == 4 else "AAAA"
    trouble = ""
    for ptr in ptrs[:MAX_PTR_NAMES]:
        name = ptr.target.to_text(omit_final_dot=True).lower()
        try:
            records = await dns_resolver.lookup(resolver, name + ".", rdtype)
        except dns_resolver.NXDOMAIN:
            continue
        except dns_resolver.DNSTrouble as e:
            trouble = str(e)
            continue
        if any(ip_of(r.address) == address for r in records):
            return IPRevResult("pass", str(address), name, "forward-confirmed")
    if trouble:
        return IPRevResult("temperror", str(address), "", trouble)
    return IPRevResult("fail", str(address), "", "no PTR name leads back to the address")
