"""Connection counting: how many sessions in all, and how many from one client address.

A limit on concurrent connections keeps one busy or hostile client from using
every slot (Postfix: smtpd_client_connection_count_limit, default 50, and the
process limit of 100). Over the limit the client gets a 421 greeting
(RFC 5321 3.8: a server may refuse a connection with 421 at the start). Near
the limit the server is under stress, and each request gets less time
(Postfix: smtpd_timeout = ${stress?{10}:{300}}s), so that slow clients give
their slots back sooner.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

# The share of max_total at which the server is under stress.
STRESS_FRACTION = 0.8
# The most time a request (a command line, or a stretch of content) gets under
# stress: Postfix's smtpd_timeout under stress.
STRESS_TIMEOUT = 10.0


class ConnectionLimiter:
    """Counts open connections; `acquire` says whether one more may start."""

    def __init__(self, max_total: int, max_per_client: int) -> None:
        self.max_total = max_total
        self.max_per_client = max_per_client
        self.total = 0
        self.per_client: Counter[str] = Counter()
        # Called when the count reaches stress: sessions already waiting get less time.
        self.on_stress: Callable[[], None] | None = None

    def acquire(self, client: str) -> bool:
        if self.max_total and self.total >= self.max_total:
            return False
        if self.max_per_client and self.per_client[client] >= self.max_per_client:
            return False
        calm = not self.stressed
        self.total += 1
        self.per_client[client] += 1
        if calm and self.stressed and self.on_stress is not None:
            self.on_stress()
        return True

    @property
    def stressed(self) -> bool:
        """Most connection slots are taken (see STRESS_FRACTION)."""
        return bool(self.max_total) and self.total >= self.max_total * STRESS_FRACTION

    def timeout(self, normal: float) -> float:
        """The time a request gets now: `normal`, or at most STRESS_TIMEOUT under stress."""
        return min(normal, STRESS_TIMEOUT) if self.stressed else normal

    def release(self, client: str) -> None:
        self.total -= 1
        self.per_client[client] -= 1
        if self.per_client[client] <= 0:
            del self.per_client[client]
