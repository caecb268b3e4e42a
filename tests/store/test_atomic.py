"""Atomic writes: the old version or the new one, never a mix, and no temp files left over."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from postroom.store import atomic
from postroom.store.atomic import atomic_write, fsync_dir


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

    def broken_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(atomic.os, "fsync", broken_fsync)
    with pytest.raises(OSError):
        atomic_write(target, b"new")
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["state"]


def test_directory_is_synced_after_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[str] = []
    real_replace, real_fsync = os.replace, os.fsync

    def replace(src: str, dst: str) -> None:
        events.append("rename")
        real_replace(src, dst)

    def fsync(fd: int) -> None:
        events.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(atomic.os, "replace", replace)
    monkeypatch.setattr(atomic.os, "fsync", fsync)
    atomic_write(tmp_path / "f", b"data")
    assert events == ["file", "rename", "dir"]


def test_fsync_dir_on_a_directory(tmp_path: Path) -> None:
    fsync_dir(tmp_path)  # must not raise
