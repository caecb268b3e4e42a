"""The MX listener checks what strangers send: SPF, DKIM, DMARC, iprev, and acts on DMARC.

A real server on loopback with [dns] pointed at a test DNS server and the
loopback client not exempt ([dmarc] ignore_clients = []), so 127.0.0.1 plays
the stranger.
"""

from __future__ import annotations

import asyncio
import email
import logging
import smtplib
from collections.abc import Iterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import pytest
from dnszone import TIMEOUT, TestDNS, serve_dns
from signing import rsa_key, sign

from inprocess import host
from postroom.server.main import Running
from postroom.store.mailboxes import SPILL_AT

SENDER = rsa_key("sender.test", "s1")
ZONE = {
    # corp.example is ours; its own policy says reject, and 127.0.0.1 is no sender of it.
    ("corp.example", "TXT"): ["v=spf1 ip4:192.0.2.1 -all"],
    ("_dmarc.corp.example", "TXT"): ["v=DMARC1; p=reject; rua=mailto:d@corp.example"],
    ("quarantine.test", "TXT"): ["v=spf1 -all"],
    ("_dmarc.quarantine.test", "TXT"): ["v=DMARC1; p=quarantine"],
    ("sender.test", "TXT"): ["v=spf1 ip4:127.0.0.1 -all"],
    ("_dmarc.sender.test", "TXT"): ["v=DMARC1; p=reject"],
    (SENDER.name, "TXT"): [SENDER.record],
    ("bounces.esp.test", "TXT"): ["v=spf1 -all"],  # SPF fails hard: DKIM alone must do
    ("1.0.0.127.in-addr.arpa", "PTR"): ["relay.sender.test."],
    ("relay.sender.test", "A"): ["127.0.0.1"],
    ("slow.test", "TXT"): ["v=spf1 ip4:127.0.0.1 -all"],
    ("_dmarc.slow.test", "TXT"): [TIMEOUT],
    ("bad64._domainkey.sender.test", "TXT"): ["v=DKIM1; k=rsa; p=@@not*base64@@"],
}
for _i in range(10_000):  # huge0.test includes huge1.test ... huge9999.test
    ZONE[(f"huge{_i}.test", "TXT")] = [f"v=spf1 include:huge{_i + 1}.test -all"]


def message(sender: str, subject: str = "hello", body: bytes = b"Hello.\r\n",
            extra: bytes = b"") -> bytes:
    return (f"From: {sender}\r\nTo: boss@corp.example\r\nSubject: {subject}\r\n"
            "Date: Thu, 03 Dec 2026 01:00:00 +0000\r\n"
            f"Message-ID: <{subject.replace(' ', '.')}@x>\r\n").encode() + extra + b"\r\n" + body


@pytest.fixture(scope="module")
def dns_server() -> Iterator[TestDNS]:
    with serve_dns(ZONE) as server:
        yield server


def mx(tmp_path: Path, dns: TestDNS, dmarc: str = "") -> AbstractAsyncContextManager[Running]:
    """corp.example's MX with its checks on, asking `dns`; `dmarc` is added to [dmarc]."""
    return host(tmp_path, (
        'hostname = "mx.corp.example"\n'
        'domains = ["corp.example", "pop.example"]\n'
        "[listen]\n"
        'smtp = "127.0.0.1:0"\n'
        "[dns]\n"
        f'nameservers = ["127.0.0.1:{dns.port}"]\n'
        "[dmarc]\n"
        "ignore_clients = []\n"
        'inbox_quarantine_domains = ["pop.example"]\n' + dmarc
    ), {"boss@corp.example": "boss-secret", "pat@pop.example": "pat-secret"})


def send(server: Running, mail_from: str, data: bytes, rcpt: str = "boss@corp.example",
         ) -> tuple[int, bytes]:
    """Send one message on the MX port; the reply to the end of DATA."""
    client = smtplib.SMTP(*server.address("smtp"), timeout=30)
    try:
        client.ehlo("relay.sender.test")
        client.mail(mail_from)
        client.rcpt(rcpt)
        code, text = client.data(data)
        client.quit()
    finally:
        client.close()
    return code, text


