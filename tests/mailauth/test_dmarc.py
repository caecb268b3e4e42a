"""DMARC (RFC 7489) verdicts, the policy that follows, iprev, and the AR header's handling."""

from __future__ import annotations

import asyncio
import ipaddress
import random
import time
from collections.abc import Iterator

import pytest
from dnszone import SERVFAIL, TestDNS, serve_dns

from postroom.config.values import Endpoint
from postroom.mailauth import dmarc, iprev, policy, results
from postroom.mailauth.dkimverify import ARCResult, DKIMResult
from postroom.mailauth.spf import SPFResult
from postroom.resolver import make_resolver

ZONE = {
    ("_dmarc.example.org", "TXT"): ["v=DMARC1; p=reject; sp=quarantine"],
    ("_dmarc.strict.test", "TXT"): ["v=DMARC1; p=reject; adkim=s; aspf=s"],
    ("_dmarc.none.test", "TXT"): ["v=DMARC1; p=none"],
    ("_dmarc.half.test", "TXT"): ["v=DMARC1; p=reject; pct=50"],
    ("_dmarc.zero.test", "TXT"): ["v=DMARC1; p=quarantine; pct=0"],
    ("_dmarc.two.test", "TXT"): ["v=DMARC1; p=reject", "v=DMARC1; p=none"],
    ("_dmarc.bad-p.test", "TXT"): ["v=DMARC1; p=bogus"],
    ("_dmarc.bad-p-rua.test", "TXT"): ["v=DMARC1; p=bogus; rua=mailto:x@bad-p-rua.test"],
    ("_dmarc.not-first.test", "TXT"): ["p=reject; v=DMARC1"],
    ("_dmarc.other-txt.test", "TXT"): ["some text", "v=DMARC1; p=quarantine"],
    ("_dmarc.own.sub.example.org", "TXT"): ["v=DMARC1; p=none"],
    ("_dmarc.servfail.test", "TXT"): [SERVFAIL],
    ("_dmarc.co.uk", "TXT"): ["v=DMARC1; p=reject"],  # a public suffix: never the org
    ("1.2.0.192.in-addr.arpa", "PTR"): ["mail.example.org.", "other.example.net."],
    ("mail.example.org", "A"): ["192.0.2.1"],
    ("2.2.0.192.in-addr.arpa", "PTR"): ["liar.example.org."],
    ("liar.example.org", "A"): ["192.0.2.99"],
    ("3.2.0.192.in-addr.arpa", "PTR"): [SERVFAIL],
}


@pytest.fixture(scope="module")
def dns_server() -> Iterator[TestDNS]:
    with serve_dns(ZONE) as server:
        yield server


def spf(result: str, domain: str) -> SPFResult:
    return SPFResult(result, domain, "test")


def dkim(result: str, domain: str) -> DKIMResult:
    return DKIMResult(result, domain, "s", "", "", "rsa-sha256", "test")


def evaluate(server: TestDNS, from_domain: str, spf_result: SPFResult | None,
             sigs: list[DKIMResult], seed: int = 1) -> dmarc.DMARCResult:
    async def go() -> dmarc.DMARCResult:
        resolver = make_resolver([Endpoint("127.0.0.1", server.port)], lifetime=5.0)
        return await dmarc.evaluate(resolver, from_domain, spf_result, sigs,
                                    sample=random.Random(seed))
    return asyncio.run(go())


CASES = [
    # (from, spf, dkim, result, policy to apply)
    ("aligned via SPF only", "example.org", spf("pass", "example.org"),
     [dkim("fail", "example.org")], "pass", "none"),
    ("aligned via DKIM only", "example.org", spf("fail", "example.org"),
     [dkim("pass", "example.org")], "pass", "none"),
    ("relaxed: SPF of a subdomain", "example.org", spf("pass", "bounce.example.org"), [],
     "pass", "none"),
    ("relaxed: DKIM of the parent", "news.example.org", None, [dkim("pass", "example.org")],
     "pass", "none"),
    ("neither", "example.org", spf("pass", "esp.example.net"), [dkim("pass", "esp.example.net")],
     "fail", "reject"),
    ("neither: DKIM not passing", "example.org", spf("softfail", "example.org"),
     [dkim("fail", "example.org"), dkim("permerror", "example.org")], "fail", "reject"),
    ("subdomain policy sp", "news.example.org", spf("fail", "news.example.org"), [],
     "fail", "quarantine"),
    ("subdomain with its own record", "own.sub.example.org", None, [], "fail", "none"),
    ("strict: subdomain SPF does not align", "strict.test", spf("pass", "mail.strict.test"),
     [dkim("pass", "mail.strict.test")], "fail", "reject"),
    ("strict: exact match aligns", "strict.test", spf("pass", "strict.test"), [], "pass", "none"),
    ("p=none", "none.test", None, [], "fail", "none"),
    ("pct=0: next policy down", "zero.test", None, [], "fail", "none"),
    ("no record", "nothing.test", spf("pass", "nothing.test"), [], "none", "none"),
    ("two records: none", "two.test", None, [], "none", "none"),
    ("p invalid without rua: none", "bad-p.test", None, [], "none", "none"),
    ("p invalid with rua: p=none", "bad-p-rua.test", None, [], "fail", "none"),
    ("v= not first: not a record", "not-first.test", None, [], "none", "none"),
    ("other TXT records ignored", "other-txt.test", None, [], "fail", "quarantine"),
    ("public suffix is not an org domain", "example.co.uk", None, [], "none", "none"),
    ("lookup fails", "servfail.test", spf("pass", "servfail.test"), [], "temperror", "none"),
]


