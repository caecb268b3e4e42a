"""kill -9 of the sending host with mail in its queue: after a restart every message arrives.

The provider's 250 to a submission promises the message is on disk (RFC 5321
6.1); a queue that loses it in a power cut broke that promise. Two cuts:

- while the next hop is down: every message waits in the queue; after the
  restart (next hop up) each arrives exactly once, as none was ever handed on;
- while the queue is emptying into the next hop: a message the next hop took
  but whose success the provider had not yet written down is sent again after
  the restart. RFC 5321 6.1 accepts such duplicates and nothing else: a
  duplicate is allowed only for a message still queued (not marked delivered)
  after the kill, and no message may be missing.

The receiving host is a second postroom reached through a static route.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Callable

from mailcheck import make_message, new_token
from mailharness import (
    LOOPBACK,
    Postroom,
    maildir_files,
    send_and_get_queue_id,
    submission_client,
)

SMITH = "smith@isp.example"
SMITH_PASSWORD = "smith-secret"
BOSS = "boss@corp.example"
TOKEN_RE = re.compile(rb"Subject: crash ([0-9a-f]{32})")


PER_DESTINATION = 5  # concurrent deliveries to corp.example: the most that can be in flight


def hosts(make_postroom: Callable[..., Postroom]) -> tuple[Postroom, Postroom]:
    """(provider, receiving host), the provider running and the receiving host not yet."""
    corp = make_postroom(
        start=False, hostname="mx.corp.example", domains=["corp.example"],
        users={BOSS: "boss-secret"}, aliases={}, listeners=("smtp",),
    )
    isp = make_postroom(
        hostname="mail.isp.example", domains=["isp.example"],
        users={SMITH: SMITH_PASSWORD}, aliases={}, listeners=("smtp", "submission"),
        extra_toml=(
            f'[routes]\n"corp.example" = "{LOOPBACK}:{corp.smtp_port}"\n\n'
            '[queue]\nretry_after = ["1s"]\ngive_up_after = "1h"\n'
            f"max_per_destination = {PER_DESTINATION}\n"
        ),
    )
    return isp, corp


def submit_many(isp: Postroom, count: int, body_kib: int = 4) -> dict[str, str]:
    """Submit `count` messages over one session; return {token: queue ID}."""
    queued: dict[str, str] = {}
    filler = (b"x" * 78 + b"\r\n") * (body_kib * 1024 // 80)
    with submission_client(isp.ports["submission"], SMITH, SMITH_PASSWORD) as client:
        for _ in range(count):
            token = new_token()
            message = make_message(token, sender=SMITH, recipient=BOSS, subject="crash",
                                   body=f"token {token}\r\n".encode() + filler)
            queued[token] = send_and_get_queue_id(client, SMITH, [BOSS], message)
    return queued


def arrivals(corp: Postroom) -> Counter[str]:
    """How many copies of each token boss's Maildir holds."""
    copies: Counter[str] = Counter()
    for path in maildir_files(corp.maildir(BOSS)):
        match = TOKEN_RE.search(path.read_bytes())
        assert match, f"{path.name} is not one of this test's messages"
        copies[match.group(1).decode()] += 1
    return copies


def wait_for_all(corp: Postroom, tokens: set[str], timeout: float = 30.0) -> Counter[str]:
    deadline = time.monotonic() + timeout
    while True:
        copies = arrivals(corp)
        if set(copies) >= tokens or time.monotonic() > deadline:
            return copies
        time.sleep(0.1)


def still_queued(isp: Postroom) -> dict[str, str]:
    """{queue ID: its `postroom queue list` line} for the messages the provider holds.

    A line says "1/1 pending" while boss is not yet marked delivered, "0/1"
    once he is (the envelope is then about to be removed); a deferred message
    shows its last error in parentheses.
    """
    listing = isp.cli("queue", "list").stdout
    return {line.split()[0]: line for line in listing.splitlines() if " pending" in line}


def assert_queue_empties(isp: Postroom, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        listing = isp.cli("queue", "list").stdout
        if "the queue is empty" in listing:
            return
        assert time.monotonic() < deadline, f"still queued:\n{listing}"
        time.sleep(0.2)


def test_kill_9_while_the_next_hop_is_down(postroom_factory: Callable[..., Postroom]) -> None:
    isp, corp = hosts(postroom_factory)
    queued = submit_many(isp, 20)
    # Let every message meet the closed port at least once.
    deadline = time.monotonic() + 20
    while True:
        held = still_queued(isp)
        # "(error)" at the end of a line: it was tried and deferred.
        if len(held) == 20 and all("1/1 pending" in x and x.endswith(")") for x in held.values()):
            break
        assert time.monotonic() < deadline, held
        time.sleep(0.3)
    isp.kill()
    assert set(still_queued(isp)) == set(queued.values())

    corp.start()
    isp.start()
    copies = wait_for_all(corp, set(queued))
    missing = set(queued) - set(copies)
    assert not missing, f"{len(missing)} of 20 lost\n{isp.output()}"
    # Nothing had reached the next hop before the kill: no copy may be doubled.
    assert max(copies.values()) == 1, copies
    assert_queue_empties(isp)


def test_kill_9_while_the_queue_empties(postroom_factory: Callable[..., Postroom]) -> None:
    isp, corp = hosts(postroom_factory)
    total = 40
    # Larger messages keep deliveries in flight a little longer.
    queued = submit_many(isp, total, body_kib=64)
    by_id = {queue_id: token for token, queue_id in queued.items()}
    corp.start()
    # Cut the power as soon as the first messages come out at the far end.
    deadline = time.monotonic() + 20
    while not maildir_files(corp.maildir(BOSS)):
        assert time.monotonic() < deadline, isp.output()
        time.sleep(0.005)
    isp.kill()
    # The receiving host still files what it had fully received: stopped with
    # SIGTERM, it lets the transactions in progress finish before it exits.
    assert corp.stop() == 0
    at_kill = arrivals(corp)
    queued_at_kill = still_queued(isp)
    corp.start()
    # A message may only be delivered twice if the provider did not yet know
    # it was delivered: it is still queued with its recipient not "delivered".
    may_repeat = {by_id[q] for q, line in queued_at_kill.items() if "1/1 pending" in line}

    isp.start()
    copies = wait_for_all(corp, set(queued))
    missing = set(queued) - set(copies)
    assert not missing, f"{len(missing)} of {total} lost\n{isp.output()}"
    doubled = {token for token, n in copies.items() if n > 1}
    assert max(copies.values()) <= 2, copies
    # Results are written before a delivery slot is freed, so no more than the
    # deliveries running at the kill can be unrecorded.
    assert len(doubled) <= PER_DESTINATION, copies
    in_flight = may_repeat & set(at_kill)
    assert doubled <= may_repeat, (
        f"delivered twice although the queue had recorded them: {doubled - may_repeat}"
    )
    # Only what had arrived without being recorded may come twice.
    assert doubled <= in_flight, (doubled, in_flight)
    assert set(queued) - set(at_kill) <= may_repeat, "a message left the queue undelivered"
    # What had arrived before the kill and was still queued is what can come twice:
    # at most the deliveries running at the kill.
    assert len(in_flight) <= PER_DESTINATION, (in_flight, queued_at_kill)
    assert len(copies) == total
    assert_queue_empties(isp)