def folder(tmp_path: Path, address: str, name: str | None = None) -> list[email.message.Message]:
    local, _, domain = address.partition("@")
    box = tmp_path / "mail" / domain / local
    if name:
        box = box / f".{name}"
    new = box / "new"
    files = sorted(new.iterdir()) if new.is_dir() else []
    return [email.message_from_bytes(p.read_bytes()) for p in files]


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


def deliver(tmp_path: Path, dns: TestDNS, mail_from: str, data: bytes, dmarc: str = "",
            ) -> tuple[int, bytes]:
    """One message sent to a new MX (`mx`, with `dmarc` added to its [dmarc] table);
    the reply to the end of DATA."""
    async def go() -> tuple[int, bytes]:
        async with mx(tmp_path, dns, dmarc) as server:
            return await asyncio.to_thread(send, server, mail_from, data)
    return asyncio.run(go())


def test_forged_ceo_with_p_reject_is_refused(tmp_path: Path, dns_server: TestDNS) -> None:
    code, text = deliver(tmp_path, dns_server, "ceo@corp.example",
                         message("CEO <ceo@corp.example>", "wire money"))
    assert code == 550
    assert text.startswith(b"5.7.1 ") and b"DMARC" in text and b"corp.example" in text
    assert folder(tmp_path, "boss@corp.example") == []
    assert folder(tmp_path, "boss@corp.example", "Junk") == []


def test_p_quarantine_lands_in_junk_and_pop3_domain_gets_a_marker(
        tmp_path: Path, dns_server: TestDNS) -> None:
    async def go() -> list[tuple[int, bytes]]:
        async with mx(tmp_path, dns_server) as server:
            return [
                await asyncio.to_thread(send, server, "x@quarantine.test",
                                        message("x@quarantine.test", "junk me")),
                await asyncio.to_thread(send, server, "x@quarantine.test",
                                        message("x@quarantine.test", "mark me"),
                                        "pat@pop.example"),
            ]
    replies = run(go())
    assert [code for code, _text in replies] == [250, 250]  # type: ignore[attr-defined]
    assert folder(tmp_path, "boss@corp.example") == []
    [junk] = folder(tmp_path, "boss@corp.example", "Junk")
    assert junk["Subject"] == "junk me"
    assert "dmarc=fail" in junk["Authentication-Results"]
    assert "X-Spam-Flag" not in junk
    [marked] = folder(tmp_path, "pat@pop.example")
    assert marked["X-Spam-Flag"] == "YES"
    assert "dmarc=fail" in marked["Authentication-Results"]
    assert folder(tmp_path, "pat@pop.example", "Junk") == []


def test_genuine_signed_mail_reaches_the_inbox_with_passes(tmp_path: Path,
                                                           dns_server: TestDNS) -> None:
    forged_ar = (b"Authentication-Results: mx.corp.example; dkim=pass header.d=bank.test\r\n"
                 b"Authentication-Results: other.example;\r\n spf=pass\r\n")
    signed = sign(message("Alice <alice@sender.test>", "report", extra=forged_ar), SENDER)

    code, _text = deliver(tmp_path, dns_server, "alice@sender.test", signed)
    assert code == 250
    [msg] = folder(tmp_path, "boss@corp.example")
    ours = [v for v in msg.get_all("Authentication-Results") if v.startswith("mx.corp.example")]
    assert len(ours) == 1  # the forged one claiming our name is gone
    ar = " ".join(ours[0].split())
    assert "spf=pass" in ar and "smtp.mailfrom=alice@sender.test" in ar
    assert "dkim=pass" in ar and "header.d=sender.test" in ar and "header.s=s1" in ar
    assert "dmarc=pass" in ar and "header.from=sender.test" in ar
    assert "iprev=pass policy.iprev=127.0.0.1 (relay.sender.test)" in ar
    others = [v for v in msg.get_all("Authentication-Results") if v.startswith("other.example")]
    assert len(others) == 1  # another host's results stay
    headers = list(msg.keys())
    assert headers[:3] == ["Return-Path", "Received", "Authentication-Results"]


