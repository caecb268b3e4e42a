"""Signatures made by independent implementations verify in postroom: OpenDKIM (`opendkim -t`)
and Perl's Mail::DKIM::Signer, with both canonicalizations; a changed body fails for both."""

from __future__ import annotations

import asyncio
import base64
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from dnszone import TestDNS, serve_dns
from signing import rsa_key

from postroom.config.values import Endpoint
from postroom.mailauth.dkimverify import DKIMResult, MessageVerifier
from postroom.resolver import make_resolver

pytestmark = pytest.mark.interop

MESSAGE = (
    b"From: Alice <alice@sender.test>\r\n"
    b"To: boss@corp.example\r\n"
    b"Subject: signed elsewhere\r\n"
    b"Date: Thu, 03 Dec 2026 01:00:00 +0000\r\n"
    b"Message-ID: <interop@sender.test>\r\n"
    b"\r\n"
    b"A body  with\tspaces \r\n"
    b"\r\n"
    b"and an empty line above.\r\n"
)

PERL_SIGNER = r"""
use strict;
use Mail::DKIM::Signer;
use Mail::DKIM::TextWrap;
my ($keyfile, $method) = @ARGV;
my $signer = Mail::DKIM::Signer->new(
    Algorithm => "rsa-sha256", Method => $method, Domain => "sender.test",
    Selector => "perl", KeyFile => $keyfile,
    Headers => "from:to:subject:date:message-id");
binmode STDIN;
while (<STDIN>) { s/\015?\012$//; $signer->PRINT("$_\015\012"); }
$signer->CLOSE;
print $signer->signature->as_string, "\015\012";
"""

PERL_KEY = rsa_key("sender.test", "perl")


def public_record(pem: bytes) -> str:
    key = serialization.load_pem_private_key(pem, None)
    der = key.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    return f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"


@pytest.fixture(scope="module")
def opendkim_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("opendkim")
    subprocess.run(["opendkim-genkey", "-b", "2048", "-d", "sender.test", "-s", "od",
                    "-D", str(folder)], check=True, capture_output=True)
    return folder / "od.private"


@pytest.fixture(scope="module")
def dns_server(opendkim_key: Path) -> Iterator[TestDNS]:
    zone = {
        ("perl._domainkey.sender.test", "TXT"): [PERL_KEY.record],
        ("od._domainkey.sender.test", "TXT"): [public_record(opendkim_key.read_bytes())],
    }
    with serve_dns(zone) as server:
        yield server


def verify(server: TestDNS, message: bytes) -> list[DKIMResult]:
    async def go() -> list[DKIMResult]:
        verifier = MessageVerifier(make_resolver([Endpoint("127.0.0.1", server.port)],
                                                 lifetime=5.0))
        for i in range(0, len(message), 10):
            verifier.feed(message[i : i + 10])
        return (await verifier.finish())[0]
    return asyncio.run(go())


def opendkim_sign(key: Path, canon: str, message: bytes) -> bytes:
    folder = key.parent
    conf = folder / f"sign-{canon.replace('/', '-')}.conf"
    conf.write_text(f"Mode s\nDomain sender.test\nSelector od\nKeyFile {key}\nSyslog no\n"
                    f"RequireSafeKeys no\nCanonicalization {canon}\n")
    source = folder / "message.eml"
    source.write_bytes(message)
    out = subprocess.run(["opendkim", "-x", str(conf), "-t", str(source)], check=True,
                         capture_output=True, timeout=60).stdout
    # "opendkim: FILE:", then the header field (folded with CRLF, ended with LF)
    header = out.split(b"\n", 1)[1]
    assert header.startswith(b"DKIM-Signature:"), out
    return header.rstrip(b"\r\n").replace(b"\r\n", b"\n").replace(b"\n", b"\r\n") + b"\r\n"


def perl_sign(tmp_path: Path, method: str, message: bytes) -> bytes:
    key = tmp_path / "perl.pem"
    key.write_bytes(PERL_KEY.pem)
    result = subprocess.run(["perl", "-e", PERL_SIGNER, str(key), method], input=message,
                            check=True, capture_output=True, timeout=60)
    assert result.stdout.startswith(b"DKIM-Signature:"), result.stderr
    return result.stdout


@pytest.mark.parametrize("canon", ["relaxed/relaxed", "simple/simple", "relaxed/simple"])
def test_opendkim_signatures_verify(require_peer: Callable[..., str], opendkim_key: Path,
                                    dns_server: TestDNS, canon: str) -> None:
    require_peer("opendkim")
    signed = opendkim_sign(opendkim_key, canon, MESSAGE) + MESSAGE
    [result] = verify(dns_server, signed)
    assert (result.result, result.domain, result.selector) == ("pass", "sender.test", "od"), (
        result.reason)
    [changed] = verify(dns_server, signed.replace(b"empty line", b"blank line"))
    assert changed.result == "fail"


@pytest.mark.parametrize("method", ["relaxed", "simple", "relaxed/simple"])
def test_mail_dkim_signatures_verify(require_peer: Callable[..., str], tmp_path: Path,
                                     dns_server: TestDNS, method: str) -> None:
    require_peer("perl")
    signed = perl_sign(tmp_path, method, MESSAGE) + MESSAGE
    [result] = verify(dns_server, signed)
    assert (result.result, result.selector) == ("pass", "perl"), result.reason
    [changed] = verify(dns_server, signed.replace(b"Subject: signed", b"Subject: Signed"))
    assert changed.result == "fail"
