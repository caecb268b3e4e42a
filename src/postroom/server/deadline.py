"""Per-request deadlines: a whole command line, or content at a minimum rate, must arrive in time.

A timeout that any byte restarts lets a client hold a session, and with it a
connection slot, for ever by sending a byte every few seconds (slowloris).
Here, as with Postfix's smtpd_per_request_deadline, the time limit covers the
whole request: a command line must be complete within the command timeout of
the moment the server began to wait for it. Message content is one request
whose deadline moves out by a second for every MIN_DATA_RATE octets received
(Postfix's smtpd_min_data_rate), so a large message sent at a fair rate is
never cut short, while one trickled in is.
"""

from __future__ import annotations

# Octets of message content that earn one more second (Postfix's smtpd_min_data_rate).
MIN_DATA_RATE = 500


class RequestDeadline:
    """When the request being read must be complete (loop time, in seconds)."""

    __slots__ = ("_at", "content")

    def __init__(self) -> None:
        self._at: float | None = None
        self.content = False  # the request is message content (DATA or BDAT)

    @property
    def started(self) -> bool:
        return self._at is not None

    def start(self, now: float, limit: float, *, content: bool = False) -> None:
        """A new request begins: it must be complete within `limit` seconds."""
        self._at = now + limit
        self.content = content

    def shorten(self, now: float, limit: float) -> bool:
        """At most `limit` seconds from now are left; True if that moved the deadline."""
        if self._at is None or self._at <= now + limit:
            return False
        self._at = now + limit
        return True

    def remaining(self, now: float) -> float:
        assert self._at is not None, "start() first"
        return max(0.0, self._at - now)

    def received(self, octets: int) -> None:
        """Content arrived: the deadline of a content request moves out."""
        if self._at is not None and self.content:
            self._at += octets / MIN_DATA_RATE
