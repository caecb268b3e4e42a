"""Log lines of the queue's deliveries, in Postfix's shape, so grep finds a message's life."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from postroom.queue.envelope import Envelope, Recipient

log = logging.getLogger("postroom.queue")


@dataclass(frozen=True)
class Timing:
    """When one delivery began and ended, and when its attempt started (clock values)."""

    started: float  # the attempt of the whole message
    begun: float  # this delivery, once it had its slot
    ended: float


def log_result(envelope: Envelope, recipient: Recipient, word: str, timing: Timing) -> None:
    """Log what the attempt did to `recipient` (its state as just recorded), as Postfix does:

        QUEUEID: to=<x>, orig_to=<y>, relay=host[ip]:port, delay=12, delays=a/b/c,
        dsn=4.4.1, status=deferred (text)

    delay is the time since arrival; delays splits this attempt into the time
    queued before it / waiting for a delivery slot / the delivery itself. No
    remote MTA: relay=local when delivered here, relay=none when no host answered.
    """
    orig = ""
    if recipient.orcpt:
        original = (recipient.orcpt.partition(";")[2] or recipient.orcpt).strip()
        if original != recipient.address:
            orig = f", orig_to=<{original}>"
    delays = "/".join(
        _seconds(x) for x in (timing.started - envelope.created, timing.begun - timing.started,
                              timing.ended - timing.begun)
    )
    log.info(
        "%s: to=<%s>%s, relay=%s, delay=%s, delays=%s, dsn=%s, status=%s (%s)",
        envelope.queue_id, recipient.address, orig,
        recipient.remote_mta or ("local" if recipient.state == "delivered" else "none"),
        _seconds(timing.ended - envelope.created), delays, recipient.dsn_status, word,
        " ".join((recipient.last_error or "").split()),
    )


def _seconds(value: float) -> str:
    """A duration as Postfix logs it: two decimals at most, whole seconds from 100 on."""
    value = max(0.0, value)
    if value >= 100:
        return f"{value:.0f}"
    return f"{value:.2f}".rstrip("0").rstrip(".") or "0"
