"""Bounces that reach someone: `postroom sendmail`'s default sender, and double bounces.

A running server (corp.example, users boss@ and alice@; its config lists no
domain, so the first local domain is the default "localhost") takes mail from
`postroom sendmail` through its queue. The invoking user has no mailbox here,
so the default sender is postmaster@localhost, and the bounce of a message to
an unknown user reaches the postmaster (an alias of boss@ here). A bounce that
cannot be delivered either (its sender does not exist) goes to the postmaster
as a double bounce, once (a double bounce that fails is logged and dropped:
tests/queue).
"""

from __future__ import annotations

import email
import email.message
import email.policy
from collections.abc import Callable

import pytest
from mailcheck import new_token
from mailharness import Postroom

BOSS = "boss@corp.example"
POSTMASTER = "postmaster@localhost"  # postmaster@ the first local domain
POSTMASTER_ALIAS = {POSTMASTER: [BOSS]}


def sendmail(server: Postroom, token: str, *args: str) -> None:
    message = f"Subject: cron {token}\n\nouput of a job {token}\n"
    result = server.cli("sendmail", *args, stdin=message)
    assert result.returncode == 0, result.stderr


def report_parts(raw: bytes) -> tuple[email.message.EmailMessage, list[email.message.Message]]:
    report = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(report, email.message.EmailMessage)
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    text, status, returned = report.iter_parts()
    assert text.get_content_type() == "text/plain"
    assert status.get_content_type() == "message/delivery-status"
    payload = status.get_payload()
    assert isinstance(payload, list)
    assert returned.get_content_type() == "message/rfc822"
    return report, [*payload, returned]


def test_sendmail_default_sender_gets_its_bounce(
    postroom_factory: Callable[..., Postroom],
) -> None:
    server = postroom_factory(aliases=POSTMASTER_ALIAS)
    token = new_token()
    sendmail(server, token, "nosuch@corp.example")  # no -f: the default sender
    (raw,) = server.wait_for_message(BOSS, token.encode(), timeout=40)
    report, (per_message, block, returned) = report_parts(raw)
    assert report["To"].addresses[0].addr_spec == POSTMASTER
    assert report["Subject"] == "Undelivered Mail Returned to Sender"
    assert (block["Final-Recipient"], block["Action"], block["Status"]) == (
        "rfc822; nosuch@corp.example", "failed", "5.1.1")
    original = returned.get_payload()[0]
    assert original["From"] == POSTMASTER
    assert per_message["Reporting-MTA"] == "dns; mx.corp.example"


@pytest.mark.parametrize("postmaster", [True, False], ids=["postmaster", "no-postmaster"])
def test_a_bounce_that_cannot_be_delivered_goes_to_the_postmaster_once(
    postroom_factory: Callable[..., Postroom], postmaster: bool
) -> None:
    server = postroom_factory(aliases=POSTMASTER_ALIAS if postmaster else {})
    token = new_token()
    sendmail(server, token, "-f", "gone@corp.example", "nosuch@corp.example")
    # With no alias, postmaster@ is filed in the administrator's mailbox (the config's
    # `postmaster`, here postmaster@localhost itself), user or not (RFC 5321 4.5.1).
    mailbox = BOSS if postmaster else POSTMASTER
    (raw,) = server.wait_for_message(mailbox, token.encode(), timeout=40)
    report, (_per_message, block, returned) = report_parts(raw)
    assert report["Subject"] == "Postmaster Copy: Undeliverable Mail from <>"
    assert report["To"].addresses[0].addr_spec == POSTMASTER
    # It reports the bounce that could not reach gone@corp.example ...
    assert (block["Final-Recipient"], block["Action"], block["Status"]) == (
        "rfc822; gone@corp.example", "failed", "5.1.1")
    bounce = returned.get_payload()[0]
    assert bounce["Subject"] == "Undelivered Mail Returned to Sender"
    assert bounce["To"].addresses[0].addr_spec == "gone@corp.example"
    # ... which reported the message to nosuch@corp.example.
    assert token.encode() in bounce.as_bytes()
