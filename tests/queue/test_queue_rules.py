"""The queue's outcome rules, called directly: no scheduler, no asyncio, no disk."""

from __future__ import annotations

from typing import Any

import pytest

from postroom.queue.dsn import DOUBLE_BOUNCE
from postroom.queue.envelope import Envelope, Recipient
from postroom.queue.result import DeliveryResult
from postroom.queue.rules import (
    JITTER,
    OWED,
    Rules,
    Verdict,
    delay_notice_due,
    judge,
    match_results,
    next_attempt,
    owed_notices,
    retry_delay,
)

T0 = 1_700_000_000.0
DAY = 86400.0
RULES = Rules(retry_after=(60.0, 300.0, 900.0, 3600.0), give_up_after=5 * DAY,
              delay_warning_after=4 * 3600.0, postmaster="postmaster@corp.example")
MX = "mx.isp.example[192.0.2.1]:25"


def envelope(*recipients: Recipient | str, **fields: Any) -> Envelope:
    rcpts = [r if isinstance(r, Recipient) else Recipient(r) for r in recipients]
    fields.setdefault("sender", "boss@corp.example")
    return Envelope(queue_id="MSG000000001", recipients=rcpts, created=T0, **fields)


def result(address: str, outcome: Any, status: str, text: str = "reply",
           remote: str | None = MX, **kw: Any) -> DeliveryResult:
    return DeliveryResult(address, outcome, status, text, remote, **kw)


def verdict_of(env: Envelope, res: DeliveryResult | None, at: float = T0 + 10,
               rules: Rules = RULES, recipient: int = 0) -> Verdict:
    return judge(env, env.recipients[recipient], res, at, rules)


# -- what a result does to a recipient -------------------------------------------------


def test_delivered_is_sent_with_no_notice_by_default() -> None:
    env = envelope("a@isp.example")
    v = verdict_of(env, result("a@isp.example", "delivered", "2.0.0", "250 2.0.0 Ok"))
    assert (v.state, v.word, v.dsn_status, v.text, v.remote_mta, v.notice) == (
        "delivered", "sent", "2.0.0", "250 2.0.0 Ok", MX, None)


@pytest.mark.parametrize(
    ("res", "notice"),
    [
        # A next hop without DSN: we report "relayed" (RFC 3461 5.2.2).
        (result("a@isp.example", "delivered", "2.0.0", relayed_without_dsn=True), "relayed"),
        # A DSN-capable next hop took the duty over: nothing from us.
        (result("a@isp.example", "delivered", "2.0.0"), None),
        # Delivered here: "delivered", or "expanded" for an alias of several mailboxes.
        (result("a@isp.example", "delivered", "2.0.0", remote=None), "delivered"),
        (result("a@isp.example", "delivered", "2.0.0", remote=None, expanded=True), "expanded"),
    ],
)
def test_success_notices_owed_when_asked_for(res: DeliveryResult, notice: str | None) -> None:
    env = envelope(Recipient("a@isp.example", notify=("SUCCESS",)))
    assert verdict_of(env, res).notice == notice
    plain = envelope("a@isp.example")  # no NOTIFY: no success notice ever
    assert verdict_of(plain, res).notice is None


def test_permanent_is_bounced_with_a_failure_notice() -> None:
    env = envelope("a@isp.example")
    v = verdict_of(env, result("a@isp.example", "permanent", "5.1.1", "550 5.1.1 no such user"))
    assert (v.state, v.word, v.dsn_status, v.text, v.notice) == (
        "bounced", "bounced", "5.1.1", "550 5.1.1 no such user", "failed")


def test_notify_without_failure_bounces_silently() -> None:
    env = envelope(Recipient("a@isp.example", notify=("SUCCESS", "DELAY")))
    v = verdict_of(env, result("a@isp.example", "permanent", "5.1.1"))
    assert (v.state, v.notice, v.dropped) == ("bounced", None, None)


def test_temporary_is_deferred_until_the_message_is_too_old() -> None:
    env = envelope("a@isp.example")
    failure = result("a@isp.example", "temporary", "4.4.1", "connect to mx: Connection refused")
    v = verdict_of(env, failure, at=T0 + 5 * DAY)  # exactly give_up_after: still tried
    assert (v.state, v.word, v.dsn_status, v.notice) == ("deferred", "deferred", "4.4.1", None)
    v = verdict_of(env, failure, at=T0 + 5 * DAY + 1)
    assert (v.state, v.word, v.dsn_status, v.notice) == ("bounced", "bounced", "5.4.7", "failed")
    assert v.text == "delivery time expired; last error: connect to mx: Connection refused"
    assert v.remote_mta == MX


def test_no_result_is_a_temporary_failure() -> None:
    v = verdict_of(envelope("a@isp.example"), None)
    assert (v.state, v.dsn_status, v.text) == ("deferred", "4.3.0", "the courier gave no result")


