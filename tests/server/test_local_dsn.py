"""Success reports (RFC 3464) for local recipients that asked with NOTIFY=SUCCESS (RFC 3461).

Local mail from SMTP is filed by the session itself, not through the queue;
mail from `postroom sendmail` goes through the queue and the local courier.
Either way the reports are queued mail like bounces and reach the sender's
Maildir here.
Each report is parsed back with the email package: a multipart/report whose
message/delivery-status part keeps the ORCPT as Original-Recipient, says
"delivered" for a mailbox and "expanded" for an alias that reached several.
"""

from __future__ import annotations

import asyncio
import email
import email.message
import email.policy
import io
import smtplib
import ssl
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from postroom.client.sendmail import parse_args, submit
from postroom.config import load_config
from postroom.server.main import Running, start
from postroom.store.factory import open_store

SMITH = "smith@isp.example"
MESSAGE = (b"From: Smith <smith@isp.example>\r\nTo: jones@isp.example\r\n"
           b"Subject: quarterly report\r\nMessage-ID: <q1@isp.example>\r\n\r\nNumbers.\r\n")


@asynccontextmanager
async def running_server(tmp_path: Path) -> AsyncIterator[Running]:
    (tmp_path / "postroom.toml").write_text(
        'hostname = "mail.isp.example"\ndomains = ["isp.example"]\n'
        '[listen]\nsmtp = "127.0.0.1:0"\nsubmission = "127.0.0.1:0"\n'
    )
    config = load_config(tmp_path)
    directory = open_store(config.store).users
    directory.add_user(SMITH, "smith-secret")
    directory.add_user("jones@isp.example", "jones-secret")
    directory.add_alias("team@isp.example", [SMITH, "jones@isp.example"])
    directory.close()
    running = await start(config)
    try:
        yield running
    finally:
        await running.stop(grace=2)


def send(server: Running, listener: str, message: bytes) -> dict[str, tuple[int, bytes]]:
    """One transaction (BLOCKING): the recipients' RCPT replies."""
    with smtplib.SMTP(*server.address(listener), timeout=10) as client:
        client.ehlo("client.example")
        if listener == "submission":
            context = ssl.create_default_context()
            context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
            client.starttls(context=context)
            client.login(SMITH, "smith-secret")
        client.mail(SMITH, ["RET=HDRS", "ENVID=Q1-2026"])
        replies = {
            "jones": client.rcpt("jones@isp.example",
                                 ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;j.ones@old.example"]),
            "team": client.rcpt("team@isp.example", ["NOTIFY=SUCCESS"]),
            "quiet": client.rcpt(SMITH, ["NOTIFY=FAILURE"]),  # wants no success report
        }
        code, _ = client.data(message)
        assert code == 250
    return replies


async def wait_for_reports(tmp_path: Path, count: int) -> list[email.message.EmailMessage]:
    deadline = time.monotonic() + 20
    while len(found := reports(tmp_path)) < count and time.monotonic() < deadline:
        await asyncio.sleep(0.05)  # the scheduler files the reports meanwhile
    return found


def reports(tmp_path: Path) -> list[email.message.EmailMessage]:
    folder = tmp_path / "mail" / "isp.example" / "smith" / "new"
    found = []
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        message = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
        assert isinstance(message, email.message.EmailMessage)
        if message.get_content_type() == "multipart/report":
            found.append(message)
    return found


@pytest.mark.parametrize("listener", ["smtp", "submission"])
@pytest.mark.parametrize("size", ["small", "large"])  # large: spooled to a file, not held
def test_notify_success_to_local_recipients_gets_a_delivered_report(
    tmp_path: Path, listener: str, size: str
) -> None:
    message = MESSAGE + (b"x" * 76 + b"\r\n") * 8000 if size == "large" else MESSAGE

    async def scenario() -> list[email.message.EmailMessage]:
        async with running_server(tmp_path) as server:
            replies = await asyncio.to_thread(send, server, listener, message)
            assert all(code == 250 for code, _ in replies.values()), replies
            return await wait_for_reports(tmp_path, 2)

    found = asyncio.run(scenario())
    assert len(found) == 2, [m["Subject"] for m in found]
    by_action = {}
    for report in found:
        assert report["To"].addresses[0].addr_spec == SMITH
        assert report["Subject"] == "Successful Mail Delivery Report"
        assert report["Auto-Submitted"] == "auto-replied"
        assert report.get_param("report-type") == "delivery-status"
        text, status, returned = report.iter_parts()
        assert text.get_content_type() == "text/plain"
        assert status.get_content_type() == "message/delivery-status"
        per_message, *blocks = status.get_payload()
        assert per_message["Reporting-MTA"] == "dns; mail.isp.example"
        assert per_message["Original-Envelope-Id"] == "Q1-2026"  # RFC 3464 2.2.1
        (block,) = blocks
        by_action[str(block["Action"])] = block
        # RET=HDRS: only the header section comes back (RFC 3461 4.3).
        assert returned.get_content_type() == "text/rfc822-headers"
        assert b"Subject: quarterly report" in returned.get_payload(decode=True)
        assert b"Numbers." not in returned.get_payload(decode=True)
    delivered, expanded = by_action["delivered"], by_action["expanded"]
    assert delivered["Final-Recipient"] == "rfc822; jones@isp.example"
    assert delivered["Original-Recipient"] == "rfc822; j.ones@old.example"  # ORCPT kept
    assert delivered["Status"] == "2.0.0"
    assert expanded["Final-Recipient"] == "rfc822; team@isp.example"
    assert expanded["Original-Recipient"] is None
    assert expanded["Status"] == "2.0.0"


def test_sendmail_notify_success_through_the_local_courier(tmp_path: Path) -> None:
    async def scenario() -> list[email.message.EmailMessage]:
        async with running_server(tmp_path) as server:
            opts = parse_args(["-N", "success", "-f", SMITH, "jones@isp.example",
                               "team@isp.example"])
            stdin = io.BytesIO(b"Subject: from cron\n\nall done\n")
            await asyncio.to_thread(submit, stdin, opts, server.config, user="smith")
            server.relay.rescan()  # what sendmail's SIGUSR1 does
            return await wait_for_reports(tmp_path, 2)

    found = asyncio.run(scenario())
    actions = {}
    for report in found:
        _text, status, returned = report.iter_parts()
        _per_message, block = status.get_payload()
        actions[str(block["Action"])] = str(block["Final-Recipient"])
        assert block["Status"] == "2.0.0"
        assert returned.get_content_type() == "message/rfc822"  # RET not given: all of it
    assert actions == {"delivered": "rfc822; jones@isp.example",
                       "expanded": "rfc822; team@isp.example"}