@pytest.mark.parametrize(("from_domain", "spf_result", "sigs", "expected", "applied"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_dmarc_table(dns_server: TestDNS, from_domain: str, spf_result: SPFResult | None,
                     sigs: list[DKIMResult], expected: str, applied: str) -> None:
    verdict = evaluate(dns_server, from_domain, spf_result, sigs)
    assert (verdict.result, verdict.policy) == (expected, applied), verdict.reason


def test_pct_samples(dns_server: TestDNS) -> None:
    policies = [evaluate(dns_server, "half.test", None, [], seed=s).policy for s in range(40)]
    assert set(policies) == {"reject", "quarantine"}  # outside the sample: one step down


def test_dkim_temperror_makes_a_failure_uncertain(dns_server: TestDNS) -> None:
    verdict = evaluate(dns_server, "example.org", spf("fail", "example.org"),
                       [dkim("temperror", "example.org")])
    assert verdict.result == "fail" and verdict.uncertain


def test_organizational_domain() -> None:
    assert dmarc.organizational_domain("a.b.example.org") == "example.org"
    assert dmarc.organizational_domain("mail.example.co.uk") == "example.co.uk"
    assert dmarc.organizational_domain("co.uk") == "co.uk"


# -- the policy ---------------------------------------------------------------------

def failed(p: str, uncertain: bool = False, result: str = "fail") -> dmarc.DMARCResult:
    return dmarc.DMARCResult(result, "corp.example", p, p, "neither aligned", uncertain)


NO_ARC = ARCResult("none", "")
POLICY = policy.CheckPolicy(inbox_quarantine_domains=("pop.example",),
                            no_reject_domains=("soft.example",),
                            trusted_arc_sealers=("lists.example",))


@pytest.mark.parametrize(("verdict", "domains", "refused", "folder", "marker"), [
    (failed("reject"), ["corp.example"], 550, None, b""),
    (failed("reject"), ["soft.example"], None, "Junk", b""),
    (failed("reject"), ["corp.example", "soft.example"], None, "Junk", b""),  # gentlest
    (failed("quarantine"), ["corp.example"], None, "Junk", b""),
    (failed("quarantine"), ["pop.example"], None, None, policy.MARKER),
    (failed("quarantine"), ["pop.example", "corp.example"], None, None, policy.MARKER),
    (failed("none"), ["corp.example"], None, None, b""),
    (failed("none", uncertain=True), ["corp.example"], None, None, b""),
    (failed("reject", uncertain=True), ["corp.example"], 451, None, b""),
    (failed("none", uncertain=True, result="temperror"), ["corp.example"], 451, None, b""),
])
def test_policy_table(verdict: dmarc.DMARCResult, domains: list[str], refused: int | None,
                      folder: str | None, marker: bytes) -> None:
    action = policy.decide(POLICY, [verdict], NO_ARC, domains)
    assert (action.refusal.code if action.refusal else None) == refused
    assert action.folder == folder
    assert action.marker == marker


def test_accepting_dns_errors_and_not_enforcing() -> None:
    lenient = policy.CheckPolicy(dns_errors="accept")
    assert policy.decide(lenient, [failed("none", True, "temperror")], NO_ARC, ["x"]) == (
        policy.DELIVER)
    relaxed = policy.CheckPolicy(enforce=False)
    assert policy.decide(relaxed, [failed("reject")], NO_ARC, ["x"]) == policy.DELIVER


def test_trusted_arc_sealer_overrides() -> None:
    arc = ARCResult("pass", "", 1, ("lists.example",))
    action = policy.decide(POLICY, [failed("reject")], arc, ["corp.example"])
    assert action.refusal is None and action.folder is None
    untrusted = ARCResult("pass", "", 1, ("random.example",))
    assert policy.decide(POLICY, [failed("reject")], untrusted, ["corp.example"]).refusal


# -- iprev ----------------------------------------------------------------------------

@pytest.mark.parametrize(("ip", "expected", "name"), [
    ("192.0.2.1", "pass", "mail.example.org"),
    ("192.0.2.2", "fail", ""),  # the name does not lead back
    ("192.0.2.3", "temperror", ""),
    ("192.0.2.4", "fail", ""),  # no PTR at all
])
def test_iprev(dns_server: TestDNS, ip: str, expected: str, name: str) -> None:
    async def go() -> iprev.IPRevResult:
        resolver = make_resolver([Endpoint("127.0.0.1", dns_server.port)], lifetime=5.0)
        return await iprev.check_iprev(resolver, ip)
    result = asyncio.run(go())
    assert (result.result, result.name) == (expected, name), result.reason


def test_iprev_memo_keeps_a_result_as_long_as_its_dns_answers(dns_server: TestDNS) -> None:
    """A client that comes back costs no lookup; once the answers' time is past (TTL
    60 s here), the result is worked out again; a result from NXDOMAIN is not kept."""
    async def go() -> None:
        resolver = make_resolver([Endpoint("127.0.0.1", dns_server.port)], lifetime=5.0)
        memo = iprev.IPRevMemo(resolver)
        address = ipaddress.ip_address("192.0.2.1")
        first = await memo.check(address)
        asked = len(dns_server.queries)
        resolver.cache.flush()  # only the memo can answer now
        assert await memo.check(address) == first and first.result == "pass"
        assert len(dns_server.queries) == asked
        (until, _kept), = memo._known.values()
        assert time.time() + 55 < until <= time.time() + 60
        memo._known[address] = (time.time() - 1, first)
        dns_server.records[("mail.example.org", "A")] = ["192.0.2.77"]
        try:
            assert (await memo.check(address)).result == "fail"
        finally:
            dns_server.records[("mail.example.org", "A")] = ["192.0.2.1"]
        assert len(dns_server.queries) > asked
        await memo.check(ipaddress.ip_address("192.0.2.4"))  # no PTR: NXDOMAIN
        assert ipaddress.ip_address("192.0.2.4") not in memo._known
    asyncio.run(go())


# -- Authentication-Results -------------------------------------------------------------

def remove(data: bytes, piece: int) -> bytes:
    remover = results.OurResultsRemover("MX.corp.example")
    out = b"".join(remover.feed(data[i : i + piece]) for i in range(0, len(data), piece))
    return out + remover.end()


@pytest.mark.parametrize("piece", [1, 5, 1000])
def test_results_claiming_our_name_are_removed_wherever_they_fold(piece: int) -> None:
    other = b"Authentication-Results: other.example; spf=pass\r\n"
    lookalike = b"Authentication-Results: mx.corp.example.evil.test; dkim=pass\r\n"
    kept = other + lookalike
    data = (b"Received: from a\r\n"
            b"Authentication-Results: mx.corp.example; dkim=pass\r\n"
            + other +
            b"authentication-results :\r\n (comment) mx.CORP.example (x);\r\n\tspf=pass\r\n"
            b"Authentication-Results: mx.corp.example 1; none\r\n"
            + lookalike +
            b"Subject: hi\r\n\r\n"
            b"Authentication-Results: mx.corp.example; body text stays\r\n")
    assert remove(data, piece) == (
        b"Received: from a\r\n" + kept + b"Subject: hi\r\n\r\n"
        b"Authentication-Results: mx.corp.example; body text stays\r\n")


def test_results_header_format() -> None:
    header = results.authentication_results("mx.corp.example", [
        "spf=pass smtp.mailfrom=" + results.value("a b@example.org"),
        "dkim=fail " + results.comment("bad (nested) \\ thing\x01"),
    ])
    assert header == (b'Authentication-Results: mx.corp.example;\r\n'
                      b'\tspf=pass smtp.mailfrom="a b@example.org";\r\n'
                      b"\tdkim=fail (bad [nested] ? thing?)\r\n")
    assert results.authserv_id(b" (c) host.example (v) 1;\r\n spf=pass") == "host.example"


def test_verdict_says_when_dmarc_failed_for_forwarding(dns_server: TestDNS) -> None:
    from postroom.mailauth.checks import MailChecks

    async def go(sender: str) -> tuple[bool, int | None]:
        checks = MailChecks(make_resolver([Endpoint("127.0.0.1", dns_server.port)],
                                          lifetime=5.0), "mx.corp.example")
        one = checks.start("198.51.100.7", "mx.stranger.example", f"x@{sender}")
        assert one is not None
        one.feed(f"From: x@{sender}\r\nSubject: s\r\n\r\nbody\r\n".encode())
        verdict = await one.finish(["corp.example"])
        return verdict.dmarc_failed, verdict.action.refusal.code if verdict.action.refusal else None
    assert asyncio.run(go("example.org")) == (True, 550)
    assert asyncio.run(go("nothing.test")) == (False, None)
    assert MailChecks(make_resolver([Endpoint("127.0.0.1", 9)]), "mx",
                      ignore=(ipaddress.ip_network("127.0.0.0/8"),)).start(
                          "127.0.0.1", "h", "a@b.example") is None
