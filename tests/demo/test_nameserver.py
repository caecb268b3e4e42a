"""The demo's DNS server answers like an authoritative one (RFC 1034 4.3.2, RFC 2308)."""

from __future__ import annotations

import asyncio

import dns.asyncresolver
import dns.flags
import dns.message
import dns.nameserver
import dns.rcode
import dns.rdatatype
import dns.resolver
import pytest

from postroom.demo.nameserver import DemoDNS, Zone, mail_zone, start_dns


async def resolve(port: int, name: str, rdtype: str) -> dns.resolver.Answer:
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = [dns.nameserver.Do53Nameserver("127.0.0.1", port)]
    resolver.lifetime = 5
    return await resolver.resolve(name, rdtype, raise_on_no_answer=False)


def test_dns_server_answers_mx_a_nodata_nxdomain_refused() -> None:
    async def scenario() -> None:
        server = await start_dns(mail_zone("corp.example", "mx.corp.example", "127.0.0.1"))
        port = server.address[1]
        try:
            mx = await resolve(port, "corp.example", "MX")
            assert mx.response.flags & dns.flags.AA
            assert [(r.preference, r.exchange.to_text()) for r in mx] == [
                (10, "mx.corp.example.")]
            assert [r.address for r in await resolve(port, "mx.corp.example", "A")] == [
                "127.0.0.1"]
            nodata = await resolve(port, "mx.corp.example", "AAAA")
            assert nodata.rrset is None
            assert nodata.response.authority[0].rdtype == dns.rdatatype.SOA  # RFC 2308 3
            with pytest.raises(dns.resolver.NXDOMAIN):
                await resolve(port, "nobody.corp.example", "A")
            with pytest.raises(dns.resolver.NoNameservers):  # REFUSED: not our zone
                await resolve(port, "example.org", "A")
            assert [(q.qname, q.qtype, q.rcode) for q in server.queries] == [
                ("corp.example", "MX", "NOERROR"), ("mx.corp.example", "A", "NOERROR"),
                ("mx.corp.example", "AAAA", "NOERROR"),
                ("nobody.corp.example", "A", "NXDOMAIN"), ("example.org", "A", "REFUSED")]
            assert server.queries[0].records == ("corp.example. 300 IN MX 10 mx.corp.example.",)
        finally:
            server.close()

    asyncio.run(scenario())


def test_dns_server_drops_garbage_and_responses() -> None:
    server = DemoDNS(mail_zone("corp.example", "mx.corp.example", "127.0.0.1"))
    assert server.answer(b"\x00\x01junk") is None
    query = dns.message.make_query("corp.example", "MX")
    response = dns.message.make_response(query)
    assert server.answer(response.to_wire()) is None
    reply = server.answer(query.to_wire())
    assert reply is not None
    assert dns.message.from_wire(reply).rcode() == dns.rcode.NOERROR


def test_empty_non_terminal_is_nodata_not_nxdomain() -> None:
    zone = Zone("example", {("a.b.example", "A"): ["192.0.2.1"]})
    response, note = zone.respond(dns.message.make_query("b.example", "A"))
    assert response.rcode() == dns.rcode.NOERROR and not response.answer
    assert note is not None and note.rcode == "NOERROR"
    with pytest.raises(ValueError, match="outside the zone"):
        Zone("example", {("corp.test", "A"): ["192.0.2.1"]})
