"""The queue's outcome rules: what a delivery result does to a recipient, and what follows.

Pure functions of the envelope, the results and the time: no I/O, no clock,
no asyncio; the scheduler (postroom.queue.scheduler) applies them. What a
result does to a recipient, by outcome:

    delivered  -> "delivered"  (a success notice if NOTIFY asked for one, RFC 3461)
    permanent  -> "bounced"    (a failure notice to the sender)
    temporary  -> "deferred"   (retried later) or, once the message is older than
                  give_up_after, "bounced" with 5.4.7 and a failure notice

A failure notice cannot go to the null sender <>: mail from <> that bounces
(a bounce to a sender who does not exist) is reported to the postmaster
instead (a double bounce); one of those that bounces too is logged and
dropped, never reported again (RFC 5321 6.1: no loops).

Retries wait `retry_after[n-1]` after the n-th failed attempt (the last
interval repeats), times a random factor in [1 - JITTER, 1 + JITTER] that
spreads out messages that failed together, so they do not all hit a
recovering host in the same second. One delay notice (RFC 3464) goes out
once a message has waited `delay_warning_after`, about the recipients still
deferred that want one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, cast

from postroom.queue.dsn import DOUBLE_BOUNCE, Action, wants_dsn
from postroom.queue.envelope import Envelope, Recipient
from postroom.queue.result import DeliveryResult

JITTER = 0.1  # retry intervals vary by +-10 %
DEFAULT_RETRY = 300.0  # seconds, where no retry interval is given at all
EXPIRED_STATUS = "5.4.7"  # RFC 3463 X.4.7: delivery time expired
NO_RESULT_STATUS = "4.3.0"  # RFC 3463 X.3.0: a fault of this mail system, retried
OWED = "dsn_owed"  # envelope.extra key: {address: notice} of notices not yet queued
TO_POSTMASTER: Literal["postmaster"] = "postmaster"  # owed for mail from <> that bounced
# The order in which owed notices are queued: failures first.
NOTICE_ORDER = ("failed", TO_POSTMASTER, "relayed", "expanded", "delivered")

Notice = Action | Literal["postmaster"]


@dataclass(frozen=True)
class Rules:
    """The settings the rules read ([queue] in the config, and the postmaster)."""

    retry_after: tuple[float, ...] = (DEFAULT_RETRY,)  # seconds; the last one repeats
    give_up_after: float = 5 * 86400.0  # seconds after arrival, then bounced
    delay_warning_after: float | None = None  # seconds before a delay notice; None: never
    postmaster: str | None = None  # where reports on mail from <> go; None: dropped


@dataclass(frozen=True)
class Verdict:
    """What one delivery result does to one recipient."""

    state: Literal["delivered", "bounced", "deferred"]
    word: Literal["sent", "bounced", "deferred"]  # the log's status= (Postfix's words)
    dsn_status: str  # RFC 3463
    text: str  # the reply or the failure, as the log and the notices show it
    remote_mta: str | None
    notice: Notice | None = None  # the notice this result owes, if any
    dropped: str | None = None  # a report on mail from <> not sent: what was dropped

    def record(self, envelope: Envelope, recipient: Recipient, at: float) -> None:
        """Write the verdict into the recipient, and the notice owed into the envelope."""
        recipient.state = self.state
        recipient.dsn_status, recipient.last_error = self.dsn_status, self.text
        recipient.remote_mta = self.remote_mta
        if self.state != "deferred":
            recipient.done_at = at
        if self.notice is not None:
            envelope.extra.setdefault(OWED, {})[recipient.address] = self.notice


def judge(
    envelope: Envelope, recipient: Recipient, result: DeliveryResult | None, at: float,
    rules: Rules,
) -> Verdict:
    """The verdict on one recipient's result of an attempt that ended `at` (the table
    in the module docstring); no result at all is a temporary failure."""
    if result is None:
        result = DeliveryResult(recipient.address, "temporary", NO_RESULT_STATUS,
                                "the courier gave no result")
    status, text, remote = result.dsn_status, result.text, result.remote_mta
    if result.outcome == "delivered":
        action: Action = (
            "relayed" if result.relayed_without_dsn else "expanded" if result.expanded
            else "delivered"
        )
        # A DSN-capable next hop took over the notice (RFC 3461 5.2.2); only
        # local deliveries and hops without DSN are reported by us.
        ours = result.relayed_without_dsn or result.remote_mta is None
        notice = action if ours and wants_dsn(envelope, recipient, action) else None
        return Verdict("delivered", "sent", status, text, remote, notice)
    if result.outcome == "temporary" and at - envelope.created <= rules.give_up_after:
        return Verdict("deferred", "deferred", status, text, remote)
    if result.outcome == "temporary":
        status, text = EXPIRED_STATUS, f"delivery time expired; last error: {text}"
    if wants_dsn(envelope, recipient, "failed"):
        return Verdict("bounced", "bounced", status, text, remote, "failed")
    if envelope.sender != "":
        return Verdict("bounced", "bounced", status, text, remote)  # NOTIFY without FAILURE
    if envelope.extra.get(DOUBLE_BOUNCE):
        return Verdict("bounced", "bounced", status, text, remote, dropped="postmaster notice")
    if rules.postmaster is None:
        return Verdict("bounced", "bounced", status, text, remote, dropped="mail from <>")
    return Verdict("bounced", "bounced", status, text, remote, TO_POSTMASTER)


def match_results(
    recipients: Sequence[Recipient], results: Sequence[DeliveryResult]
) -> tuple[list[DeliveryResult | None], list[DeliveryResult]]:
    """Each recipient's result (None when the courier gave none), and the results
    that name no recipient. A result matches its address as spelled first, then
    in any case."""
    unmatched = list(results)
    return [_take_result(unmatched, r.address) for r in recipients], unmatched


def retry_delay(failures: int, rules: Rules, jitter: float = 1.0) -> float:
    """Seconds to wait after the `failures`-th failed attempt, times `jitter` (a factor
    drawn from [1 - JITTER, 1 + JITTER])."""
    intervals = rules.retry_after or (DEFAULT_RETRY,)
    return intervals[min(max(failures, 1), len(intervals)) - 1] * jitter


def next_attempt(envelope: Envelope, now: float, rules: Rules, jitter: float = 1.0) -> float:
    """When a message that is not done is tried again, after an attempt that ended `now`:
    its most tried recipient sets the interval."""
    failures = max((r.attempts for r in envelope.pending()), default=1)
    return now + retry_delay(failures, rules, jitter)


def delay_notice_due(envelope: Envelope, now: float, rules: Rules) -> list[Recipient]:
    """The recipients a delay notice is owed for now (none once one was sent): the
    deferred ones that want it, once the message has waited delay_warning_after."""
    after = rules.delay_warning_after
    if after is None or envelope.warned or now - envelope.created < after:
        return []
    return [r for r in envelope.pending()
            if r.state == "deferred" and wants_dsn(envelope, r, "delayed")]


def owed_notices(envelope: Envelope) -> list[tuple[Notice, list[Recipient]]]:
    """The notices recorded as owed (envelope.extra OWED), each with its recipients,
    in NOTICE_ORDER."""
    owed: dict[str, str] = envelope.extra.get(OWED) or {}
    notices = []
    for kind in NOTICE_ORDER:
        recipients = [r for r in envelope.recipients if owed.get(r.address) == kind]
        if recipients:
            notices.append((cast(Notice, kind), recipients))
    return notices


def result_of(recipient: Recipient) -> DeliveryResult:
    """The last result of a recipient, rebuilt from its stored state (for notices)."""
    outcome = {"delivered": "delivered", "bounced": "permanent"}.get(recipient.state, "temporary")
    return DeliveryResult(
        recipient=recipient.address,
        outcome=outcome,  # type: ignore[arg-type]
        dsn_status=recipient.dsn_status or "",
        text=recipient.last_error or "",
        remote_mta=recipient.remote_mta,
    )


def _take_result(results: list[DeliveryResult], address: str) -> DeliveryResult | None:
    """Remove and return the result for `address` (exact spelling first, then any case)."""
    for exact in (True, False):
        for i, result in enumerate(results):
            if result.recipient == address or (
                not exact and result.recipient.lower() == address.lower()
            ):
                return results.pop(i)
    return None