def test_mail_from_null_is_never_bounced_to_its_sender() -> None:
    """A failure of mail from <> goes to the postmaster (a double bounce); one of
    those that fails too, or any with no postmaster, is dropped (RFC 5321 6.1)."""
    bounce = envelope("gone@isp.example", sender="")
    failed = result("gone@isp.example", "permanent", "5.1.1")
    assert verdict_of(bounce, failed).notice == "postmaster"
    v = verdict_of(bounce, failed, rules=Rules(postmaster=None))
    assert (v.state, v.notice, v.dropped) == ("bounced", None, "mail from <>")
    double = envelope("postmaster@corp.example", sender="", extra={DOUBLE_BOUNCE: True})
    v = verdict_of(double, result("postmaster@corp.example", "permanent", "5.1.1"))
    assert (v.state, v.notice, v.dropped) == ("bounced", None, "postmaster notice")
    expired = verdict_of(bounce, result("gone@isp.example", "temporary", "4.4.1"),
                         at=T0 + 6 * DAY)
    assert (expired.dsn_status, expired.notice) == ("5.4.7", "postmaster")
    assert verdict_of(bounce, result("gone@isp.example", "delivered", "2.0.0",
                                     remote=None)).notice is None


def test_record_writes_the_verdict_and_the_notice_owed() -> None:
    env = envelope("a@isp.example", "b@isp.example")
    a, b = env.recipients
    v = verdict_of(env, result("a@isp.example", "permanent", "5.1.1", "550 no"))
    v.record(env, a, T0 + 10)
    assert (a.state, a.dsn_status, a.last_error, a.remote_mta, a.done_at) == (
        "bounced", "5.1.1", "550 no", MX, T0 + 10)
    deferred = verdict_of(env, result("b@isp.example", "temporary", "4.4.1"), recipient=1)
    deferred.record(env, b, T0 + 10)
    assert (b.state, b.done_at) == ("deferred", None)
    assert env.extra[OWED] == {"a@isp.example": "failed"}


def test_results_match_their_recipient_exactly_first_then_in_any_case() -> None:
    env = envelope("a@isp.example", "A@isp.example", "b@isp.example")
    results = [result("A@ISP.example", "permanent", "5.1.1"),
               result("a@isp.example", "delivered", "2.0.0"),
               result("A@isp.example", "temporary", "4.4.1"),
               result("stranger@isp.example", "delivered", "2.0.0")]
    matched, unmatched = match_results(env.recipients, results)
    assert [m.outcome if m else None for m in matched] == ["delivered", "temporary", None]
    assert [u.recipient for u in unmatched] == ["A@ISP.example", "stranger@isp.example"]


# -- when a message is tried again ---------------------------------------------------


def test_retry_intervals_follow_the_table_then_repeat_the_last() -> None:
    assert [retry_delay(n, RULES) for n in range(0, 7)] == [
        60.0, 60.0, 300.0, 900.0, 3600.0, 3600.0, 3600.0]
    assert retry_delay(2, RULES, 1 - JITTER) == pytest.approx(270.0)
    assert retry_delay(2, RULES, 1 + JITTER) == pytest.approx(330.0)
    assert retry_delay(3, Rules(retry_after=())) == 300.0  # none given: a default


def test_the_most_tried_recipient_sets_the_next_attempt() -> None:
    env = envelope(Recipient("a@isp.example", state="deferred", attempts=1),
                   Recipient("b@isp.example", state="deferred", attempts=3),
                   Recipient("c@isp.example", state="delivered", attempts=9))
    assert next_attempt(env, T0 + 100, RULES) == T0 + 100 + 900.0


# -- delay notices ---------------------------------------------------------------------


def test_a_delay_notice_is_due_once_for_the_deferred_who_want_it() -> None:
    env = envelope(Recipient("a@isp.example", state="deferred"),
                   Recipient("b@isp.example", state="deferred", notify=("FAILURE",)),
                   Recipient("c@isp.example", state="deferred", notify=("DELAY",)),
                   Recipient("d@isp.example", state="pending"),
                   Recipient("e@isp.example", state="delivered"))
    assert delay_notice_due(env, T0 + 3600, RULES) == []  # too early
    due = delay_notice_due(env, T0 + 5 * 3600, RULES)
    assert [r.address for r in due] == ["a@isp.example", "c@isp.example"]
    env.warned = True
    assert delay_notice_due(env, T0 + 5 * 3600, RULES) == []  # once
    assert delay_notice_due(envelope(Recipient("a@isp.example", state="deferred")),
                            T0 + 99 * DAY, Rules()) == []  # no delay_warning_after: never
    assert delay_notice_due(envelope(Recipient("a@isp.example", state="deferred"), sender=""),
                            T0 + 5 * 3600, RULES) == []  # mail from <> gets none


def test_owed_notices_come_failures_first() -> None:
    env = envelope("a@isp.example", "b@isp.example", "c@isp.example", "d@isp.example",
                   extra={OWED: {"a@isp.example": "delivered", "b@isp.example": "failed",
                                 "c@isp.example": "relayed", "d@isp.example": "failed"}})
    assert [(kind, [r.address for r in rs]) for kind, rs in owed_notices(env)] == [
        ("failed", ["b@isp.example", "d@isp.example"]),
        ("relayed", ["c@isp.example"]),
        ("delivered", ["a@isp.example"]),
    ]
