"""Forwarding through an alias to another host: the SRS sender, the ARC seal over our
Authentication-Results (checked by dkimpy and Perl's Mail::DKIM), and a bounce that comes
back to the SRS address and goes on to the original sender."""

from __future__ import annotations

import asyncio
import email
import smtplib
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import dkim
import pytest
from dnszone import TestDNS, serve_dns

from inprocess import free_port, host, inbox, wait_for
from postroom.mailauth.keys import DKIMKey, KeyStore

# Claims our authserv-id, as the checks at our MX would write it: kept from a client
# the checks ignore (loopback, by default), replaced by the real results otherwise.
MESSAGE = (
    b"Authentication-Results: mx.corp.example; spf=pass smtp.mailfrom=alice@sender.example;\r\n"
    b" dkim=pass header.d=sender.example; dmarc=pass header.from=sender.example\r\n"
    b"From: Alice <alice@sender.example>\r\nTo: boss@corp.example\r\nSubject: lunch\r\n"
    b"Message-ID: <1@sender.example>\r\nDate: Thu, 3 Dec 2026 02:00:00 +0000\r\n\r\n"
    b"At noon?\r\n"
)

ARC_VERIFY = r"""
use strict; use warnings;
use Mail::DKIM::ARC::Verifier; use Net::DNS::Resolver;
my $res = Net::DNS::Resolver->new(config_file => '/dev/null', nameservers => ['127.0.0.1'],
                                  port => $ARGV[0]);
Mail::DKIM::DNS::resolver($res);
my $arc = Mail::DKIM::ARC::Verifier->new();
binmode STDIN;
while (<STDIN>) { s/\r?\n\z/\015\012/; $arc->PRINT($_); }
$arc->CLOSE;
print $arc->result, "\n";
"""




def corp_config(port: int, far_port: int, dns_port: int | None = None) -> str:
    """corp's MX; with `dns_port`, its mail checks on for loopback clients too, asking
    that DNS server."""
    checks = (f'[dns]\nnameservers = ["127.0.0.1:{dns_port}"]\n'
              '[dmarc]\nignore_clients = []\n') if dns_port is not None else ""
    return (
        'hostname = "mx.corp.example"\ndomains = ["corp.example"]\n'
        f'[listen]\nsmtp = "127.0.0.1:{port}"\n'
        f'[routes]\n"far.example" = "127.0.0.1:{far_port}"\n'
        f'"sender.example" = "127.0.0.1:{far_port}"\n'
        '[queue]\nretry_after = ["1s"]\ngive_up_after = "1h"\n' + checks
    )


def far_config(port: int) -> str:
    # One host plays the destination (far.example) and the sender's domain.
    return ('hostname = "mx.far.example"\ndomains = ["far.example", "sender.example"]\n'
            f'[listen]\nsmtp = "127.0.0.1:{port}"\n')


