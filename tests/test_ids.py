"""Queue IDs: fixed length, upper-case base32, unique, sorted by time."""

from __future__ import annotations

import re

import pytest

from postroom.ids import QUEUE_ID_LENGTH, new_queue_id, queue_id_time


def test_shape() -> None:
    qid = new_queue_id()
    assert len(qid) == QUEUE_ID_LENGTH == 12
    assert re.fullmatch(r"[0-9A-HJKMNP-TV-Z]{12}", qid)


def test_unique() -> None:
    ids = [new_queue_id() for _ in range(20000)]
    assert len(set(ids)) == len(ids)


def test_sorted_by_time_and_time_recoverable() -> None:
    earlier = new_queue_id(now=1_700_000_000)
    later = new_queue_id(now=1_700_000_001)
    assert earlier < later
    assert queue_id_time(earlier) == 1_700_000_000
    assert queue_id_time(later) == 1_700_000_001


@pytest.mark.parametrize("bad", ["", "SHORT", "IIIIIIIIIIII", "0123456789ABC"])
def test_queue_id_time_rejects_other_strings(bad: str) -> None:
    with pytest.raises(ValueError):
        queue_id_time(bad)
