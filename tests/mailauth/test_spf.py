"""SPF (RFC 7208) against a DNS server on loopback: results, limits, loops, macros."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
from dnszone import SERVFAIL, TIMEOUT, TestDNS, serve_dns

from postroom.config.values import Endpoint
from postroom.mailauth import spf
from postroom.resolver import make_resolver

GOOD = "192.0.2.10"
STRANGER = "198.51.100.7"

ZONE: dict[tuple[str, str], list[str]] = {
    ("pass.test", "TXT"): ["v=spf1 ip4:192.0.2.0/24 -all"],
    ("soft.test", "TXT"): ["v=spf1 ip4:192.0.2.10 ~all"],
    ("neutral.test", "TXT"): ["v=spf1 ip4:192.0.2.10 ?all"],
    ("nomatch.test", "TXT"): ["v=spf1 ip4:192.0.2.10"],
    ("other-txt.test", "TXT"): ["google-site-verification=abc", "v=spf10 -all"],
    ("two.test", "TXT"): ["v=spf1 -all", "v=spf1 +all"],
    ("syntax.test", "TXT"): ["v=spf1 ip4:192.0.2.10 frobnicate -all"],
    ("badip.test", "TXT"): ["v=spf1 ip4:300.1.1.1 -all"],
    ("badcidr.test", "TXT"): ["v=spf1 ip4:192.0.2.0/33 -all"],
    ("late-syntax.test", "TXT"): ["v=spf1 +all a:no-top-label"],
    ("servfail.test", "TXT"): [SERVFAIL],
    ("upper.test", "TXT"): ["V=SPF1 IP4:192.0.2.10 -ALL"],
    ("split.test", "TXT"): ["v=spf1 ip4:192.0.2.10 " + " " * 300 + "-all"],
    # a and mx, with and without CIDR
    ("a.test", "TXT"): ["v=spf1 a -all"],
    ("a.test", "A"): [GOOD],
    ("a24.test", "TXT"): ["v=spf1 a:host.a.test/24 -all"],
    ("host.a.test", "A"): ["192.0.2.99"],
    ("mx.test", "TXT"): ["v=spf1 mx -all"],
    ("mx.test", "MX"): ["10 mail.mx.test.", "20 backup.mx.test."],
    ("mail.mx.test", "A"): ["203.0.113.5"],
    ("backup.mx.test", "A"): [GOOD],
    ("ip6.test", "TXT"): ["v=spf1 ip6:2001:db8::/32 a//64 -all"],
    ("ip6.test", "AAAA"): ["2001:db8:1::1"],
    ("ptr.test", "TXT"): ["v=spf1 ptr -all"],
    ("10.2.0.192.in-addr.arpa", "PTR"): ["mail.ptr.test."],
    ("mail.ptr.test", "A"): [GOOD],
    # include and redirect
    ("inc.test", "TXT"): ["v=spf1 include:fail.inc.test include:pass.test -all"],
    ("fail.inc.test", "TXT"): ["v=spf1 -all"],
    ("inc-none.test", "TXT"): ["v=spf1 include:nothing.test -all"],
    ("inc-temp.test", "TXT"): ["v=spf1 include:servfail.test -all"],
    ("redir.test", "TXT"): ["v=spf1 redirect=pass.test"],
    ("redir-none.test", "TXT"): ["v=spf1 redirect=nothing.test"],
    ("redir-twice.test", "TXT"): ["v=spf1 redirect=a.test redirect=pass.test"],
    ("loop1.test", "TXT"): ["v=spf1 include:loop2.test -all"],
    ("loop2.test", "TXT"): ["v=spf1 include:loop1.test -all"],
    ("self.test", "TXT"): ["v=spf1 redirect=self.test"],
    # void lookups: two are allowed, the third is a permerror
    ("void2.test", "TXT"): ["v=spf1 a:v1.nothing.test a:v2.nothing.test ip4:192.0.2.10 -all"],
    ("void3.test", "TXT"): ["v=spf1 a:v1.nothing.test a:v2.nothing.test "
                            "a:v3.nothing.test ip4:192.0.2.10 -all"],
    ("manymx.test", "TXT"): ["v=spf1 mx -all"],
    ("manymx.test", "MX"): [f"{i} mx{i}.manymx.test." for i in range(11)],
    # macros (RFC 7208 7.4's examples as records)
    ("macro.test", "TXT"): ["v=spf1 exists:%{ir}.%{v}._spf.%{d2} -all"],
    ("10.2.0.192.in-addr._spf.macro.test", "A"): ["127.0.0.2"],
    ("local.test", "TXT"): ["v=spf1 exists:%{l1r-}.lp._spf.%{d} -all"],
    ("strong.lp._spf.local.test", "A"): ["127.0.0.2"],
    ("helo.test", "TXT"): ["v=spf1 exists:%{h}.allowed.helo.test -all"],
    ("mx1.example.net.allowed.helo.test", "A"): ["127.0.0.2"],
    ("badmacro.test", "TXT"): ["v=spf1 exists:%{x}.bad.test -all"],
    ("expmacro.test", "TXT"): ["v=spf1 a:%{c}.bad.test -all"],
    ("percent.test", "TXT"): ["v=spf1 a:50%.bad.test -all"],
    ("modifier.test", "TXT"): ["v=spf1 foo=%{l}.bar exp=explain.%{d} ip4:192.0.2.10 -all"],
    ("slow.test", "TXT"): [TIMEOUT],
}


def include_chain(count: int, prefix: str) -> None:
    """inc0 includes inc1 ... includes inc{count-1}, which passes GOOD."""
    for i in range(count - 1):
        ZONE[(f"{prefix}{i}.test", "TXT")] = [f"v=spf1 include:{prefix}{i + 1}.test -all"]
    ZONE[(f"{prefix}{count - 1}.test", "TXT")] = ["v=spf1 ip4:192.0.2.10 -all"]


include_chain(10, "ten")  # 9 includes: inside the limit
include_chain(11, "eleven")  # 10 includes: still inside (the limit counts terms, 10)
include_chain(12, "twelve")  # 11 includes: one too many
include_chain(10_000, "huge")


@pytest.fixture(scope="module")
def dns_server() -> Iterator[TestDNS]:
    with serve_dns(ZONE) as server:
        yield server


def check(server: TestDNS, domain: str, ip: str = GOOD, sender: str = "",
          helo: str = "mx1.example.net", lifetime: float = 5.0) -> spf.SPFResult:
    async def go() -> spf.SPFResult:
        resolver = make_resolver([Endpoint("127.0.0.1", server.port)], lifetime=lifetime)
        return await spf.check_host(resolver, ip, domain, sender or f"user@{domain}", helo)
    return asyncio.run(go())


CASES = [
    ("pass.test", GOOD, "pass"),
    ("pass.test", STRANGER, "fail"),
    ("soft.test", STRANGER, "softfail"),
    ("neutral.test", STRANGER, "neutral"),
    ("nomatch.test", STRANGER, "neutral"),  # no mechanism matched, no redirect
    ("nothing.test", GOOD, "none"),  # NXDOMAIN
    ("other-txt.test", GOOD, "none"),  # TXT records, none of them SPF
    ("localhost", GOOD, "none"),  # not a multi-label name (RFC 7208 4.3)
    ("two.test", GOOD, "permerror"),
    ("syntax.test", GOOD, "permerror"),
    ("badip.test", GOOD, "permerror"),
    ("badcidr.test", GOOD, "permerror"),
    ("late-syntax.test", GOOD, "permerror"),  # a syntax error after a match still counts
    ("servfail.test", GOOD, "temperror"),
    ("upper.test", GOOD, "pass"),
    ("split.test", GOOD, "pass"),  # a record over 255 octets, in several strings
    ("a.test", GOOD, "pass"),
    ("a.test", STRANGER, "fail"),
    ("a24.test", "192.0.2.200", "pass"),
    ("mx.test", GOOD, "pass"),
    ("mx.test", "203.0.113.5", "pass"),
    ("mx.test", STRANGER, "fail"),
    ("ip6.test", "2001:db8:1::42", "pass"),
    ("ip6.test", "2001:db9::1", "fail"),
    ("pass.test", "::ffff:192.0.2.10", "pass"),  # IPv4-mapped: checked as IPv4
    ("ptr.test", GOOD, "pass"),
    ("ptr.test", STRANGER, "fail"),
    ("inc.test", GOOD, "pass"),  # the failing include only does not match
    ("inc.test", STRANGER, "fail"),
    ("inc-none.test", GOOD, "permerror"),
    ("inc-temp.test", GOOD, "temperror"),
    ("redir.test", GOOD, "pass"),
    ("redir.test", STRANGER, "fail"),
    ("redir-none.test", GOOD, "permerror"),
    ("redir-twice.test", GOOD, "permerror"),
    ("loop1.test", GOOD, "permerror"),
    ("self.test", GOOD, "permerror"),
    ("ten0.test", GOOD, "pass"),
    ("eleven0.test", GOOD, "pass"),
    ("twelve0.test", GOOD, "permerror"),
    ("void2.test", GOOD, "pass"),
    ("void3.test", GOOD, "permerror"),
    ("manymx.test", GOOD, "permerror"),
    ("macro.test", GOOD, "pass"),
    ("macro.test", STRANGER, "fail"),
    ("badmacro.test", GOOD, "permerror"),
    ("expmacro.test", GOOD, "permerror"),  # %{c} only in explanations
    ("percent.test", GOOD, "permerror"),  # a lone % is no macro
    ("modifier.test", GOOD, "pass"),  # unknown modifiers and exp are ignored
]


@pytest.mark.parametrize(("domain", "ip", "expected"), CASES,
                         ids=[f"{d}-{ip}-{r}" for d, ip, r in CASES])
def test_spf_table(dns_server: TestDNS, domain: str, ip: str, expected: str) -> None:
    result = check(dns_server, domain, ip)
    assert result.result == expected, result.reason
    assert result.reason


def test_local_part_macro(dns_server: TestDNS) -> None:
    assert check(dns_server, "local.test", sender="strong-bad@local.test").result == "pass"
    assert check(dns_server, "local.test", sender="weak-bad@local.test").result == "fail"


def test_helo_macro(dns_server: TestDNS) -> None:
    assert check(dns_server, "helo.test", helo="mx1.example.net").result == "pass"
    assert check(dns_server, "helo.test", helo="mx2.example.net").result == "fail"


def test_ten_thousand_include_chain_stops_at_the_limit(dns_server: TestDNS) -> None:
    before = len(dns_server.queries)
    result = check(dns_server, "huge0.test")
    assert result.result == "permerror"
    assert "DNS-querying terms" in result.reason
    assert len(dns_server.queries) - before <= spf.MAX_DNS_TERMS + 2


def test_dns_server_that_never_answers_is_a_temperror(dns_server: TestDNS) -> None:
    started = time.monotonic()
    result = check(dns_server, "slow.test", lifetime=0.5)
    assert result.result == "temperror"
    assert "timed out" in result.reason
    assert time.monotonic() - started < spf.CHECK_TIME_LIMIT



@pytest.mark.parametrize(("macro", "expanded"), [
    # RFC 7208 7.4, sender strong-bad@email.example.com from 192.0.2.3
    ("%{s}", "strong-bad@email.example.com"),
    ("%{o}", "email.example.com"),
    ("%{d}", "email.example.com"),
    ("%{d4}", "email.example.com"),
    ("%{d3}", "email.example.com"),
    ("%{d2}", "example.com"),
    ("%{d1}", "com"),
    ("%{dr}", "com.example.email"),
    ("%{d2r}", "example.email"),
    ("%{l}", "strong-bad"),
    ("%{l-}", "strong.bad"),
    ("%{lr}", "strong-bad"),
    ("%{lr-}", "bad.strong"),
    ("%{l1r-}", "strong"),
    ("%{ir}.%{v}._spf.%{d2}", "3.2.0.192.in-addr._spf.example.com"),
    ("%{lr-}.lp._spf.%{d2}", "bad.strong.lp._spf.example.com"),
    ("%{lr-}.lp.%{ir}.%{v}._spf.%{d2}", "bad.strong.lp.3.2.0.192.in-addr._spf.example.com"),
    ("%{ir}.%{v}.%{l1r-}.lp._spf.%{d2}", "3.2.0.192.in-addr.strong.lp._spf.example.com"),
    ("%{d2}.trusted-domains.example.net", "example.com.trusted-domains.example.net"),
    ("%{S}", "strong-bad%40email.example.com"),  # upper case: URL-escaped
    ("a%%b%_c%-d", "a%b c%20d"),
])
def test_macro_expansion_rfc_examples(macro: str, expanded: str) -> None:
    import ipaddress
    check_ = spf._Check(make_resolver([Endpoint("127.0.0.1", 9)]),
                        ipaddress.ip_address("192.0.2.3"), "strong-bad@email.example.com",
                        "mx.example.org")
    assert asyncio.run(spf.expand(check_, macro, "email.example.com")) == expanded


def test_ipv6_macro_is_dotted_nibbles() -> None:
    import ipaddress
    check_ = spf._Check(make_resolver([Endpoint("127.0.0.1", 9)]),
                        ipaddress.ip_address("2001:db8::cb01"), "strong-bad@email.example.com",
                        "mx.example.org")
    assert asyncio.run(spf.expand(check_, "%{ir}.%{v}._spf.%{d2}", "email.example.com")) == (
        "1.0.b.c.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6._spf.example.com")
