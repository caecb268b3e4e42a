"""The queue's shape, as Postfix's qshape shows it: pending recipients by domain and age.

Columns are age buckets in minutes since the message arrived, each twice the
one before (qshape's default: 5, 10, 20, ... 1280, then older), with a total
first; rows are destination domains, busiest first, under a TOTAL row. It is
counted while the envelopes stream by, so memory grows with the number of
domains, never with the number of messages.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from postroom.queue.envelope import Envelope

# qshape's default buckets: 5 minutes, then each twice the one before, ten in all.
FIRST_BUCKET_MINUTES = 5
BUCKETS = 10


def bucket_limits() -> list[int]:
    """The upper age limit, in minutes, of each bucket but the last (which is open)."""
    return [FIRST_BUCKET_MINUTES << i for i in range(BUCKETS - 1)]


@dataclass
class Shape:
    """Counts of pending recipients: `rows[domain][bucket]`."""

    rows: dict[str, list[int]] = field(default_factory=dict)
    messages: int = 0

    def add(self, envelope: Envelope, now: float) -> None:
        minutes = max(0.0, now - envelope.created) / 60
        bucket = next((i for i, limit in enumerate(bucket_limits()) if minutes < limit),
                      BUCKETS - 1)
        self.messages += 1
        for recipient in envelope.recipients:
            if recipient.final:
                continue
            domain = recipient.address.rpartition("@")[2].lower() or "(local)"
            row = self.rows.get(domain)
            if row is None:
                row = self.rows[domain] = [0] * BUCKETS
            row[bucket] += 1

    def table(self, top: int | None = None) -> list[list[str]]:
        """Heading, TOTAL, then one row per domain (busiest first, `top` of them), each
        as [name, total, bucket counts...]."""
        heading = ["", "T", *(str(limit) for limit in bucket_limits()),
                   f"{bucket_limits()[-1]}+"]
        totals = [sum(column) for column in zip(*self.rows.values(), strict=True)] \
            if self.rows else [0] * BUCKETS
        ranked = sorted(self.rows.items(), key=lambda item: (-sum(item[1]), item[0]))
        if top is not None:
            ranked = ranked[:top]
        lines = [heading, ["TOTAL", str(sum(totals)), *map(str, totals)]]
        lines += [[domain, str(sum(row)), *map(str, row)] for domain, row in ranked]
        return lines


def shape_of(envelopes: Iterable[Envelope], now: float) -> Shape:
    shape = Shape()
    for envelope in envelopes:
        shape.add(envelope, now)
    return shape
