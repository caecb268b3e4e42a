"""Envelope.to_json writes exactly what json.dumps(dataclasses.asdict(...)) would."""

from __future__ import annotations

import dataclasses
import json

from hypothesis import given, settings
from hypothesis import strategies as st

from postroom.queue.envelope import Envelope, Recipient

TEXT = st.text(max_size=12)
OPTIONAL = st.none() | TEXT

RECIPIENTS = st.builds(
    Recipient,
    address=TEXT,
    notify=st.none() | st.tuples(st.sampled_from(["SUCCESS", "FAILURE", "DELAY", "NEVER"])),
    orcpt=OPTIONAL,
    state=st.sampled_from(["pending", "deferred", "delivered", "bounced"]),
    attempts=st.integers(0, 9),
    last_error=OPTIONAL,
    dsn_status=OPTIONAL,
    remote_mta=OPTIONAL,
    done_at=st.none() | st.floats(0, 2e9),
)
ENVELOPES = st.builds(
    Envelope,
    queue_id=TEXT,
    sender=TEXT,
    recipients=st.lists(RECIPIENTS, max_size=3),
    created=st.floats(0, 2e9),
    size=st.integers(0, 10**9),
    next_attempt=st.floats(0, 2e9),
    held=st.booleans(),
    ret=OPTIONAL,
    envid=OPTIONAL,
    smtputf8=st.booleans(),
    body=OPTIONAL,
    auth_user=OPTIONAL,
    client=OPTIONAL,
    warned=st.booleans(),
    extra=st.dictionaries(TEXT, st.dictionaries(TEXT, TEXT, max_size=2), max_size=2),
)


@settings(max_examples=200, deadline=None)
@given(ENVELOPES)
def test_to_json_is_asdicts_json(envelope: Envelope) -> None:
    expected = json.dumps(dataclasses.asdict(envelope), ensure_ascii=False, sort_keys=True)
    assert envelope.to_json() == expected.encode("utf-8")
    assert Envelope.from_json(envelope.to_json()) == envelope
