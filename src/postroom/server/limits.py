"""Connection counting: how many sessions in all, and how many from one client address.

A limit on concurrent connections keeps one busy or hostile client from using
every slot (Postfix: smtpd_client_connection_count_limit, default 50, and the
process limit of 100). Over the limit the client gets a 421 greeting
(RFC 5321 3.8: a server may refuse a connection with 421 at the start).
"""

from __future__ import annotations

from collections import Counter


class ConnectionLimiter:
    """Counts open connections; `acquire` says whether one more may start."""

    def __init__(self, max_total: int, max_per_client: int) -> None:
        self.max_total = max_total
        self.max_per_client = max_per_client
        self.total = 0
        self.per_client: Counter[str] = Counter()

    def acquire(self, client: str) -> bool:
        if self.max_total and self.total >= self.max_total:
            return False
        if self.max_per_client and self.per_client[client] >= self.max_per_client:
            return False
        self.total += 1
        self.per_client[client] += 1
        return True

    def release(self, client: str) -> None:
        self.total -= 1
        self.per_client[client] -= 1
        if self.per_client[client] <= 0:
            del self.per_client[client]
