"""The queue store: durable add, JSON round trips, crash recovery, corrupt files, locking."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from durable_order import assert_durable, install_recorder
from postroom.queue import store as store_module
from postroom.queue.envelope import Envelope, Recipient
from postroom.queue.queuefile import ENVELOPE_TAG
from postroom.queue.store import (
    FRESH_TEMP_AGE,
    CorruptEnvelope,
    NotQueued,
    QueueError,
    QueueStore,
)


def envelope(queue_id: str = "AAAA00000001", **kw: object) -> Envelope:
    fields: dict[str, object] = {
        "sender": "boss@corp.example",
        "recipients": [Recipient("a@isp.example"), Recipient("b@other.example")],
        "created": 1_700_000_000.0,
    }
    fields.update(kw)
    return Envelope(queue_id=queue_id, **fields)  # type: ignore[arg-type]


def content(store: QueueStore, queue_id: str) -> bytes:
    """The message of a queue file, past its envelope line, as couriers read it."""
    with store.open_content(queue_id) as opened, opened.reader() as f:
        data = f.read()
    assert len(data) == opened.size
    return data


def test_add_writes_one_queue_file_envelope_line_first(tmp_path: Path) -> None:
    store = QueueStore(tmp_path / "queue")
    env = envelope()
    store.add(env, [b"Subject: hi\r\n", b"\r\n", b"body\r\n"])
    raw = store.message_path(env.queue_id).read_bytes()
    line, _, rest = raw.partition(b"\n")
    assert line.startswith(ENVELOPE_TAG)
    assert rest == content(store, env.queue_id) == b"Subject: hi\r\n\r\nbody\r\n"
    loaded = store.load(env.queue_id)
    assert loaded == env
    assert loaded.size == len(b"Subject: hi\r\n\r\nbody\r\n")
    # no temporary files are left behind, and no envelope file until the envelope changes
    assert sorted(p.name for p in (tmp_path / "queue" / "messages").iterdir()) == [env.queue_id]
    assert list((tmp_path / "queue" / "envelopes").iterdir()) == []


def test_content_readers_are_independent_and_outlive_the_content(tmp_path: Path) -> None:
    """Couriers read one opened message side by side (the local and the remote
    courier, a transaction per hop), each from its own start; a reader a
    courier's thread still holds reads on after the attempt closed the content."""
    store = QueueStore(tmp_path)
    data = b"Subject: hi\r\n\r\n" + b"".join(b"line %05d\r\n" % i for i in range(20_000))
    store.add(envelope(), [data])
    with store.open_content("AAAA00000001") as opened:
        first, second = opened.reader(), opened.reader()
    assert opened.size == len(data)
    with first, second:
        assert first.read(10) == data[:10]
        assert second.read() == data
        assert first.read() == data[10:]
        assert first.read() == b""
        first.seek(0)
        assert first.read(4) == b"Subj" and first.tell() == 4
        assert second.seek(-4, 2) == len(data) - 4 and second.read() == data[-4:]
    with pytest.raises(ValueError):
        opened.reader()
    with pytest.raises(ValueError):
        first.read()


def test_a_file_without_an_envelope_line_is_corrupt_and_left_alone(tmp_path: Path) -> None:
    """A queue file always starts with its envelope line: one that does not was
    not written by the queue. It is reported, never delivered nor deleted."""
    store = QueueStore(tmp_path)
    (tmp_path / "messages" / "ODD000000001").write_bytes(b"Subject: x\r\n\r\nhi\r\n")
    with pytest.raises(CorruptEnvelope, match="no envelope line"):
        store.load("ODD000000001")
    with pytest.raises(CorruptEnvelope, match="no envelope line"):
        store.open_content("ODD000000001")
    assert store.list() == []
    assert store.recover() == 0
    assert store.ids() == ["ODD000000001"]


def test_a_long_envelope_line_is_read_whole(tmp_path: Path) -> None:
    store = QueueStore(tmp_path)
    many = [Recipient(f"user{i:04d}@isp.example", notify=("SUCCESS", "FAILURE"),
                      orcpt=f"rfc822;user{i:04d}@isp.example") for i in range(2000)]
    env = envelope(recipients=many)
    store.add(env, [b"x\r\n"])
    assert store.message_path(env.queue_id).stat().st_size > 100_000
    assert store.load(env.queue_id) == env
    assert content(store, env.queue_id) == b"x\r\n"


