"""The queue reuses the files of finished messages (postroom.queue.spares)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from postroom.queue.envelope import Envelope, Recipient
from postroom.queue.spares import BLANK_LIMIT, Spares
from postroom.queue.store import QueueStore


def queued_message(store: QueueStore, queue_id: str) -> bytes:
    """The message in a queue file, past its envelope line."""
    with store.open_content(queue_id) as content, content.reader() as f:
        return f.read()


def envelope(queue_id: str) -> Envelope:
    return Envelope(queue_id, "smith@isp.example", [Recipient("boss@corp.example")], 1.0)


def inodes(folder: Path) -> set[int]:
    return {p.stat().st_ino for p in folder.iterdir()}


def test_a_finished_message_leaves_blank_spares_that_the_next_one_reuses(
    tmp_path: Path,
) -> None:
    store = QueueStore(tmp_path)
    big = b"x" * 100_000 + b"\r\n"
    assert store.add_many([(envelope("FIRST"), [big])]) == [None]
    used = store_inodes(store, "FIRST")
    assert store.remove_many(["FIRST"], reuse=True) == [None]
    spare = tmp_path / "spare"
    assert inodes(spare) == used
    assert all(not p.read_bytes().strip(b"\0") for p in spare.iterdir())  # nothing old kept

    assert store.add_many([(envelope("SECOND"), [b"short\r\n"])]) == [None]
    now = store_inodes(store, "SECOND")
    assert now == used and list(spare.iterdir()) == []
    assert queued_message(store, "SECOND") == b"short\r\n"  # no tail of FIRST
    assert store.load("SECOND").size == 7
    assert store.recover() == 0


def test_a_reused_file_holds_the_new_content_only(tmp_path: Path) -> None:
    """Spares keep their old length, in zeros: whoever writes one cuts it to size,
    so a shorter queue file (a shorter envelope line, a shorter message) ends
    where it ends."""
    store = QueueStore(tmp_path)
    long_envelope = envelope("LONG")
    long_envelope.recipients = [Recipient(f"user{n}@corp.example") for n in range(50)]
    store.add_many([(long_envelope, [b"y" * 50_000 + b"\r\n"])])
    store.remove_many(["LONG"], reuse=True)
    store.add_many([(envelope("SHORT"), [b"short\r\n"])])
    assert queued_message(store, "SHORT") == b"short\r\n"
    assert store.load("SHORT").recipients == [Recipient("boss@corp.example")]
    store.remove_many(["SHORT"], reuse=True)
    store.add(envelope("SINGLE"), [b"single\r\n"])  # the one-message path trims too
    assert queued_message(store, "SINGLE") == b"single\r\n"


def test_big_spares_are_truncated_not_blanked(tmp_path: Path) -> None:
    store = QueueStore(tmp_path)
    store.add_many([(envelope("BIG"), [b"z" * (BLANK_LIMIT + 10)]),
                    (envelope("SMALL"), [b"z" * 1000])])
    store.remove_many(["BIG", "SMALL"], reuse=True)
    sizes = sorted(p.stat().st_size for p in (tmp_path / "spare").iterdir())
    assert sizes[0] == 0  # over the limit, so truncated
    assert 1000 < sizes[1] < BLANK_LIMIT  # blanked in place
    assert all(not p.read_bytes().strip(b"\0") for p in (tmp_path / "spare").iterdir())


def test_single_add_takes_a_spare_too(tmp_path: Path) -> None:
    store = QueueStore(tmp_path)
    store.add(envelope("ONE"), [b"one\r\n"])
    store.remove_many(["ONE"], reuse=True)
    before = inodes(tmp_path / "spare")
    store.add(envelope("TWO"), [b"two\r\n"])
    assert store.message_path("TWO").stat().st_ino in before
    assert queued_message(store, "TWO") == b"two\r\n"


def test_another_process_sees_the_spares_of_this_one(tmp_path: Path) -> None:
    """Each process keeps its own list; a second store (another process) lists the folder."""
    first, second = QueueStore(tmp_path), QueueStore(tmp_path)
    first.add_many([(envelope("A"), [b"a\r\n"])])
    first.remove_many(["A"], reuse=True)
    spares = inodes(tmp_path / "spare")
    assert len(spares) == 1
    second.add_many([(envelope("B"), [b"b\r\n"])])
    assert store_inodes(second, "B") == spares
    # The first store's own list now names files the second one took: it makes new ones.
    first.add_many([(envelope("C"), [b"c\r\n"])])
    assert queued_message(first, "C") == b"c\r\n"
    assert not store_inodes(first, "C") & spares


def store_inodes(store: QueueStore, queue_id: str) -> set[int]:
    return {store.message_path(queue_id).stat().st_ino}


def test_remove_without_reuse_unlinks_and_an_open_reader_keeps_the_whole_message(
    tmp_path: Path,
) -> None:
    """`postroom queue delete` may remove a message while the scheduler delivers
    it: the delivery must go on reading the message it started, not an emptied
    file, nor another message written into the same inode."""
    store = QueueStore(tmp_path)
    data = b"Subject: in flight\r\n\r\n" + b"x" * 200_000 + b"\r\n"
    store.add_many([(envelope("INFLIGHT"), [data])])
    with store.open_content("INFLIGHT") as content, content.reader() as reading:
        head = reading.read(1000)
        store.remove("INFLIGHT")
        store.add_many([(envelope("NEXT"), [b"another message\r\n"])])
        assert head + reading.read() == data
    assert list((tmp_path / "spare").iterdir()) == []


def test_a_spare_still_named_elsewhere_is_never_written(tmp_path: Path) -> None:
    """After a crash on a filesystem without a journal, fsck may leave an inode
    both in spare/ and in the queue; taking it must not overwrite the queued message."""
    store = QueueStore(tmp_path)
    store.add(envelope("KEEP"), [b"keep me\r\n"])
    os.link(store.message_path("KEEP"), tmp_path / "spare" / "1.ab.0")
    store = QueueStore(tmp_path)  # the server after the crash
    store.add_many([(envelope("NEW"), [b"new\r\n"])])
    assert queued_message(store, "KEEP") == b"keep me\r\n"
    assert queued_message(store, "NEW") == b"new\r\n"
    assert not (tmp_path / "spare" / "1.ab.0").exists()  # the extra name is dropped
    assert store.message_path("KEEP").stat().st_nlink == 1


def test_the_pool_is_bounded(tmp_path: Path) -> None:
    (tmp_path / "spare").mkdir()
    spares = Spares(tmp_path / "spare", limit=3)
    for n in range(5):
        path = tmp_path / f"f{n}"
        path.write_bytes(b"data")
        spares.retire(path)
        assert not path.exists()
    assert len(list((tmp_path / "spare").iterdir())) == 3


def test_a_pool_emptied_by_another_process_is_counted_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scheduler's process retires, every server process takes: its own count
    says "full" long before the folder is. It must look again, not unlink."""
    (tmp_path / "spare").mkdir()
    retiring = Spares(tmp_path / "spare", limit=4)
    taking = Spares(tmp_path / "spare", limit=4)  # another process
    for n in range(4):
        path = tmp_path / f"f{n}"
        path.write_bytes(b"data")
        retiring.retire(path)
    for _ in range(3):
        assert taking.take(tmp_path, ".tmp") is not None
    assert len(list((tmp_path / "spare").iterdir())) == 1
    path = tmp_path / "f4"
    path.write_bytes(b"data")
    inode = path.stat().st_ino
    retiring.retire(path)  # the count (4) is fresh: trusted, so this one is unlinked
    assert inode not in inodes(tmp_path / "spare")
    monkeypatch.setattr("postroom.queue.spares.RELIST_AFTER", 0.0)
    for n in range(5, 8):
        path = tmp_path / f"f{n}"
        path.write_bytes(b"data")
        inode = path.stat().st_ino
        retiring.retire(path)
        assert inode in inodes(tmp_path / "spare")
    assert len(list((tmp_path / "spare").iterdir())) == 4


