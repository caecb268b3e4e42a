"""DKIM verification (RFC 6376) and ARC chains (RFC 8617), keys served by a loopback DNS server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import dkim
import pytest
from dnszone import SERVFAIL, TestDNS, serve_dns
from signing import Key, ed25519_key, rsa_key, sign

from postroom.config.values import Endpoint
from postroom.mailauth import dkimverify
from postroom.resolver import make_resolver

MESSAGE = (
    b"From: Alice <alice@sender.test>\r\n"
    b"To: Boss <boss@corp.example>\r\n"
    b"Subject: quarterly numbers\r\n"
    b"Date: Thu, 03 Dec 2026 01:00:00 +0000\r\n"
    b"Message-ID: <1@sender.test>\r\n"
    b"\r\n"
    b"Line one.  With  spaces \t\r\n"
    b"\r\n"
    b"Last line\r\n"
    b"\r\n\r\n"
)

RSA = rsa_key("sender.test", "rsa2026")
ED = ed25519_key("sender.test", "ed2026")
REVOKED = rsa_key("sender.test", "revoked")
BAD64 = rsa_key("sender.test", "bad64")
MISSING = rsa_key("sender.test", "missing")
TEMP = rsa_key("sender.test", "temp")
SMALL = rsa_key("sender.test", "small", bits=512)

ZONE = {
    (RSA.name, "TXT"): [RSA.record],
    (ED.name, "TXT"): [ED.record],
    (REVOKED.name, "TXT"): ["v=DKIM1; k=rsa; p="],
    (BAD64.name, "TXT"): ["v=DKIM1; k=rsa; p=this*is*not*base64!!"],
    (TEMP.name, "TXT"): [SERVFAIL],
    (SMALL.name, "TXT"): [SMALL.record],
    ("sender.test", "A"): ["192.0.2.1"],
}


@pytest.fixture(scope="module")
def dns_server() -> Iterator[TestDNS]:
    with serve_dns(ZONE) as server:
        yield server


def verify(server: TestDNS, message: bytes, piece: int = 7,
           ) -> tuple[list[dkimverify.DKIMResult], dkimverify.ARCResult]:
    """Stream `message` in small pieces, as the SMTP session does, then verify."""
    async def go() -> tuple[list[dkimverify.DKIMResult], dkimverify.ARCResult]:
        resolver = make_resolver([Endpoint("127.0.0.1", server.port)], lifetime=5.0)
        verifier = dkimverify.MessageVerifier(resolver)
        for i in range(0, len(message), piece):
            verifier.feed(message[i : i + piece])
        return await verifier.finish()
    return asyncio.run(go())


def one(server: TestDNS, message: bytes) -> dkimverify.DKIMResult:
    results, _arc = verify(server, message)
    assert len(results) == 1
    return results[0]


def changed_body(message: bytes) -> bytes:
    return message.replace(b"Line one.", b"Line 1.")


def changed_header(message: bytes) -> bytes:
    return message.replace(b"quarterly numbers", b"quarterly numbres")


def bad_signature_tags(message: bytes) -> bytes:
    return message.replace(b"DKIM-Signature: v=1;", b"DKIM-Signature: v=1; ===;;", 1)


def missing_tag(message: bytes) -> bytes:
    return message.replace(b" bh=", b" xh=", 1)


CASES: list[tuple[str, Key, dict[str, object], object, str]] = [
    ("good rsa relaxed", RSA, {}, None, "pass"),
    ("good rsa simple", RSA, {"canon": b"simple/simple"}, None, "pass"),
    ("good rsa relaxed/simple", RSA, {"canon": b"relaxed/simple"}, None, "pass"),
    ("good ed25519", ED, {}, None, "pass"),
    ("body changed", RSA, {}, changed_body, "fail"),
    ("body changed simple", RSA, {"canon": b"simple/simple"}, changed_body, "fail"),
    ("header changed", RSA, {}, changed_header, "fail"),
    ("header changed ed25519", ED, {}, changed_header, "fail"),
    ("relaxed survives whitespace", RSA, {},
     lambda m: m.replace(b"With  spaces", b"With \t spaces   "), "pass"),
    ("simple does not", RSA, {"canon": b"simple/simple"},
     lambda m: m.replace(b"With  spaces", b"With \t spaces   "), "fail"),
    ("trailing empty lines ignored", RSA, {"canon": b"simple/simple"},
     lambda m: m + b"\r\n\r\n", "pass"),
    ("missing key", MISSING, {}, None, "permerror"),
    ("revoked key", REVOKED, {}, None, "permerror"),
    ("key not base64", BAD64, {}, None, "permerror"),
    ("key lookup SERVFAIL", TEMP, {}, None, "temperror"),
    ("key too small", SMALL, {}, None, "permerror"),
    ("l= with text appended", RSA, {"length": True},
     lambda m: m + b"Appended by a list\r\n", "pass"),
    ("l= longer than the body", RSA, {"length": True},
     lambda m: m.replace(b"Last line\r\n", b""), "permerror"),
    ("expired x=", RSA, {"expires": int(time.time()) - 30 * 86400}, None, "permerror"),
    ("future x=", RSA, {"expires": int(time.time()) + 86400}, None, "pass"),
    ("malformed tag list", RSA, {}, bad_signature_tags, "permerror"),
    ("missing bh=", RSA, {}, missing_tag, "permerror"),
]


@pytest.mark.parametrize(("key", "options", "change", "expected"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_dkim_table(dns_server: TestDNS, key: Key, options: dict[str, object],
                    change: object, expected: str) -> None:
    message = sign(MESSAGE, key, **options)  # type: ignore[arg-type]
    if callable(change):
        message = change(message)
    result = one(dns_server, message)
    assert result.result == expected, result.reason
    if result.result != "permerror" or "malformed" not in result.reason:
        assert result.domain == "sender.test"
        assert result.selector == key.selector


def test_every_signature_gets_a_verdict_topmost_first(dns_server: TestDNS) -> None:
    message = sign(sign(MESSAGE, RSA), ED)  # dual signed: ed25519 on top
    results, arc = verify(dns_server, message)
    assert [(r.result, r.algorithm) for r in results] == [
        ("pass", "ed25519-sha256"), ("pass", "rsa-sha256")]
    assert arc.result == "none"
    broken = changed_header(sign(sign(MESSAGE, MISSING), RSA))
    assert [r.result for r in verify(dns_server, broken)[0]] == ["fail", "permerror"]


def test_signatures_past_the_limit_are_not_verified(dns_server: TestDNS) -> None:
    message = MESSAGE
    for _ in range(dkimverify.MAX_SIGNATURES + 2):
        message = sign(message, RSA)
    results, _arc = verify(dns_server, message)
    assert [r.result for r in results] == (
        ["pass"] * dkimverify.MAX_SIGNATURES + ["policy"] * 2)


def test_unsigned_message_has_no_results(dns_server: TestDNS) -> None:
    assert verify(dns_server, MESSAGE) == ([], dkimverify.ARCResult("none", "no ARC sets"))


@pytest.mark.parametrize("piece", [1, 2, 3, 64, 100_000])
def test_any_split_of_the_stream_gives_the_same_hash(dns_server: TestDNS, piece: int) -> None:
    for canon in (b"simple/simple", b"relaxed/relaxed"):
        message = sign(MESSAGE, RSA, canon=canon)
        results, _arc = verify(dns_server, message, piece=piece)
        assert results[0].result == "pass", (canon, results[0].reason)


def test_empty_body(dns_server: TestDNS) -> None:
    for canon in (b"simple/simple", b"relaxed/relaxed"):
        message = sign(MESSAGE.split(b"\r\n\r\n")[0] + b"\r\n\r\n", RSA, canon=canon)
        assert one(dns_server, message).result == "pass", canon


# -- ARC ---------------------------------------------------------------------------

SEALER = rsa_key("list.test", "arc")
ZONE[(SEALER.name, "TXT")] = [SEALER.record]


def seal(message: bytes, results: bytes, key: Key = SEALER) -> bytes:
    headers = dkim.arc_sign(message, key.selector.encode(), key.domain.encode(), key.private,
                            b"mx.list.test", include_headers=[b"from", b"to", b"subject"])
    return b"".join(headers) + message


def test_arc_valid_chain(dns_server: TestDNS) -> None:
    first = b"Authentication-Results: mx.list.test; dkim=pass header.d=sender.test\r\n"
    sealed = seal(first + sign(MESSAGE, RSA), first)
    results, arc = verify(dns_server, sealed)
    assert arc.result == "pass", arc.reason
    assert arc.sealers == ("list.test",)
    assert results[0].result == "pass"


def test_arc_broken_chain(dns_server: TestDNS) -> None:
    first = b"Authentication-Results: mx.list.test; dkim=pass header.d=sender.test\r\n"
    sealed = seal(first + sign(MESSAGE, RSA), first)
    _results, arc = verify(dns_server, changed_body(sealed))
    assert arc.result == "fail"
    _results, arc = verify(dns_server, sealed.replace(b"ARC-Seal: i=1", b"ARC-Seal: i=2"))
    assert arc.result == "fail"


def test_streamed_canonical_body_matches_dkimpy_whatever_the_lines() -> None:
    """Random bodies (long lines, runs of spaces, tabs, bare CRs, empty lines) in random
    pieces hash as dkimpy's canonicalization of the whole body does."""
    import hashlib
    import random

    from dkim.canonicalization import Relaxed, Simple

    rng = random.Random(7)
    # (dkimpy's own relaxed regex backtracks through long WSP runs: kept short here)
    atoms = [b"a", b"bc", b" ", b"\t", b"  \t ", b"\r\n", b"\r\n\r\n", b"\r", b"x" * 3000,
             b" " * 3000, b"y" * 70_000, b"\t \r\n"]
    for _ in range(60):
        # SMTP content always ends in CRLF (the data before <CRLF>.<CRLF>); without it,
        # whether WSP before the end counts as the end of a line is left open by RFC 6376.
        body = b"".join(rng.choice(atoms) for _ in range(rng.randrange(0, 25))) + b"\r\n"
        hashes = dkimverify.BodyHashes([(False, "sha256", None), (True, "sha256", None)])
        pos = 0
        while pos < len(body):
            step = rng.choice([1, 7, 1000, 65_536, 200_000, 200_000])
            hashes.feed(body[pos : pos + step])
            pos += step
        hashes.end()
        for relaxed, canon in ((False, Simple), (True, Relaxed)):
            expected = hashlib.sha256(canon.canonicalize_body(body)).digest()
            assert hashes.digest((relaxed, "sha256", None)) == expected, (relaxed, body[:200])


@pytest.mark.parametrize(("body", "relaxed_form"), [
    (b"a" + b" \t" * 200_000 + b"b\r\n", b"a b\r\n"),
    (b"a" + b" " * 400_000 + b"\r\n\r\n", b"a\r\n"),
    (b"z" * 300_000 + b"\r\n" + b" " * 300_000, b"z" * 300_000 + b"\r\n"),
])
def test_long_lines_and_whitespace_runs_hash_in_linear_time(body: bytes,
                                                            relaxed_form: bytes) -> None:
    import hashlib
    hashes = dkimverify.BodyHashes([(True, "sha256", None)])
    for i in range(0, len(body), 1000):
        hashes.feed(body[i : i + 1000])
    hashes.end()
    assert hashes.digest((True, "sha256", None)) == hashlib.sha256(relaxed_form).digest()