def test_add_is_durable_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The queue file synced, then linked into place, then its folder synced: and
    nothing else written (the envelope is in the file)."""
    store = QueueStore(tmp_path)
    recorder = install_recorder(monkeypatch)
    store.add(envelope(), [b"x\r\n"])
    final = store.message_path("AAAA00000001")
    assert_durable(recorder.log, recorder.note("queued"), published=[final])
    steps = [(c.name, c.dst.parent.name if c.dst else c.path.name if c.path else "")
             for c in recorder.log if c.name not in ("write", "note")]
    assert steps == [("datasync", steps[0][1]), ("link", "messages"), ("sync_dir", "messages")]


def test_failed_add_leaves_nothing(tmp_path: Path) -> None:
    store = QueueStore(tmp_path)

    def chunks() -> object:
        yield b"first part\r\n"
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        store.add(envelope(), chunks())  # type: ignore[arg-type]
    assert list((tmp_path / "messages").iterdir()) == []
    assert list((tmp_path / "envelopes").iterdir()) == []


@pytest.mark.parametrize("step", ["datasync", "sync_dir"])
def test_a_failed_sync_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    """Neither a failed data sync nor a failed folder sync (the file has its name
    by then) leaves a message queued for a caller that was told it is not."""
    store = QueueStore(tmp_path)
    recorder = install_recorder(monkeypatch)
    recorder.fail(step, lambda call: OSError(5, "Input/output error"))
    with pytest.raises(OSError):
        store.add(envelope(), [b"x\r\n"])
    errors = store.add_many([(envelope("AAAA00000002"), [b"x\r\n"]),
                             (envelope("AAAA00000003"), [b"y\r\n"])])
    assert all(isinstance(e, OSError) for e in errors)
    assert list((tmp_path / "messages").iterdir()) == []
    assert store.ids() == []


def test_queue_id_collision_is_an_error_not_an_overwrite(tmp_path: Path) -> None:
    store = QueueStore(tmp_path)
    store.add(envelope(), [b"first\r\n"])
    with pytest.raises(FileExistsError):
        store.add(envelope(), [b"second\r\n"])
    assert content(store, "AAAA00000001") == b"first\r\n"
    assert store.add_many([(envelope(), [b"third\r\n"])])[0] is not None
    assert content(store, "AAAA00000001") == b"first\r\n"
    assert [p.name for p in (tmp_path / "messages").iterdir()] == ["AAAA00000001"]


@pytest.mark.parametrize("bad", ["../etc", ".hidden.tmp", "", "a/b", "x" * 65, "ÄÖ"])
def test_unsafe_ids_are_refused(tmp_path: Path, bad: str) -> None:
    store = QueueStore(tmp_path)
    with pytest.raises(QueueError):
        store.load(bad)
    with pytest.raises(QueueError):
        store.add(envelope(queue_id=bad), [b"x"])


def test_envelope_json_round_trip_keeps_every_field(tmp_path: Path) -> None:
    store = QueueStore(tmp_path)
    env = envelope(
        recipients=[
            Recipient("a@isp.example", notify=("SUCCESS", "FAILURE"), orcpt="rfc822;A@isp.example",
                      state="deferred", attempts=3, last_error="451 4.3.0 later",
                      dsn_status="4.3.0", remote_mta="mx.isp.example[192.0.2.1]:25"),
            Recipient("ü@bücher.example", state="delivered", done_at=1_700_000_100.5),
        ],
        next_attempt=1_700_000_500.25, held=True, ret="HDRS", envid="QQ314159",
        smtputf8=True, body="8BITMIME", auth_user="boss@corp.example", client="[192.0.2.9]",
        warned=True, extra={"dsn_owed": {"a@isp.example": "failed"}},
    )
    store.add(env, [b"x\r\n"])
    loaded = store.load(env.queue_id)
    assert loaded == env
    assert loaded.recipients[0].notify == ("SUCCESS", "FAILURE")  # a tuple again, not a list
    assert Envelope.from_json(env.to_json()) == env


def test_update(tmp_path: Path) -> None:
    store = QueueStore(tmp_path)
    env = envelope()
    store.add(env, [b"x\r\n"])
    store.update(env.queue_id, lambda e: setattr(e.recipients[0], "state", "delivered"))
    assert store.load(env.queue_id).recipients[0].state == "delivered"
    changed = store.update(env.queue_id, lambda e: setattr(e, "held", True))
    assert changed.held and store.load(env.queue_id).held
    assert store.load(env.queue_id).recipients[0].state == "delivered"


def test_update_never_resurrects_a_removed_message(tmp_path: Path) -> None:
    store = QueueStore(tmp_path)
    env = envelope()
    store.add(env, [b"x\r\n"])
    store.update(env.queue_id, lambda e: None)  # an envelope file, which remove deletes
    store.remove(env.queue_id)
    with pytest.raises(NotQueued):
        store.update(env.queue_id, lambda e: None)
    assert list((tmp_path / "envelopes").iterdir()) == []


def test_remove_queue_file_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The queue file is the commit record; an envelope file left by a crash after
    it is gone is cleaned up by recover."""
    store = QueueStore(tmp_path)
    env = envelope()
    store.add(env, [b"x\r\n"])
    store.update(env.queue_id, lambda e: setattr(e, "held", True))  # an envelope file
    order: list[str] = []
    real_unlink = os.unlink

    def unlink(path: str | os.PathLike[str]) -> None:  # Path.unlink calls it too
        order.append(Path(path).parent.name)
        real_unlink(path)

    monkeypatch.setattr(store_module.os, "unlink", unlink)
    store.remove(env.queue_id)
    assert order == ["messages", "envelopes"]
    monkeypatch.undo()
    with pytest.raises(NotQueued, match="no message AAAA00000001 in the queue"):
        store.remove(env.queue_id)
    with pytest.raises(NotQueued):
        store.load(env.queue_id)


