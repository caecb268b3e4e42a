"""Atomic writes: the old version or the new one, never a mix, and no temp files left over."""

from __future__ import annotations

import errno
import stat
from pathlib import Path

import pytest

from durable_order import assert_durable, install_recorder
from postroom.store.atomic import atomic_write


def test_creates_and_replaces(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    atomic_write(target, b"one")
    assert target.read_bytes() == b"one"
    atomic_write(target, b"two, longer")
    assert target.read_bytes() == b"two, longer"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_mode(tmp_path: Path) -> None:
    target = tmp_path / "secret"
    atomic_write(target, b"x")
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    atomic_write(target, b"y", mode=0o644)
    assert stat.S_IMODE(target.stat().st_mode) == 0o644


def test_failure_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "state"
    atomic_write(target, b"old")
    recorder = install_recorder(monkeypatch)
    recorder.fail("datasync", lambda call: OSError(errno.EIO, "Input/output error"))
    with pytest.raises(OSError):
        atomic_write(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["state"]


def test_written_synced_renamed_then_the_folder_synced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = install_recorder(monkeypatch)
    atomic_write(tmp_path / "f", b"data")
    done = recorder.note("returned")
    assert [c.name for c in recorder.log] == [
        "create", "write", "datasync", "rename", "sync_dir", "note"]
    assert_durable(recorder.log, done, published=[tmp_path / "f"])
