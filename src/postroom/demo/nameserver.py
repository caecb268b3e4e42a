"""The demo's DNS server: one zone, authoritative, on loopback, so the MX lookup is real.

It serves a table of records over UDP on a free high port (no root needed),
with answers built by dnspython, as an authoritative server does (RFC 1034
4.3.2, RFC 2308): the records asked for with the AA flag; NODATA (no answer,
the zone's SOA) for a name in the zone without records of the type; NXDOMAIN
with the SOA for a name that does not exist; REFUSED outside the zone, since it
is no resolver. `queries` keeps every question it answered and what it said.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import cast

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

TTL = 300  # seconds; the demo's hosts live for seconds, caching is harmless


@dataclass(frozen=True)
class Answered:
    """One question the server answered: what was asked and what it said."""

    qname: str  # without the final dot, lower-case
    qtype: str  # "MX", "A", ...
    rcode: str  # "NOERROR", "NXDOMAIN", "REFUSED", ...
    records: tuple[str, ...]  # the answer section, one record per line, zone-file style


class Zone:
    """A zone's records: {(name, type): [rdata text]}, names absolute (final dot optional)."""

    def __init__(self, origin: str, records: Mapping[tuple[str, str], Sequence[str]]) -> None:
        self._origin = dns.name.from_text(origin)
        # A name exists when it owns records or a name below it does (an "empty
        # non-terminal", RFC 8020): both get NODATA, never NXDOMAIN.
        self._names = {self._origin}
        self._rrsets: dict[tuple[dns.name.Name, int], dns.rrset.RRset] = {}
        for (name, rdtype), values in records.items():
            owner = dns.name.from_text(name)
            if not owner.is_subdomain(self._origin):
                raise ValueError(f"{name} is outside the zone {origin}")
            self._rrsets[(owner, dns.rdatatype.from_text(rdtype))] = dns.rrset.from_text_list(
                owner, TTL, dns.rdataclass.IN, rdtype, list(values))
            while owner != self._origin:
                self._names.add(owner)
                owner = owner.parent()
        # RFC 2308 3: negative answers carry the zone's SOA, whose last field is
        # the TTL for caching the "no".
        self._soa = dns.rrset.from_text(
            self._origin, TTL, dns.rdataclass.IN, dns.rdatatype.SOA,
            f"ns.{self._origin} hostmaster.{self._origin} 1 3600 600 86400 {TTL}",
        )
        self._rrsets.setdefault((self._origin, dns.rdatatype.SOA), self._soa)

    @property
    def origin(self) -> dns.name.Name:
        return self._origin

    def respond(self, query: dns.message.Message) -> tuple[dns.message.Message, Answered | None]:
        """The response to a parsed query, and a note of it (None for non-queries)."""
        response = dns.message.make_response(query)
        response.flags &= ~dns.flags.RA  # no recursion here
        if query.opcode() != dns.opcode.QUERY or len(query.question) != 1:
            response.set_rcode(dns.rcode.NOTIMP if query.opcode() != dns.opcode.QUERY
                               else dns.rcode.FORMERR)
            return response, None
        question = query.question[0]
        qname, qtype = question.name, question.rdtype
        if question.rdclass != dns.rdataclass.IN or not qname.is_subdomain(self._origin):
            response.set_rcode(dns.rcode.REFUSED)
        elif (rrset := self._rrsets.get((qname, qtype))) is not None:
            response.flags |= dns.flags.AA
            response.answer.append(rrset)
        else:
            response.flags |= dns.flags.AA
            response.authority.append(self._soa)
            if qname not in self._names:
                response.set_rcode(dns.rcode.NXDOMAIN)
        records = tuple(line for rrs in response.answer for line in rrs.to_text().splitlines())
        return response, Answered(qname.to_text(omit_final_dot=True).lower(),
                                  dns.rdatatype.to_text(qtype),
                                  dns.rcode.to_text(response.rcode()), records)


class Zones:
    """Several zones served together (a forward zone and its reverse one): each
    question goes to the zone that holds its name; REFUSED when none does."""

    def __init__(self, *zones: Zone) -> None:
        self._zones = zones

    def respond(self, query: dns.message.Message) -> tuple[dns.message.Message, Answered | None]:
        if len(query.question) == 1:
            qname = query.question[0].name
            for zone in sorted(self._zones, key=lambda z: -len(z.origin)):
                if qname.is_subdomain(zone.origin):
                    return zone.respond(query)
        return self._zones[0].respond(query)


class DemoDNS(asyncio.DatagramProtocol):
    """The running server: `address`, the `queries` it answered, `close()`."""

    def __init__(self, zone: Zone | Zones) -> None:
        self.zone = zone
        self.queries: list[Answered] = []
        self._transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not every loop's UDP transport subclasses DatagramTransport (asyncio's own
        # does not), so no isinstance check: it has sendto, which is all we use.
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        reply = self.answer(data)
        if reply is not None and self._transport is not None:
            self._transport.sendto(reply, addr)

    def answer(self, data: bytes) -> bytes | None:
        """The wire reply to one datagram, or None to drop it (garbage, or a response)."""
        try:
            query = dns.message.from_wire(data)
        except dns.exception.DNSException:
            return None  # not even a header to answer FORMERR to
        if query.flags & dns.flags.QR:
            return None  # a response: answering it could start a loop
        response, note = self.zone.respond(query)
        if note is not None:
            self.queries.append(note)
        return response.to_wire()

    @property
    def address(self) -> tuple[str, int]:
        if self._transport is None:
            raise RuntimeError("the DNS server is not started")
        host, port = self._transport.get_extra_info("sockname")[:2]
        return str(host), int(port)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None


def mail_zone(domain: str, mx_host: str, address: str) -> Zone:
    """The zone `example`, where `domain`'s mail goes to `mx_host` (MX 10) at `address` (A)."""
    return Zone("example", {
        (domain, "MX"): [f"10 {mx_host}."],
        (mx_host, "A"): [address],
    })


async def start_dns(zone: Zone | Zones, host: str = "127.0.0.1", port: int = 0) -> DemoDNS:
    """Serve `zone` on host:port (0: a free port); see DemoDNS.address."""
    server = DemoDNS(zone)
    loop = asyncio.get_running_loop()
    await loop.create_datagram_endpoint(lambda: server, local_addr=(host, port))
    return server