def test_retire_without_a_spare_folder_unlinks(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"data")
    Spares(tmp_path / "missing").retire(path)
    assert not path.exists()


def test_retiring_a_missing_file_is_file_not_found(tmp_path: Path) -> None:
    (tmp_path / "spare").mkdir()
    try:
        Spares(tmp_path / "spare").retire(tmp_path / "absent")
    except FileNotFoundError:
        pass
    else:
        raise AssertionError("retire of a missing file must raise FileNotFoundError")


def test_a_spare_is_locked_before_it_gets_its_temporary_name(tmp_path: Path) -> None:
    """`recover` in another process leaves a flocked temporary file alone: a taken
    spare must never show under its temporary name without the flock."""
    import fcntl

    spares = Spares(tmp_path / "spare")
    spares.folder.mkdir()
    (spares.folder / "old").write_bytes(b"\0" * 10)
    os.utime(spares.folder / "old", (1.0, 1.0))  # blanked long ago
    taken = spares.take(tmp_path, ".tmp")
    assert taken is not None
    try:
        with open(taken.path, "rb") as other, pytest.raises(BlockingIOError):
            fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(taken.fd)


def test_a_spare_someone_holds_is_neither_taken_nor_blanked(tmp_path: Path) -> None:
    """A spare being blanked (or taken by another process) is locked: another taker
    skips it, and a blanking never overwrites what a taker wrote."""
    import fcntl

    spares = Spares(tmp_path / "spare")
    spares.folder.mkdir()
    held = spares.folder / "held"
    held.write_bytes(b"new message")
    with open(held, "rb") as holder:
        fcntl.flock(holder.fileno(), fcntl.LOCK_EX)
        assert spares.take(tmp_path, ".tmp") is None
        assert held.exists()
        queued = tmp_path / "queued"
        queued.write_bytes(b"finished message")
        spares.retire(queued)
    [retired] = [p for p in spares.folder.iterdir() if p.name != "held"]
    assert retired.read_bytes() == bytes(len(b"finished message"))
    with open(retired, "rb") as taker:
        fcntl.flock(taker.fileno(), fcntl.LOCK_EX)  # a writer that took it meanwhile
        retired.write_bytes(b"its message")
        from postroom.queue.spares import _blank
        _blank(retired)
        assert retired.read_bytes() == b"its message"
