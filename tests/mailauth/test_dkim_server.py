"""DKIM signing in the running server: what users submit, the reports it sends, and
`postroom sendmail`, checked by dkimpy and by the independent verifiers (Perl's
Mail::DKIM, OpenDKIM) against a DNS server on loopback."""

from __future__ import annotations

import asyncio
import email
import io
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from dkimcheck import dkimpy_verify, mail_dkim, opendkim_verify, records
from dnszone import TestDNS, serve_dns

from inprocess import corp_config, free_port, host, inbox, provider_config, submit, wait_for
from postroom.client import sendmail
from postroom.config import load_config
from postroom.mailauth.keys import DKIMKey, KeyStore
from postroom.queue.store import QueueStore

REPORT = (
    b"From: Smith <smith@isp.example>\r\nTo: Boss <boss@corp.example>\r\n"
    b"Subject: quarterly report\r\nReply-To: smith@isp.example\r\n\r\n"
    b"Numbers are up.\r\n.dot line\r\n"
)









@pytest.fixture(name="keys")
def keys_fixture(tmp_path: Path) -> tuple[DKIMKey, DKIMKey]:
    store = KeyStore(tmp_path / "isp")
    return store.add("isp.example", "r1", "rsa"), store.add("isp.example", "e1", "ed25519")


@pytest.fixture(name="dns")
def dns_fixture(keys: tuple[DKIMKey, DKIMKey]) -> Iterator[TestDNS]:
    with serve_dns(records(*keys)) as server:
        yield server


def relay(tmp_path: Path, message: bytes, rcpts: list[str] | None = None) -> list[bytes]:
    """Submit at the provider; what the corp host filed for boss."""
    corp_port = free_port()

    async def scenario() -> None:
        async with (
            host(tmp_path / "corp", corp_config(corp_port), {"boss@corp.example": "b"}),
            host(tmp_path / "isp", provider_config(corp_port),
                 {"smith@isp.example": "smith-secret"}) as isp,
        ):
            await asyncio.to_thread(submit, isp, rcpts or ["boss@corp.example"], message)
            await wait_for(lambda: inbox(tmp_path / "corp", "corp.example", "boss"))

    asyncio.run(scenario())
    return inbox(tmp_path / "corp", "corp.example", "boss")


def signatures(message: bytes) -> list[str]:
    return [" ".join(v.split()) for v in email.message_from_bytes(message).get_all(
        "DKIM-Signature") or []]


def without_signature(message: bytes, algorithm: str) -> bytes:
    """The message with the signature of `algorithm` taken out (it is not signed by the
    other), so a verifier that checks only the first one sees the other."""
    pattern = rb"DKIM-Signature: v=1; a=" + algorithm.encode() + rb"[^\r]*(\r\n[\t ][^\r]*)*\r\n"
    out, n = re.subn(pattern, b"", message)
    assert n == 1
    return out


def test_submitted_mail_is_dual_signed_and_verified_by_independent_peers(
        tmp_path: Path, keys: tuple[DKIMKey, DKIMKey], dns: TestDNS,
        require_peer: Callable[[str], str]) -> None:
    perl = require_peer("perl")
    opendkim = require_peer("opendkim")
    (raw,) = relay(tmp_path, REPORT)
    sigs = signatures(raw)
    assert len(sigs) == 2
    assert any("a=rsa-sha256" in s and "d=isp.example" in s and "s=r1" in s for s in sigs)
    assert any("a=ed25519-sha256" in s and "s=e1" in s for s in sigs)
    rsa_index = 0 if "a=rsa-sha256" in sigs[0] else 1
    assert dkimpy_verify(raw, *keys, index=rsa_index)
    verdicts = mail_dkim(perl, raw, dns.port)
    assert "isp.example r1 rsa-sha256 pass" in verdicts
    rsa_only = without_signature(raw, "ed25519-sha256")
    ed_only = without_signature(raw, "rsa-sha256")
    assert "s=r1, d=isp.example, 2048-bit key) succeeded" in opendkim_verify(
        opendkim, tmp_path, rsa_only, dns.port)
    assert "s=e1, d=isp.example" in (verdict := opendkim_verify(opendkim, tmp_path, ed_only,
                                                                dns.port))
    assert "succeeded" in verdict
    # A control: OpenDKIM does notice a change.
    assert "failed" in opendkim_verify(opendkim, tmp_path,
                                       ed_only.replace(b"Numbers are up", b"Numbers are down"),
                                       dns.port)


