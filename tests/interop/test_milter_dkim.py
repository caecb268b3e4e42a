"""OpenDKIM and OpenDMARC as milters: signing on submission, verifying on the MX.

One postroom runs both listeners: submission with OpenDKIM in signing mode
(the client is no "internal host", so it signs because postroom passes
{auth_authen}), the MX with a second OpenDKIM that verifies and OpenDMARC after
it, which reads the first one's Authentication-Results (each filter sees the
message as the ones before it changed it). The signature is checked by an
independent implementation, Perl's Mail::DKIM, against the test DNS.
"""

from __future__ import annotations

import re
import smtplib
import subprocess
from collections.abc import Callable, Iterator

import pytest
from mailharness import Dnsmasq, HarnessError, Postroom, submission_client
from milterpeers import OpenDKIM, OpenDMARC, Port53DNS

pytestmark = pytest.mark.interop

DOMAIN = "corp.example"
SELECTOR = "sel"
AUTHSERV = "mx.corp.example"
NOT_US = "192.0.2.1"  # InternalHosts: so loopback clients are signed only when authenticated

VERIFY = r"""
use strict; use Mail::DKIM::Verifier; use Net::DNS::Resolver;
my $res = Net::DNS::Resolver->new(config_file => '/dev/null', nameservers => ['127.0.0.1'],
                                  port => $ARGV[0]);
Mail::DKIM::DNS::resolver($res);
my $v = Mail::DKIM::Verifier->new();
local $/; my $msg = <STDIN>; $msg =~ s/\r?\n/\r\n/g;
$v->PRINT($msg); $v->CLOSE();
print $v->result, "\n";
"""


@pytest.fixture(scope="module")
def peers(tmp_path_factory: pytest.TempPathFactory, require_peer: Callable[..., str],
          ) -> Iterator[tuple[Postroom, Dnsmasq]]:
    for program in ("opendkim", "opendkim-genkey", "opendmarc", "dnsmasq", "perl", "unshare"):
        require_peer(program)
    root = tmp_path_factory.mktemp("dkim")
    subprocess.run(["opendkim-genkey", "-b", "2048", "-d", DOMAIN, "-s", SELECTOR, "-D",
                    str(root)], check=True)
    record = "".join(re.findall(r'"([^"]*)"', (root / f"{SELECTOR}.txt").read_text()))
    records = ("--local=/example/", f"--txt-record={SELECTOR}._domainkey.{DOMAIN},{record}",
               f"--txt-record={DOMAIN},v=spf1 ip4:127.0.0.1 -all",
               f"--txt-record=_dmarc.{DOMAIN},v=DMARC1; p=reject",
               f"--host-record=mx.{DOMAIN},127.0.0.1")
    dns = Dnsmasq(root / "dns", *records)
    dns53 = Port53DNS(root / "dns53", *records)
    daemons: list[OpenDKIM | OpenDMARC | Port53DNS] = [dns53]
    server: Postroom | None = None
    try:
        dns.start()
        dns53.start()
        key = root / f"{SELECTOR}.private"
        internal = f"InternalHosts {NOT_US}\n"
        signer = OpenDKIM(root / "sign", dns.port, DOMAIN, SELECTOR, key, internal)
        verifier = OpenDKIM(root / "verify", dns.port, DOMAIN, SELECTOR, key, internal)
        dmarc = OpenDMARC(root / "dmarc", AUTHSERV, dns53.address)
        for daemon in (signer, verifier, dmarc):
            daemons.append(daemon)
            daemon.start()
        server = Postroom(
            root / "postroom", users={"alice@corp.example": "alice-secret",
                                      "boss@corp.example": "boss-secret"},
            listeners=("smtp", "submission"), workers=1,
            extra_toml=(f'[milters]\nsmtp = ["{verifier.socket}", "{dmarc.socket}"]\n'
                        f'submission = ["{signer.socket}"]\n'))
        server.start()
        yield server, dns
    except HarnessError as exc:
        pytest.fail(str(exc), pytrace=False)
    finally:
        if server is not None:
            server.stop()
        for daemon in daemons:
            daemon.stop()
        dns.stop()


def mail(subject: str) -> bytes:
    return (f"From: Alice <alice@{DOMAIN}>\r\nTo: boss@{DOMAIN}\r\nSubject: {subject}\r\n\r\n"
            "Signed on the way out.\r\n").encode()


def submitted(server: Postroom, subject: str) -> bytes:
    client = submission_client(server.ports["submission"], "alice@corp.example", "alice-secret")
    with client:
        client.sendmail(f"alice@{DOMAIN}", [f"boss@{DOMAIN}"], mail(subject))
    return server.wait_for_message(f"boss@{DOMAIN}", subject.encode())[-1]


def mail_dkim(dns: Dnsmasq, message: bytes) -> str:
    result = subprocess.run(["perl", "-e", VERIFY, str(dns.port)], input=message,
                            capture_output=True, check=True, timeout=60)
    return result.stdout.decode().strip()


def test_submission_signs_and_mail_dkim_verifies(peers: tuple[Postroom, Dnsmasq]) -> None:
    server, dns = peers
    stored = submitted(server, "sign me")
    head = stored.partition(b"\r\n\r\n")[0]
    assert b"\r\nDKIM-Signature: v=1;" in head
    assert re.search(rb"d=corp\.example;\s+s=sel;", head)
    assert mail_dkim(dns, stored) == "pass"


def test_the_mx_verifies_dkim_and_dmarc_reads_the_result(
        peers: tuple[Postroom, Dnsmasq]) -> None:
    server, _dns = peers
    signed = submitted(server, "verify me")
    relayed = signed.split(b"\r\n", 1)[1]  # without our Return-Path, as another host gets it
    with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=60) as client:
        client.ehlo("isp.example")
        client.sendmail(f"alice@{DOMAIN}", [f"boss@{DOMAIN}"], relayed)
    got = server.wait_for_message(f"boss@{DOMAIN}", b"verify me", timeout=30)
    received = [m for m in got if m.count(b"DKIM-Signature") == 1
                and b"Authentication-Results" in m.partition(b"\r\n\r\n")[0]]
    assert received, got
    head = received[-1].partition(b"\r\n\r\n")[0].decode()
    results = [line for line in re.split(r"\r\n(?![ \t])", head)
               if line.startswith("Authentication-Results:")]
    assert any(AUTHSERV in r and "dkim=pass" in r for r in results), results
    assert any(AUTHSERV in r and "dmarc=pass" in r for r in results), results