def test_remove_many_syncs_the_queue_folder_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:

    store = QueueStore(tmp_path)
    ids = [f"AAAA0000000{n}" for n in range(1, 4)]
    for queue_id in ids:
        store.add(envelope(queue_id), [b"x\r\n"])
    store.update(ids[1], lambda e: None)
    store.message_path(ids[1]).unlink()  # an envelope left alone: removed, not an error
    recorder = install_recorder(monkeypatch)
    errors = store.remove_many([*ids, "AAAA00000009"])
    synced = [c.path.name for c in recorder.log if c.name == "sync_dir" and c.path]
    assert errors[:3] == [None, None, None]
    assert isinstance(errors[3], NotQueued)
    assert synced == ["messages"]
    assert store.ids() == [] and list((tmp_path / "messages").iterdir()) == []
    assert list((tmp_path / "envelopes").iterdir()) == []


def age(path: Path, seconds: float = FRESH_TEMP_AGE + 1) -> None:
    """Make `path` look last written `seconds` ago."""
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_recover_removes_orphans_and_temp_files(tmp_path: Path) -> None:
    store = QueueStore(tmp_path)
    store.add(envelope("KEEP00000001"), [b"keep\r\n"])
    store.update("KEEP00000001", lambda e: None)
    # A crash while a message or an envelope was being written:
    for temp in (tmp_path / "messages" / ".abc123.tmp",
                 tmp_path / "envelopes" / ".KEEP00000001.json.xyz.tmp"):
        temp.write_bytes(b"{half")
        age(temp)
    # An envelope whose queue file is gone (a removal cut short):
    (tmp_path / "envelopes" / "LOST00000001.json").write_bytes(envelope("LOST00000001").to_json())
    assert store.recover() == 3
    assert [p.name for p in (tmp_path / "messages").iterdir()] == ["KEEP00000001"]
    assert [p.name for p in (tmp_path / "envelopes").iterdir()] == ["KEEP00000001.json"]
    assert store.recover() == 0
    assert [e.queue_id for e in store.list()] == ["KEEP00000001"]


def test_recover_spares_a_temporary_file_made_a_moment_ago(tmp_path: Path) -> None:
    """A file just made by mkstemp is not flocked yet (nor is atomic_write's, ever):
    a recover running in another process at that moment leaves it alone."""
    store = QueueStore(tmp_path)
    fresh = [tmp_path / "messages" / ".just1.tmp", tmp_path / "envelopes" / ".A.json.x.tmp"]
    for temp in fresh:
        temp.write_bytes(b"being written")
    assert store.recover() == 0
    assert all(temp.exists() for temp in fresh)
    for temp in fresh:
        age(temp)
    assert store.recover() == 2


def test_recover_spares_a_message_being_written(tmp_path: Path) -> None:
    """A temp file another add_many() is still writing (flock held) survives recover()."""
    store = QueueStore(tmp_path)
    started, release = threading.Event(), threading.Event()

    def slow_chunks() -> object:
        yield b"part one\r\n"
        started.set()
        release.wait(10)
        yield b"part two\r\n"

    worker = threading.Thread(
        target=store.add_many, args=([(envelope("SLOW00000001"), slow_chunks())],)
    )
    worker.start()
    assert started.wait(10)
    [temp] = (tmp_path / "messages").iterdir()
    age(temp)  # only its flock keeps it now
    assert store.recover() == 0
    release.set()
    worker.join(10)
    assert content(store, "SLOW00000001") == b"part one\r\npart two\r\n"
    assert store.load("SLOW00000001").size == 20


