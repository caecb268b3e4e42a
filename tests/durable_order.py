"""A recorder of durable writes' system calls, and the check that they come in the right order.

`Recorder` stands in for `postroom.store.durable.OS`: it performs each call
and appends `Call(name, path, dst)` to one log, in order, across threads. A
test records its acknowledgement in the same log (`Recorder.note`: the 250
written to a client, the +OK to QUIT, the DELE that `fetch` sends, or a
blocking call returning) and asks `assert_durable` whether everything that
acknowledgement promises was on disk before it:

- a published file: written, its data synced after its last write, published
  (link or rename to its final name), its folder synced, then the
  acknowledgement (and any folder made on the way synced into its parent);
- a removed file: unlinked or renamed away, its folder synced, then the
  acknowledgement;
- a moved file (an existing message renamed, new/ to cur/): renamed, both
  folders synced, then the acknowledgement;
- an appended file: written, its data synced, then the acknowledgement (and,
  when the append made the file, its folder synced).

`fail` makes one kind of call raise, to run the fallbacks and failure paths;
`omit` makes calls without logging them, which is what code that left that
step out would log: the check must then fail.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from postroom.store import durable

PUBLISH = ("link", "rename")
WRITE = ("write", "truncate")


@dataclass(frozen=True)
class Call:
    name: str  # a SysCalls method, or "note" for what the test records
    path: Path | None
    dst: Path | None = None
    text: str = ""

    def __str__(self) -> str:
        if self.name == "note":
            return f"note {self.text!r}"
        return f"{self.name} {self.path}" + (f" -> {self.dst}" if self.dst else "")


class Recorder(durable.SysCalls):
    """durable.SysCalls that logs every call before making it."""

    def __init__(self) -> None:
        self.log: list[Call] = []
        self._lock = threading.Lock()
        # name -> predicate(call) -> exception to raise instead of making the call
        self._fail: dict[str, Callable[[Call], BaseException | None]] = {}
        self._omit: set[str] = set()

    def fail(self, name: str, when: Callable[[Call], BaseException | None]) -> None:
        """Make calls `name` raise what `when(call)` returns (None: make the call)."""
        self._fail[name] = when

    def omit(self, name: str) -> None:
        """Make calls `name` but leave them out of the log."""
        self._omit.add(name)

    def _record(self, name: str, path: Path | None, dst: Path | None = None) -> None:
        call = Call(name, Path(path) if path is not None else None,
                    Path(dst) if dst is not None else None)
        rule = self._fail.get(name)
        error = rule(call) if rule is not None else None
        if error is not None:
            raise error
        if name in self._omit:
            return
        with self._lock:
            self.log.append(call)

    def note(self, text: str) -> int:
        """Log what the code under test acknowledged; returns its index."""
        with self._lock:
            self.log.append(Call("note", None, text=text))
            return len(self.log) - 1

    def index(self, predicate: Callable[[Call], bool], start: int = 0) -> int:
        for i in range(start, len(self.log)):
            if predicate(self.log[i]):
                return i
        raise AssertionError(f"nothing in the log matches:\n{self.dump()}")

    def note_index(self, needle: str) -> int:
        """The first note containing `needle`."""
        return self.index(lambda c: c.name == "note" and needle in c.text)

    def dump(self) -> str:
        return "\n".join(f"{i:4d} {call}" for i, call in enumerate(self.log))

    # -- durable.SysCalls ------------------------------------------------------

    def create(self, path: Path, mode: int = durable.FILE_MODE) -> int:
        self._record("create", path)
        return super().create(path, mode)

    def open_append(self, path: Path, mode: int = durable.FILE_MODE) -> tuple[int, bool]:
        fd, made = super().open_append(path, mode)
        if made:
            self._record("create", path)
        return fd, made

    def write(self, fd: int, path: Path, chunks: Sequence[bytes]) -> None:
        self._record("write", path)
        super().write(fd, path, chunks)

    def truncate(self, fd: int, path: Path, size: int) -> None:
        self._record("truncate", path)
        super().truncate(fd, path, size)

    def datasync(self, fd: int, path: Path, *, metadata: bool = False) -> None:
        self._record("datasync", path)
        super().datasync(fd, path, metadata=metadata)

    def link(self, src: Path, dst: Path) -> None:
        self._record("link", src, dst)
        super().link(src, dst)

    def rename(self, src: Path, dst: Path) -> None:
        self._record("rename", src, dst)
        super().rename(src, dst)

    def unlink(self, path: Path) -> None:
        self._record("unlink", path)
        super().unlink(path)

    def mkdir(self, path: Path, mode: int) -> None:
        self._record("mkdir", path)
        super().mkdir(path, mode)

    def sync_dir(self, path: Path) -> None:
        self._record("sync_dir", path)
        super().sync_dir(path)


def install_recorder(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    """A Recorder installed as durable.OS for the rest of the test."""
    rec = Recorder()
    monkeypatch.setattr(durable, "OS", rec)
    return rec


def _where(log: Sequence[Call]) -> str:
    return "\n".join(f"{i:4d} {call}" for i, call in enumerate(log))


def _last(log: Sequence[Call], before: int, match: Callable[[Call], bool]) -> int | None:
    for i in range(before - 1, -1, -1):
        if match(log[i]):
            return i
    return None


def _first(log: Sequence[Call], start: int, end: int, match: Callable[[Call], bool]) -> int | None:
    for i in range(start, end):
        if match(log[i]):
            return i
    return None


def _assert_folder_synced(log: Sequence[Call], folder: Path, after: int, ack: int,
                          what: str) -> None:
    if _first(log, after + 1, ack, lambda c: c.name == "sync_dir" and c.path == folder) is None:
        raise AssertionError(f"{what}: its folder {folder} was not synced between step {after} "
                             f"and the acknowledgement (step {ack})\n{_where(log)}")


def _assert_made_folders_synced(log: Sequence[Call], folder: Path, ack: int) -> None:
    """Folders made on the way to `folder` (mkdir) are synced into their parents."""
    for i in range(ack):
        call = log[i]
        if call.name == "mkdir" and call.path is not None and (
            call.path == folder or call.path in folder.parents
        ):
            _assert_folder_synced(log, call.path.parent, i, ack, f"the new folder {call.path}")


def _assert_data_synced(log: Sequence[Call], path: Path, before: int, what: str) -> None:
    last_write = _last(log, before, lambda c: c.name in WRITE and c.path == path)
    if last_write is None:
        raise AssertionError(f"{what}: no write of {path} was recorded before step {before}"
                             f"\n{_where(log)}")
    synced = _first(log, last_write + 1, before,
                    lambda c: c.name == "datasync" and c.path == path)
    if synced is None:
        raise AssertionError(f"{what}: the data of {path} was not synced between its last "
                             f"write (step {last_write}) and step {before}\n{_where(log)}")


def assert_durable(
    log: Sequence[Call],
    ack: int,
    *,
    published: Iterable[Path] = (),
    removed: Iterable[Path] = (),
    moved: Iterable[Path] = (),
    appended: Iterable[Path] = (),
) -> None:
    """Everything the acknowledgement at `log[ack]` promises was durable before it."""
    published, removed, moved = list(published), list(removed), list(moved)
    appended = list(appended)
    assert published or removed or moved or appended, "nothing to check"
    for final in published:
        what = f"published {final}"
        step = _last(log, ack, lambda c, f=final: c.name in PUBLISH and c.dst == f)
        if step is None:
            raise AssertionError(f"{what}: not linked or renamed into place before the "
                                 f"acknowledgement (step {ack})\n{_where(log)}")
        source = log[step].path
        assert source is not None
        _assert_data_synced(log, source, step, what)
        _assert_folder_synced(log, final.parent, step, ack, what)
        _assert_made_folders_synced(log, final.parent, ack)
    for path in removed:
        what = f"removed {path}"
        step = _last(log, ack, lambda c, p=path: c.name in ("unlink", "rename") and c.path == p)
        if step is None:
            raise AssertionError(f"{what}: not unlinked or renamed away before the "
                                 f"acknowledgement (step {ack})\n{_where(log)}")
        _assert_folder_synced(log, path.parent, step, ack, what)
    for dst in moved:
        what = f"moved to {dst}"
        step = _last(log, ack, lambda c, d=dst: c.name == "rename" and c.dst == d)
        if step is None:
            raise AssertionError(f"{what}: not renamed there before the acknowledgement "
                                 f"(step {ack})\n{_where(log)}")
        source = log[step].path
        assert source is not None
        _assert_folder_synced(log, source.parent, step, ack, what)
        _assert_folder_synced(log, dst.parent, step, ack, what)
    for path in appended:
        what = f"appended to {path}"
        _assert_data_synced(log, path, ack, what)
        made = _last(log, ack, lambda c, p=path: c.name == "create" and c.path == p)
        if made is not None:
            _assert_folder_synced(log, path.parent, made, ack, f"{what} (made by the append)")