def test_spf_minus_all_alone_is_not_refused_when_dkim_aligns(tmp_path: Path,
                                                              dns_server: TestDNS) -> None:
    signed = sign(message("news@sender.test", "newsletter"), SENDER)

    code, _text = deliver(tmp_path, dns_server, "bounce@bounces.esp.test", signed)
    assert code == 250
    [msg] = folder(tmp_path, "boss@corp.example")
    ar = msg["Authentication-Results"]
    assert "spf=fail" in ar and "dkim=pass" in ar and "dmarc=pass" in ar


def test_large_signed_message_is_verified_and_headed(tmp_path: Path, dns_server: TestDNS) -> None:
    body = b"".join(b"line %07d of a long report, padded out to a fair width...\r\n" % i
                    for i in range(SPILL_AT // 50 * 3))
    signed = sign(message("alice@sender.test", "big", body=body), SENDER)

    code, _text = deliver(tmp_path, dns_server, "alice@sender.test", signed)
    assert code == 250
    [msg] = folder(tmp_path, "boss@corp.example")
    assert list(msg.keys())[:3] == ["Return-Path", "Received", "Authentication-Results"]
    assert "dkim=pass" in msg["Authentication-Results"]
    assert msg.get_payload().encode() == body


def test_dead_dns_defers_and_the_session_goes_on(tmp_path: Path, dns_server: TestDNS) -> None:
    async def go() -> tuple[tuple[int, bytes], tuple[int, bytes]]:
        async with mx(tmp_path, dns_server) as server:
            def both() -> tuple[tuple[int, bytes], tuple[int, bytes]]:
                client = smtplib.SMTP(*server.address("smtp"), timeout=60)
                client.ehlo("relay.sender.test")
                client.mail("a@slow.test")
                client.rcpt("boss@corp.example")
                first = client.data(message("a@slow.test", "slow"))
                client.mail("alice@sender.test")
                client.rcpt("boss@corp.example")
                second = client.data(sign(message("alice@sender.test", "after"), SENDER))
                client.quit()
                return first, second
            return await asyncio.to_thread(both)
    first, second = run(go())  # type: ignore[misc]
    assert first[0] == 451 and first[1].startswith(b"4.7.0")
    assert second[0] == 250
    [msg] = folder(tmp_path, "boss@corp.example")
    assert msg["Subject"] == "after"


def test_dead_dns_accepted_with_temperror_when_configured(tmp_path: Path,
                                                          dns_server: TestDNS) -> None:
    code, _text = deliver(tmp_path, dns_server, "a@slow.test", message("a@slow.test", "slow"),
                          'dns_errors = "accept"\n')
    assert code == 250
    [msg] = folder(tmp_path, "boss@corp.example")
    assert "dmarc=temperror" in msg["Authentication-Results"]


def test_enforce_off_only_records(tmp_path: Path, dns_server: TestDNS) -> None:
    code, _text = deliver(tmp_path, dns_server, "ceo@corp.example",
                          message("ceo@corp.example", "recorded"), "enforce = false\n")
    assert code == 250
    [msg] = folder(tmp_path, "boss@corp.example")
    assert "dmarc=fail" in msg["Authentication-Results"]


def test_bad_input_gives_defined_results_a_log_line_and_no_traceback(
        tmp_path: Path, dns_server: TestDNS, caplog: pytest.LogCaptureFixture) -> None:
    bad = (b"DKIM-Signature: this is ;; not = a tag list ===\r\n"
           b"DKIM-Signature: v=1; a=rsa-sha256; d=sender.test; s=bad64; h=from;\r\n"
           b" bh=AAAA; b=AAAA\r\n")
    caplog.set_level(logging.INFO, logger="postroom")

    code, _text = deliver(tmp_path, dns_server, "x@huge0.test",
                          bad + message("x@huge0.test", "odd"))
    assert code == 250
    [msg] = folder(tmp_path, "boss@corp.example")
    ar = " ".join(msg["Authentication-Results"].split())
    assert "spf=permerror" in ar and "DNS-querying terms" in ar
    assert ar.count("dkim=permerror") == 2
    assert "malformed signature" in ar and "bad64._domainkey.sender.test unusable" in ar
    assert "dmarc=none" in ar
    lines = [r for r in caplog.records if "auth:" in r.getMessage()]
    assert len(lines) == 1 and "dkim=permerror" in lines[0].getMessage()
    assert not [r for r in caplog.records if r.exc_info]
