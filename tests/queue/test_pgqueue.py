"""The relay queue in PostgreSQL: nodes take messages by lease, never the same one twice."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import psycopg
import pytest

from postroom.queue import pgqueue
from postroom.queue.envelope import Envelope, Recipient
from postroom.queue.pgqueue import PGQueueStore
from postroom.queue.store import NotQueued
from postroom.store.pgstore import prepare

MESSAGE = b"Subject: queued\r\n\r\n" + b"line of the body\r\n" * 40_000  # 720 KB: 3 chunks


def envelope(queue_id: str) -> Envelope:
    return Envelope(queue_id, "a@corp.example", [Recipient("x@remote.example"),
                                                 Recipient("y@remote.example")], time.time())


@pytest.fixture
def url(pg_url: str) -> str:
    prepare(pg_url)
    return pg_url


def node(url: str, name: str | None, tmp_path: Path) -> PGQueueStore:
    return PGQueueStore(url, name, tmp_path / f"spool-{name}")


def expire(url: str, owner: str) -> None:
    """As if `owner` had died a lease ago: its leases have run out."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("UPDATE queue SET lease = now() - interval '1 second' WHERE owner = %s",
                     (owner,))


def test_a_message_is_its_node_s_and_comes_back_whole(url: str, tmp_path: Path) -> None:
    a, b = node(url, "a", tmp_path), node(url, "b", tmp_path)
    a.add(envelope("Q1"), [MESSAGE[:1000], MESSAGE[1000:]])
    assert [e.queue_id for e in a.list()] == ["Q1"]
    assert b.list() == []  # a live node's message is not taken
    with pytest.raises(NotQueued):
        b.load("Q1")
    with pytest.raises(NotQueued):
        b.update("Q1", lambda e: None)
    assert b.remove_many(["Q1"])[0] is not None
    with a.open_content("Q1") as content, content.reader() as reader:
        assert content.size == len(MESSAGE) and reader.read() == MESSAGE
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM queue_chunks").fetchone()
    assert row is not None and row[0] > 1  # stored in pieces

    def defer(e: Envelope) -> None:
        e.recipients[0].state = "delivered"
        e.next_attempt = 99.0

    a.update("Q1", defer)
    again = a.load("Q1")
    assert again.recipients[0].state == "delivered" and again.recipients[1].state == "pending"
    assert again.next_attempt == 99.0
    assert a.remove_many(["Q1", "nothing"])[0] is None
    assert isinstance(a.remove_many(["nothing"])[0], NotQueued)
    assert a.list() == []
    for store in (a, b):
        store.close()


def test_a_dead_node_s_messages_are_taken_and_it_may_not_write_them(
    url: str, tmp_path: Path
) -> None:
    a, b = node(url, "a", tmp_path), node(url, "b", tmp_path)
    a.add_many([(envelope(f"D{n}"), [MESSAGE[:100]]) for n in range(3)])
    expire(url, "a")
    assert sorted(e.queue_id for e in b.list()) == ["D0", "D1", "D2"]
    assert a.list() == []
    with pytest.raises(NotQueued):  # the old owner's late write is refused
        a.update("D0", lambda e: None)
    assert isinstance(a.remove_many(["D1"])[0], NotQueued)
    assert b.load("D1").queue_id == "D1"
    for store in (a, b):
        store.close()


def test_the_command_line_sees_all_and_adds_for_anyone(url: str, tmp_path: Path) -> None:
    a, cli = node(url, "a", tmp_path), node(url, None, tmp_path)
    a.add(envelope("A1"), [b"x\r\n"])
    cli.add(envelope("C1"), [b"y\r\n"])
    assert sorted(e.queue_id for e in cli.list()) == ["A1", "C1"]
    cli.update("A1", lambda e: setattr(e, "held", True))  # postroom queue hold
    assert sorted(e.queue_id for e in a.list()) == ["A1", "C1"]  # C1 was free: taken
    assert a.load("A1").held
    for store in (a, cli):
        store.close()


def test_nodes_taking_at_once_never_take_the_same_message(url: str, tmp_path: Path) -> None:
    cli = node(url, None, tmp_path)
    cli.add_many([(envelope(f"M{n}"), [b"x\r\n"]) for n in range(200)])
    nodes = [node(url, f"n{i}", tmp_path) for i in range(4)]
    taken: dict[str, list[str]] = {}

    def take(store: PGQueueStore) -> None:
        taken[str(store.owner)] = [e.queue_id for e in store.list()]

    threads = [threading.Thread(target=take, args=(store,)) for store in nodes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    everything = [queue_id for ids in taken.values() for queue_id in ids]
    assert sorted(everything) == sorted(f"M{n}" for n in range(200))  # each once
    for store in [cli, *nodes]:
        store.close()


def test_the_renewing_thread_keeps_leases_and_finds_free_mail(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pgqueue, "RENEW_EVERY", 0.05)
    a, b = node(url, "a", tmp_path), node(url, "b", tmp_path)
    free = threading.Event()
    b.on_free = free.set
    a.list()  # starts a's renewing
    b.list()
    a.add(envelope("R1"), [b"x\r\n"])
    expire(url, "a")
    # a renews its leases before b sees R1 free, or b is told of it: either way
    # R1 ends up with exactly one live owner.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with psycopg.connect(url) as conn:
            row = conn.execute("SELECT lease > now() FROM queue WHERE id = 'R1'").fetchone()
        if row and row[0]:
            break
        time.sleep(0.01)
    assert row and row[0]
    a.close()  # a dies: its lease runs out and b hears of it
    expire(url, "a")
    assert free.wait(10)
    assert [e.queue_id for e in b.list()] == ["R1"]
    b.close()
