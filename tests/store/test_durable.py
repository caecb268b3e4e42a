"""The durable-write primitive's system calls, in order, against the recording fake; and the check.

tests/test_durability.py runs the same check over every caller; here are the
primitive's own steps and fallbacks, and the check's verdicts on orders that
are wrong.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from durable_order import Call, Recorder, assert_durable, install_recorder
from postroom.store import durable


def steps(recorder: Recorder, root: Path) -> list[str]:
    """The log with paths relative to `root`."""
    def rel(path: Path | None) -> str:
        return str(path.relative_to(root)) if path is not None else ""

    return [f"{c.name} {rel(c.path)}" + (f" {rel(c.dst)}" if c.dst else "")
            for c in recorder.log]


def test_write_sync_link_then_the_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recorder = install_recorder(monkeypatch)
    (tmp_path / "new").mkdir()
    tmp = tmp_path / "tmp-file"
    fd = durable.write_new(tmp, [b"one ", b"two"])
    durable.sync_and_close(fd, tmp)
    durable.link_or_copy(tmp, tmp_path / "new" / "f", tmp_path / "unused")
    assert durable.sync_folders([tmp_path / "new", tmp_path / "new"]) == {}
    ack = recorder.note("acknowledged")
    assert steps(recorder, tmp_path) == [
        "create tmp-file", "write tmp-file", "datasync tmp-file", "link tmp-file new/f",
        "sync_dir new", "note "]
    assert_durable(recorder.log, ack, published=[tmp_path / "new" / "f"])
    assert (tmp_path / "new" / "f").read_bytes() == b"one two"


@pytest.mark.parametrize("error", [errno.EXDEV, errno.EMLINK, errno.EPERM, errno.EOPNOTSUPP])
def test_a_link_that_cannot_be_made_becomes_a_synced_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: int
) -> None:
    recorder = install_recorder(monkeypatch)
    recorder.fail("link", lambda call: OSError(error, os.strerror(error)))
    for folder in ("a", "b/tmp", "b/new"):
        (tmp_path / folder).mkdir(parents=True)
    src = tmp_path / "a" / "msg"
    durable.sync_and_close(durable.write_new(src, [b"x" * 3_000_000]), src)
    durable.link_or_copy(src, tmp_path / "b" / "new" / "msg", tmp_path / "b" / "tmp" / "msg")
    durable.sync_dir(tmp_path / "b" / "new")
    ack = recorder.note("acknowledged")
    assert steps(recorder, tmp_path) == [
        "create a/msg", "write a/msg", "datasync a/msg",
        "create b/tmp/msg", "write b/tmp/msg", "write b/tmp/msg", "write b/tmp/msg",
        "datasync b/tmp/msg", "rename b/tmp/msg b/new/msg", "sync_dir b/new", "note "]
    assert_durable(recorder.log, ack, published=[tmp_path / "b" / "new" / "msg"])
    assert (tmp_path / "b" / "new" / "msg").read_bytes() == b"x" * 3_000_000
    assert list((tmp_path / "b" / "tmp").iterdir()) == []


@pytest.mark.parametrize("error", [errno.EEXIST, errno.ENOSPC, errno.EIO])
def test_other_link_errors_are_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: int
) -> None:
    recorder = install_recorder(monkeypatch)
    recorder.fail("link", lambda call: OSError(error, os.strerror(error)))
    src = tmp_path / "msg"
    src.write_bytes(b"x")
    with pytest.raises(OSError) as caught:
        durable.link_or_copy(src, tmp_path / "dst", tmp_path / "tmp")
    assert caught.value.errno == error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["msg"]


def test_a_failed_copy_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recorder = install_recorder(monkeypatch)
    recorder.fail("link", lambda call: OSError(errno.EXDEV, "cross-device"))
    recorder.fail("datasync", lambda call: OSError(errno.EIO, "Input/output error"))
    src = tmp_path / "msg"
    src.write_bytes(b"x")
    with pytest.raises(OSError):
        durable.link_or_copy(src, tmp_path / "dst", tmp_path / "tmp")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["msg"]


def test_write_takes_more_pieces_than_one_writev_and_short_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = os.writev
    calls: list[int] = []

    def short_writev(fd: int, buffers: list[bytes]) -> int:
        calls.append(len(buffers))
        assert len(buffers) <= durable.IOV_MAX
        return real(fd, [bytes(buffers[0])[:3]])  # three octets at a time

    monkeypatch.setattr(durable.os, "writev", short_writev)
    pieces = [b"ab"] * (durable.IOV_MAX + 5) + [b"", b"end"]
    path = tmp_path / "f"
    os.close(durable.write_new(path, pieces))
    assert path.read_bytes() == b"".join(pieces)
    assert max(calls) == durable.IOV_MAX


@pytest.mark.parametrize(("error", "raised"), [(errno.EIO, True), (errno.EINVAL, False)])
def test_a_failed_folder_sync_is_raised_one_not_supported_is_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: int, raised: bool
) -> None:
    def fsync(fd: int) -> None:
        raise OSError(error, os.strerror(error))

    monkeypatch.setattr(durable.os, "fsync", fsync)
    if raised:
        with pytest.raises(OSError):
            durable.sync_dir(tmp_path)
        assert durable.sync_folders([tmp_path]).keys() == {tmp_path}
    else:
        durable.sync_dir(tmp_path)
        assert durable.sync_folders([tmp_path]) == {}


# -- the check -----------------------------------------------------------------------------

T, N, F = Path("/m/tmp/x"), Path("/m/new/x"), Path("/m/new")
GOOD = [Call("create", T), Call("write", T), Call("datasync", T), Call("rename", T, N),
        Call("sync_dir", F), Call("note", None, text="250")]


def test_the_check_passes_the_right_order() -> None:
    assert_durable(GOOD, 5, published=[N])


@pytest.mark.parametrize("log", [
    pytest.param([c for c in GOOD if c.name != "datasync"], id="no data sync"),
    pytest.param([c for c in GOOD if c.name != "sync_dir"], id="no folder sync"),
    pytest.param([GOOD[0], GOOD[1], GOOD[3], GOOD[2], GOOD[4], GOOD[5]],
                 id="data synced after the rename"),
    pytest.param([*GOOD[:2], GOOD[2], Call("write", T), *GOOD[3:]],
                 id="written again after the data sync"),
    pytest.param([*GOOD[:4], GOOD[5], GOOD[4]], id="folder synced after the reply"),
    pytest.param([*GOOD[:3], GOOD[5], GOOD[3], GOOD[4]], id="renamed after the reply"),
    pytest.param([*GOOD[:4], Call("sync_dir", Path("/m/tmp")), GOOD[5]],
                 id="the wrong folder synced"),
    pytest.param([Call("mkdir", F), *GOOD], id="a new folder not synced into its parent"),
])
def test_the_check_refuses_wrong_orders(log: list[Call]) -> None:
    ack = next(i for i, c in enumerate(log) if c.name == "note")
    with pytest.raises(AssertionError):
        assert_durable(log, ack, published=[N])


def test_the_check_of_removals_moves_and_appends() -> None:
    gone, cur = Path("/m/new/gone"), Path("/m/cur/x:2,S")
    log = [Call("unlink", gone), Call("rename", N, cur), Call("sync_dir", F),
           Call("sync_dir", Path("/m/cur")), Call("note", None, text="+OK")]
    assert_durable(log, 4, removed=[gone], moved=[cur])
    with pytest.raises(AssertionError):
        assert_durable([*log[:3], log[4]], 3, removed=[gone], moved=[cur])  # cur/ unsynced
    box = Path("/home/u/mbox")
    appended = [Call("create", box), Call("sync_dir", box.parent), Call("write", box),
                Call("datasync", box), Call("note", None, text="DELE 1")]
    assert_durable(appended, 4, appended=[box])
    with pytest.raises(AssertionError):
        assert_durable([c for c in appended if c.name != "sync_dir"], 3, appended=[box])
    with pytest.raises(AssertionError):
        assert_durable([c for c in appended if c.name != "datasync"], 3, appended=[box])