@pytest.mark.parametrize("how", ["add", "add_many"])
def test_recover_after_kill_9_during_add(tmp_path: Path, how: str) -> None:
    """A process killed while adding leaves a temp file at most; recovery removes it.
    (`add` reads the message into an unnamed spool file first: nothing is left.)"""
    script = (
        "import os, signal, sys\n"
        "from postroom.queue.store import QueueStore\n"
        "from postroom.queue.envelope import Envelope, Recipient\n"
        "def chunks():\n"
        "    yield b'x' * 1000\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "env = Envelope('DEAD00000001', 'a@b.example', [Recipient('c@d.example')], 0.0)\n"
        "store = QueueStore(sys.argv[1])\n"
        "store.add(env, chunks()) if sys.argv[2] == 'add' else store.add_many([(env, chunks())])\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path), how], timeout=60)
    assert result.returncode == -9
    leftovers = list((tmp_path / "messages").iterdir())
    if how == "add":
        assert leftovers == []
        return
    assert len(leftovers) == 1 and leftovers[0].name.endswith(".tmp")
    store = QueueStore(tmp_path)
    assert store.list() == []
    age(leftovers[0])
    assert store.recover() == 1
    assert list((tmp_path / "messages").iterdir()) == []


def test_add_many_does_not_wait_for_the_queue_lock(tmp_path: Path) -> None:
    """Another process holding the lock (a `postroom queue` command, the
    scheduler removing messages) does not hold up queueing."""
    import fcntl

    store = QueueStore(tmp_path)
    with open(tmp_path / "lock", "a+b") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        done = threading.Event()
        worker = threading.Thread(
            target=lambda: (store.add_many([(envelope("FAST00000001"), [b"x\r\n"])]),
                            done.set())
        )
        worker.start()
        assert done.wait(10)
        worker.join()
    assert store.ids() == ["FAST00000001"]


def test_list_skips_corrupt_files_and_logs_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = QueueStore(tmp_path)
    store.add(envelope("GOOD00000002", created=2.0), [b"x\r\n"])
    store.add(envelope("GOOD00000001", created=1.0), [b"x\r\n"])
    for name, data in [
        ("BAD000000001", b"{not json"),
        ("BAD000000002", b'{"queue_id": "BAD000000002"}'),  # fields missing
        ("BAD000000003", b"[1, 2]"),
        ("BAD000000004", envelope("SOMEONEELSE1").to_json()),  # the wrong ID inside
        ("BAD000000005", b"\xff\xfe"),
    ]:
        store.add(envelope(name), [b"x\r\n"])
        (tmp_path / "envelopes" / f"{name}.json").write_bytes(data)
    for name, line in [
        ("BAD000000006", ENVELOPE_TAG + b"{not json\n"),
        ("BAD000000007", ENVELOPE_TAG + envelope("SOMEONEELSE2").to_json() + b"\n"),
        ("BAD000000008", ENVELOPE_TAG + envelope("BAD000000008").to_json()),  # no LF: cut short
    ]:
        (tmp_path / "messages" / name).write_bytes(line + b"x\r\n")
    with caplog.at_level(logging.ERROR, logger="postroom.queue"):
        listed = store.list()
        assert [e.queue_id for e in listed] == ["GOOD00000001", "GOOD00000002"]  # oldest first
        assert len(caplog.records) == 8
        store.list()
        assert len(caplog.records) == 8  # each bad file is reported once
    with pytest.raises(CorruptEnvelope):
        store.load("BAD000000001")


def test_missing_queue_folder_reads_as_empty(tmp_path: Path) -> None:
    store = QueueStore(tmp_path / "nowhere", create=False)
    assert store.list() == []
    assert store.ids() == []
    assert store.recover() == 0
    with pytest.raises(NotQueued):
        store.load("AAAA00000001")
    assert not (tmp_path / "nowhere").exists()


def test_update_is_serialised_between_processes(tmp_path: Path) -> None:
    """Two processes incrementing a counter under update() lose no increment."""
    store = QueueStore(tmp_path)
    store.add(envelope(extra={"n": 0}), [b"x\r\n"])
    script = (
        "import sys\n"
        "from postroom.queue.store import QueueStore\n"
        "s = QueueStore(sys.argv[1])\n"
        "def bump(e):\n"
        "    e.extra['n'] += 1\n"
        "for _ in range(50):\n"
        "    s.update('AAAA00000001', bump)\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(tmp_path)]) for _ in range(3)
    ]
    for proc in procs:
        assert proc.wait(120) == 0
    assert store.load("AAAA00000001").extra["n"] == 150


def test_files_are_private(tmp_path: Path) -> None:
    store = QueueStore(tmp_path / "q")
    store.add(envelope(), [b"x\r\n"])
    store.update("AAAA00000001", lambda e: None)
    for path in (store.message_path("AAAA00000001"), store.envelope_path("AAAA00000001")):
        assert path.stat().st_mode & 0o077 == 0
    assert (tmp_path / "q" / "messages").stat().st_mode & 0o077 == 0