def send(port: int, sender: str, rcpts: list[str], message: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.sendmail(sender, rcpts, message)




@pytest.fixture(name="key")
def key_fixture(tmp_path: Path) -> DKIMKey:
    return KeyStore(tmp_path / "corp").add("corp.example", "a1", "rsa")


@pytest.fixture(name="dns")
def dns_fixture(key: DKIMKey) -> Iterator[TestDNS]:
    with serve_dns({(key.record_name, "TXT"): [key.txt()]}) as server:
        yield server


def forward(tmp_path: Path, aliases: dict[str, list[str]], rcpt: str,
            then: Callable[[int], None] | None = None, dns_port: int | None = None) -> None:
    """Send MESSAGE to `rcpt` at corp's MX; wait until friend or alice has mail."""
    corp_port, far_port = free_port(), free_port()

    async def scenario() -> None:
        async with (
            host(tmp_path / "far", far_config(far_port),
                 {"friend@far.example": "pw", "alice@sender.example": "pw"}),
            host(tmp_path / "corp", corp_config(corp_port, far_port, dns_port),
                 {"boss@corp.example": "pw"}, aliases),
        ):
            await asyncio.to_thread(send, corp_port, "alice@sender.example", [rcpt], MESSAGE)
            await wait_for(lambda: inbox(tmp_path / "far", "far.example", "friend")
                           or inbox(tmp_path / "far", "sender.example", "alice"))
            if then is not None:
                await asyncio.to_thread(then, corp_port)
                await wait_for(lambda: inbox(tmp_path / "far", "sender.example", "alice"))

    asyncio.run(scenario())


def test_alias_to_another_host_forwards_with_srs_and_an_arc_seal(
        tmp_path: Path, key: DKIMKey, dns: TestDNS,
        require_peer: Callable[[str], str]) -> None:
    perl = require_peer("perl")
    forward(tmp_path, {"boss-home@corp.example": ["boss@corp.example", "friend@far.example"]},
            "boss-home@corp.example")
    (local,) = inbox(tmp_path / "corp", "corp.example", "boss")
    assert b"ARC-Seal" not in local  # the local copy is filed as received
    (raw,) = inbox(tmp_path / "far", "far.example", "friend")
    msg = email.message_from_bytes(raw)
    return_path = msg["Return-Path"]
    assert return_path.startswith("<SRS0=") and return_path.endswith(
        "=sender.example=alice@corp.example>")
    assert msg["ARC-Seal"].split()[:3] == ["i=1;", "cv=none;", "a=rsa-sha256;"]
    assert "mx.corp.example; spf=pass" in " ".join(msg["ARC-Authentication-Results"].split())
    txt = {f"{key.record_name}.".encode(): key.txt().encode()}
    body = raw.split(b"\r\n", 1)[1]  # without the Return-Path the far host added
    result, _details, reason = dkim.arc_verify(body, dnsfunc=lambda n, timeout=5: txt.get(n))
    assert result == b"pass", reason
    verdict = subprocess.run([perl, "-e", ARC_VERIFY, str(dns.port)], input=body,
                             capture_output=True, timeout=60, check=True).stdout
    assert verdict == b"pass\n"


def test_the_seal_carries_the_results_our_checks_wrote_not_a_forged_claim(
        tmp_path: Path, key: DKIMKey, dns: TestDNS) -> None:
    """With the checks on, the Authentication-Results that claimed our name is removed,
    ours is written, and the ARC seal of the forwarded copy carries ours (RFC 8617 4.1)."""
    dns.records[("sender.example", "TXT")] = ["v=spf1 ip4:127.0.0.1 -all"]
    forward(tmp_path, {"boss-home@corp.example": ["boss@corp.example", "friend@far.example"]},
            "boss-home@corp.example", dns_port=dns.port)
    (local,) = inbox(tmp_path / "corp", "corp.example", "boss")
    (results,) = email.message_from_bytes(local).get_all("Authentication-Results")
    assert "dkim=pass header.d=sender.example" not in results  # the forged claim is gone
    (raw,) = inbox(tmp_path / "far", "far.example", "friend")
    msg = email.message_from_bytes(raw)
    sealed = " ".join(msg["ARC-Authentication-Results"].split())
    assert sealed.startswith("i=1; mx.corp.example;") and "spf=pass" in sealed
    assert "dkim=pass header.d=sender.example" not in sealed
    txt = {f"{key.record_name}.".encode(): key.txt().encode()}
    body = raw.split(b"\r\n", 1)[1]
    result, _details, reason = dkim.arc_verify(body, dnsfunc=lambda n, timeout=5: txt.get(n))
    assert result == b"pass", reason


def test_a_bounce_to_the_srs_address_goes_back_to_the_original_sender(
        tmp_path: Path, key: DKIMKey) -> None:
    srs_address: list[str] = []

    def bounce(corp_port: int) -> None:
        (raw,) = inbox(tmp_path / "far", "far.example", "friend")
        srs_address.append(email.message_from_bytes(raw)["Return-Path"].strip("<>"))
        report = (b"From: MAILER-DAEMON@mx.far.example\r\nTo: " + srs_address[0].encode()
                  + b"\r\nSubject: Undelivered Mail Returned to Sender\r\n\r\ngone\r\n")
        send(corp_port, "", [srs_address[0]], report)

    forward(tmp_path, {"boss-home@corp.example": ["friend@far.example"]},
            "boss-home@corp.example", then=bounce)
    (returned,) = inbox(tmp_path / "far", "sender.example", "alice")
    assert returned.startswith(b"Return-Path: <>\r\n")
    assert b"Subject: Undelivered Mail Returned to Sender" in returned


def test_a_forged_srs_address_is_refused(tmp_path: Path) -> None:
    corp_port = free_port()

    async def scenario() -> None:
        async with host(tmp_path / "corp", corp_config(corp_port, free_port()),
                        {"boss@corp.example": "pw"}):
            def attempt() -> tuple[int, bytes]:
                with smtplib.SMTP("127.0.0.1", corp_port, timeout=30) as client:
                    client.ehlo()
                    client.mail("")
                    return client.rcpt("SRS0=abcd=AB=victim.example=bob@corp.example")
            code, text = await asyncio.to_thread(attempt)
            assert (code, text[:5]) == (550, b"5.1.1")
            assert b"invalid SRS address" in text

    asyncio.run(scenario())


def test_our_own_bounce_of_a_forwarded_copy_reaches_the_original_sender(
        tmp_path: Path, key: DKIMKey) -> None:
    forward(tmp_path, {"boss-home@corp.example": ["nobody@far.example"]},
            "boss-home@corp.example")
    (returned,) = inbox(tmp_path / "far", "sender.example", "alice")
    msg = email.message_from_bytes(returned)
    assert msg["Return-Path"] == "<>"
    assert msg.get_content_type() == "multipart/report"
    assert "nobody@far.example" in returned.decode()