def test_a_large_message_is_signed_as_it_streams(tmp_path: Path,
                                                 keys: tuple[DKIMKey, DKIMKey]) -> None:
    body = b"".join(b"line %07d of a long attachment\r\n" % i for i in range(80_000))
    assert len(body) > 2_000_000  # well past the spool's in-memory limit
    (raw,) = relay(tmp_path, REPORT + body)
    sigs = signatures(raw)
    assert len(sigs) == 2
    assert dkimpy_verify(raw, *keys, index=0 if "a=rsa-sha256" in sigs[0] else 1)


def test_local_copies_are_not_signed_and_unknown_domains_go_unsigned(
        tmp_path: Path, keys: tuple[DKIMKey, DKIMKey]) -> None:
    message = REPORT.replace(b"From: Smith <smith@isp.example>", b"From: smith@isp.example")
    (raw,) = relay(tmp_path, message, ["boss@corp.example", "smith@isp.example"])
    assert len(signatures(raw)) == 2
    (own,) = inbox(tmp_path / "isp", "isp.example", "smith")
    assert signatures(own) == []


def test_a_bounce_is_signed_by_the_reporting_domain(tmp_path: Path,
                                                    keys: tuple[DKIMKey, DKIMKey]) -> None:
    corp_port = free_port()

    async def scenario() -> None:
        async with (
            host(tmp_path / "corp", corp_config(corp_port), {"boss@corp.example": "b"}),
            host(tmp_path / "isp", provider_config(corp_port),
                 {"smith@isp.example": "smith-secret"}) as isp,
        ):
            await asyncio.to_thread(submit, isp, ["nobody@corp.example"], REPORT)
            await wait_for(lambda: inbox(tmp_path / "isp", "isp.example", "smith"))

    asyncio.run(scenario())
    (dsn,) = inbox(tmp_path / "isp", "isp.example", "smith")
    sigs = signatures(dsn)
    assert len(sigs) == 2 and all("d=isp.example" in s for s in sigs)
    assert email.message_from_bytes(dsn)["From"].startswith("MAILER-DAEMON@mail.isp.example")
    assert dkimpy_verify(dsn, *keys, index=0 if "a=rsa-sha256" in sigs[0] else 1)


def test_sendmail_queues_the_message_signed(tmp_path: Path,
                                            keys: tuple[DKIMKey, DKIMKey]) -> None:
    root = tmp_path / "isp"
    (root / "postroom.toml").write_text(provider_config(free_port()))
    config = load_config(root)
    opts = sendmail.Options(recipients=["boss@corp.example"], sender="smith@isp.example")
    envelope = sendmail.submit(io.BytesIO(REPORT.replace(b"\r\n", b"\n")), opts, config,
                               user="smith")
    with QueueStore(config.queue_dir).open_content(envelope.queue_id) as content, \
            content.reader() as f:
        queued = f.read()
    sigs = signatures(queued)
    assert len(sigs) == 2
    assert dkimpy_verify(queued, *keys, index=0 if "a=rsa-sha256" in sigs[0] else 1)


def test_signing_off_in_the_config(tmp_path: Path, keys: tuple[DKIMKey, DKIMKey]) -> None:
    root = tmp_path / "isp"
    (root / "postroom.toml").write_text(provider_config(free_port()) + "[dkim]\nsign = false\n")
    config = load_config(root)
    opts = sendmail.Options(recipients=["boss@corp.example"], sender="smith@isp.example")
    envelope = sendmail.submit(io.BytesIO(REPORT), opts, config, user="smith")
    with QueueStore(config.queue_dir).open_content(envelope.queue_id) as content, \
            content.reader() as f:
        assert signatures(f.read()) == []
