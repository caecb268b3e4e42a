"""QueueStore.add_many: several messages queued with one round of syncs, each on its own."""

import shutil
from pathlib import Path

import pytest

from postroom.queue.envelope import Envelope, Recipient
from postroom.queue.store import QueueStore


def queued_message(store: QueueStore, queue_id: str) -> bytes:
    """The message in a queue file, past its envelope line."""
    with store.open_content(queue_id) as content, content.reader() as f:
        return f.read()


def envelope(queue_id: str) -> Envelope:
    return Envelope(queue_id, "smith@isp.example", [Recipient("boss@corp.example")], 1.0)


def test_add_many_queues_each_message_with_its_envelope(tmp_path: Path) -> None:
    store = QueueStore(tmp_path / "queue")
    items = [(envelope(f"ID{n}"), [b"Subject: %d\r\n" % n, b"\r\nbody\r\n"]) for n in range(5)]
    assert store.add_many(items) == [None] * 5
    for n in range(5):
        loaded = store.load(f"ID{n}")
        assert loaded.size == len(b"Subject: %d\r\n\r\nbody\r\n" % n)
        assert queued_message(store, f"ID{n}").startswith(b"Subject: %d" % n)
    assert not [p for p in (tmp_path / "queue").rglob("*.tmp")]


def test_a_bad_item_fails_alone(tmp_path: Path) -> None:
    store = QueueStore(tmp_path / "queue")
    store.add(envelope("TAKEN"), [b"first\r\n"])

    errors = store.add_many([
        (envelope("GOOD1"), [b"a\r\n"]),
        (envelope("TAKEN"), [b"again\r\n"]),
        (envelope("../evil"), [b"x\r\n"]),
        (envelope("BROKEN"), _Failing()),
        (envelope("GOOD2"), [b"b\r\n"]),
    ])
    assert errors[0] is None and errors[4] is None
    assert isinstance(errors[1], FileExistsError)
    assert errors[2] is not None and errors[3] is not None
    assert queued_message(store, "TAKEN") == b"first\r\n"
    assert sorted(store.ids()) == ["GOOD1", "GOOD2", "TAKEN"]
    assert store.recover() == 0  # nothing half-written was left behind
    assert not [p for p in (tmp_path / "queue").rglob("*.tmp")]


class _Failing:
    def __iter__(self) -> "_Failing":
        return self

    def __next__(self) -> bytes:
        raise OSError("spool unreadable")


def test_a_colliding_add_never_overwrites_even_between_check_and_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """add_many places messages without the queue lock, so a look first ("is the
    name free?") proves nothing by the time of a rename: another process with
    the same ID may place its file in between. Placement itself must refuse."""
    store = QueueStore(tmp_path / "queue")
    store.message_path("SAME").write_bytes(b"the other process's message\r\n")
    monkeypatch.setattr(Path, "exists", lambda self: False)  # every look says "free"
    errors = store.add_many([(envelope("SAME"), [b"mine\r\n"])])
    monkeypatch.undo()
    assert isinstance(errors[0], FileExistsError)
    assert store.message_path("SAME").read_bytes() == b"the other process's message\r\n"
    assert not [p for p in (tmp_path / "queue").rglob("*.tmp")]


@pytest.mark.parametrize("with_spares", [False, True])
def test_a_queue_folder_removed_while_running_is_made_again(
    tmp_path: Path, with_spares: bool
) -> None:
    # The folders are made once per store, not checked on every add: an add that
    # finds one gone makes it again rather than failing (or, with spares waiting,
    # trying one spare name after another).
    store = QueueStore(tmp_path / "queue")
    assert store.add_many([(envelope("FIRST"), [b"one\r\n"])]) == [None]
    if with_spares:
        assert store.remove_many(["FIRST"], reuse=True) == [None]
        assert len(list(store.spares.folder.iterdir())) == 1
    else:
        store.remove("FIRST")
    shutil.rmtree(store.messages)
    shutil.rmtree(store.envelopes)

    assert store.add_many([(envelope("AGAIN"), [b"two\r\n"])]) == [None]
    assert queued_message(store, "AGAIN") == b"two\r\n"
    assert store.load("AGAIN").size == len(b"two\r\n")
    store.remove("AGAIN")
    shutil.rmtree(store.messages)
    shutil.rmtree(store.envelopes)
    store.add(envelope("SINGLE"), [b"three\r\n"])  # the one-message path makes it too
    assert queued_message(store, "SINGLE") == b"three\r\n"
    assert store.load("SINGLE").size == len(b"three\r\n")
    store.update("SINGLE", lambda e: setattr(e, "held", True))  # and an envelope change
    assert store.load("SINGLE").held
