"""The seed's path across two postroom hosts in one event loop: submit, queue, relay, file.

The provider host serves isp.example and relays corp.example through a static
route to the receiving host. (The MX lookup over real DNS is tested in
tests/delivery and tests/interop.)
"""

from __future__ import annotations

import asyncio
import email
from pathlib import Path

from inprocess import corp_config, free_port, host, inbox, provider_config, submit, wait_for

REPORT = (
    b"From: Smith <smith@isp.example>\r\nTo: Boss <boss@corp.example>\r\n"
    b"Subject: quarterly report\r\n\r\nNumbers are up.\r\n.dot line\r\n"
)









def test_submitted_mail_is_relayed_and_filed_with_both_received_headers(tmp_path: Path) -> None:
    corp_port = free_port()

    async def scenario() -> None:
        async with (
            host(tmp_path / "corp", corp_config(corp_port), {"boss@corp.example": "b"}),
            host(tmp_path / "isp", provider_config(corp_port),
                 {"smith@isp.example": "smith-secret"}) as isp,
        ):
            await asyncio.to_thread(submit, isp, ["boss@corp.example"], REPORT)
            await wait_for(lambda: inbox(tmp_path / "corp", "corp.example", "boss"))
            await wait_for(lambda: not list((tmp_path / "isp" / "queue").rglob("*.json")))

    asyncio.run(scenario())
    (raw,) = inbox(tmp_path / "corp", "corp.example", "boss")
    msg = email.message_from_bytes(raw)
    received = msg.get_all("Received")
    assert len(received) == 2
    assert "by mx.corp.example (postroom) with ESMTPS" in " ".join(received[0].split())
    assert "by mail.isp.example (postroom) with ESMTPSA" in " ".join(received[1].split())
    assert raw.endswith(b"\r\n\r\nNumbers are up.\r\n.dot line\r\n")
    assert msg["Message-ID"] and msg["Date"]


def test_return_path_is_on_the_filed_copy_only(tmp_path: Path) -> None:
    """RFC 5321 4.4: the copy filed here gets the Return-Path, the relayed copy none (a
    relay must not add one), and neither keeps the one the client sent."""
    corp_port = free_port()  # nothing listens: the relayed copy stays in the queue
    sent = b"Return-Path: <forged@evil.example>\r\n" + REPORT

    async def scenario() -> None:
        async with host(tmp_path / "isp", provider_config(corp_port),
                        {"smith@isp.example": "smith-secret", "jones@isp.example": "j"}) as isp:
            await asyncio.to_thread(submit, isp, ["boss@corp.example", "jones@isp.example"],
                                    sent)
            (envelope,) = isp.relay.queue.list()
            queued = isp.relay.queue.message_path(envelope.queue_id).read_bytes()
            assert b"Return-Path" not in queued and queued.endswith(REPORT)

    asyncio.run(scenario())
    (filed,) = inbox(tmp_path / "isp", "isp.example", "jones")
    assert filed.startswith(b"Return-Path: <smith@isp.example>\r\nReceived: ")
    assert filed.count(b"Return-Path") == 1 and filed.endswith(REPORT)


def test_next_hop_down_then_back_delivers_after_retry(tmp_path: Path) -> None:
    corp_port = free_port()

    async def scenario() -> None:
        async with host(tmp_path / "isp", provider_config(corp_port),
                        {"smith@isp.example": "smith-secret"}) as isp:
            await asyncio.to_thread(submit, isp, ["boss@corp.example"], REPORT)
            await wait_for(lambda: any(
                r.state == "deferred"
                for e in isp.relay.queue.list() for r in e.recipients
            ))
            (envelope,) = isp.relay.queue.list()
            assert envelope.recipients[0].last_error
            async with host(tmp_path / "corp", corp_config(corp_port),
                            {"boss@corp.example": "b"}):
                await wait_for(lambda: inbox(tmp_path / "corp", "corp.example", "boss"))

    asyncio.run(scenario())


def test_refused_recipient_bounces_to_the_senders_mailbox(tmp_path: Path) -> None:
    corp_port = free_port()

    async def scenario() -> None:
        async with (
            host(tmp_path / "corp", corp_config(corp_port), {"boss@corp.example": "b"}),
            host(tmp_path / "isp", provider_config(corp_port),
                 {"smith@isp.example": "smith-secret"}) as isp,
        ):
            await asyncio.to_thread(submit, isp, ["nobody@corp.example", "boss@corp.example"],
                                    REPORT)
            await wait_for(lambda: inbox(tmp_path / "isp", "isp.example", "smith"))
            await wait_for(lambda: inbox(tmp_path / "corp", "corp.example", "boss"))

    asyncio.run(scenario())
    (dsn,) = inbox(tmp_path / "isp", "isp.example", "smith")
    assert dsn.startswith(b"Return-Path: <>\r\n")  # filed by the local courier (RFC 5321 4.4)
    report = email.message_from_bytes(dsn)
    assert report.get_content_type() == "multipart/report"
    status = [p for p in report.walk() if p.get_content_type() == "message/delivery-status"]
    text = status[0].as_string()
    assert "nobody@corp.example" in text and "5.1.1" in text
    assert "boss@corp.example" not in text
