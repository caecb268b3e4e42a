"""Queue IDs: fixed length, upper-case base32, unique, sorted by time."""

from __future__ import annotations

import re

from postroom.ids import QUEUE_ID_LENGTH, new_queue_id


def test_shape() -> None:
    qid = new_queue_id()
    assert len(qid) == QUEUE_ID_LENGTH == 12
    assert re.fullmatch(r"[0-9A-HJKMNP-TV-Z]{12}", qid)


def test_unique() -> None:
    ids = [new_queue_id() for _ in range(20000)]
    assert len(set(ids)) == len(ids)


def test_sorted_by_time() -> None:
    earlier = new_queue_id(now=1_700_000_000)
    later = new_queue_id(now=1_700_000_001)
    assert earlier < later
