"""Failed logins cost time: a growing delay per client address and per account.

Password guessing is slowed, not made impossible: each failure in the recent
past doubles the wait before the next "wrong password" answer, counted both
for the client's address (one host trying many accounts) and for the account
(many hosts trying one account). Dovecot waits 2 s after a failure
(auth_failure_delay); we start there and grow to a cap.
"""

from __future__ import annotations

import time
from collections.abc import Callable

FIRST_DELAY = 2.0  # seconds after the first failure (Dovecot's auth_failure_delay)
MAX_DELAY = 15.0  # the cap: a real user who mistyped still gets an answer soon
FORGET_AFTER = 15 * 60.0  # failures older than this no longer count
MAX_TRACKED = 100_000  # keys remembered at most; the oldest are dropped first
# Failures beyond this many double the delay no further: any cap is reached long
# before, and the count of a long guessing run would overflow a float (2**1024).
MAX_DOUBLINGS = 64


class AuthThrottle:
    """Remembers recent failures and says how long to wait before answering one."""

    def __init__(
        self,
        first_delay: float = FIRST_DELAY,
        max_delay: float = MAX_DELAY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.first_delay = first_delay
        self.max_delay = max_delay
        self._clock = clock
        self._failures: dict[str, tuple[int, float]] = {}

    def _count(self, key: str, now: float) -> int:
        entry = self._failures.get(key)
        if entry is None:
            return 0
        count, last = entry
        if now - last > FORGET_AFTER:
            del self._failures[key]
            return 0
        return count

    def failed(self, client: str, account: str) -> float:
        """Record a failure; return the delay (seconds) before answering it."""
        now = self._clock()
        worst = 0
        for key in (f"ip:{client}", f"user:{account.lower()}"):
            count = self._count(key, now) + 1
            self._failures.pop(key, None)
            self._failures[key] = (count, now)  # re-inserted: dict order = recency
            worst = max(worst, count)
        while len(self._failures) > MAX_TRACKED:
            del self._failures[next(iter(self._failures))]
        doublings = min(worst - 1, MAX_DOUBLINGS)
        return float(min(self.first_delay * 2**doublings, self.max_delay))

    def failures(self, client: str) -> int:
        """Recent failures from the address `client` (forgotten FORGET_AFTER after the last)."""
        return self._count(f"ip:{client}", self._clock())

    def succeeded(self, client: str, account: str) -> None:
        """A good login clears the account's record (not the address's)."""
        self._failures.pop(f"user:{account.lower()}", None)
