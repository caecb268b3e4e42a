"""Filing messages into Maildirs: one durable commit path for every size, alone or in a batch.

`commit` files a batch of messages, each held in memory or in a spool file
(`MessageWriter`), with postroom.store.durable's steps taken batch-wide: write
(a message in memory into its first maildir's tmp/), sync each message's data,
publish (link(2) into every other maildir's new/, a copy where a link cannot be
made; the tmp/ file renamed into its own new/ last), sync each new/ folder once.
Only then do callers acknowledge. A message whose step fails is taken back out of
every maildir it reached, so the client's retry cannot duplicate it; the rest of
the batch goes on. Every copy of a message has the same name (maildir.unique_name).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from postroom.store import durable
from postroom.store.maildir import DIR_MODE, LineEnds, ensure_maildir, unique_name

# A spooled message's writes are gathered up to this size before a write(2):
# the writer runs on the event loop, one system call per network read would
# cost more than the copy.
WRITE_BUFFER = 64 * 1024


@dataclass(eq=False)
class Delivery:
    """One message to file into `maildirs` (a maildir named twice gets one copy)."""

    maildirs: list[Path]
    chunks: Sequence[bytes] = ()  # the message, when held in memory
    spool: MessageWriter | None = None  # or its spool file
    finals: dict[Path, Path] = field(default_factory=dict)  # maildir -> its copy
    error: BaseException | None = None  # why it was not filed
    _tmp: Path | None = None  # an in-memory message's file in its first maildir's tmp/
    _fd: int | None = None  # that file, open until its data is synced
    _name: str = ""

    def paths(self) -> list[Path]:
        """The copies, parallel to `maildirs` (after a successful commit)."""
        return [self.finals[m] for m in self.maildirs]

    @property
    def source(self) -> Path:
        """The file the copies are made from."""
        if self.spool is not None:
            return self.spool.path
        assert self._tmp is not None
        return self._tmp


def commit(batch: Sequence[Delivery], hostname: str) -> None:
    """File every delivery of `batch` durably (BLOCKING: fsync). Sets each one's
    `finals`, or its `error` after removing every copy of that message."""
    for step in (functools.partial(_write, hostname=hostname), _sync, _publish):
        for delivery in batch:
            _step(delivery, step)
    failed = durable.sync_folders(final.parent for d in batch if d.error is None
                                  for final in d.finals.values())
    for delivery in batch:
        if delivery.error is None:
            for final in delivery.finals.values():
                if final.parent in failed:
                    delivery.error = failed[final.parent]
                    _undo(delivery)
                    break
        _tidy(delivery)


def _step(delivery: Delivery, step: Callable[[Delivery], None]) -> None:
    if delivery.error is not None:
        return
    try:
        step(delivery)
    except OSError as exc:
        delivery.error = exc
        _undo(delivery)


def _write(delivery: Delivery, hostname: str) -> None:
    spool = delivery.spool
    if spool is not None:
        spool.flush()
        delivery._name = unique_name(hostname, spool.size, spool.sent)
        return
    chunks = delivery.chunks
    counted = LineEnds(chunks)
    first = delivery.maildirs[0]
    while True:
        name = unique_name(hostname, counted.size, counted.sent)
        tmp = first / "tmp" / name
        try:
            try:
                fd = durable.write_new(tmp, chunks)
            except FileNotFoundError:
                # A new mailbox: its folders are made only now (checking first
                # would cost three stat(2) calls on every message).
                ensure_maildir(first)
                fd = durable.write_new(tmp, chunks)
            break
        except FileExistsError:  # pragma: no cover - needs a clash of unique names
            continue
    delivery._tmp, delivery._fd, delivery._name = tmp, fd, name


def _sync(delivery: Delivery) -> None:
    if delivery.spool is not None:
        delivery.spool.sync()
        return
    fd, delivery._fd = delivery._fd, None
    assert fd is not None and delivery._tmp is not None
    durable.sync_and_close(fd, delivery._tmp)


def _publish(delivery: Delivery) -> None:
    """Link the file into every maildir but the one whose tmp/ holds it, then rename
    it into that one's new/: either makes the whole file appear at once."""
    source = delivery.source
    name = delivery._name
    home = delivery.maildirs[0] if delivery.spool is None else None
    for maildir in delivery.maildirs:
        if maildir == home or maildir in delivery.finals:
            continue
        final = maildir / "new" / name
        try:
            durable.link_or_copy(source, final, maildir / "tmp" / name)
        except FileNotFoundError:
            ensure_maildir(maildir)  # a new mailbox: make its folders, then again
            durable.link_or_copy(source, final, maildir / "tmp" / name)
        delivery.finals[maildir] = final
    if home is not None:
        final = home / "new" / name
        durable.OS.rename(source, final)
        delivery._tmp = None
        delivery.finals[home] = final


def _undo(delivery: Delivery) -> None:
    """Take every copy back out (the message was not filed)."""
    if delivery._fd is not None:
        with contextlib.suppress(OSError):
            os.close(delivery._fd)
        delivery._fd = None
    for final in delivery.finals.values():
        with contextlib.suppress(OSError):
            os.unlink(final)
    delivery.finals.clear()


def _tidy(delivery: Delivery) -> None:
    """After the batch: remove what the message left in tmp/; a spool file, once
    its message is filed (a failed one stays with its writer, which may retry)."""
    if delivery._tmp is not None:
        with contextlib.suppress(OSError):
            os.unlink(delivery._tmp)
        delivery._tmp = None
    if delivery.spool is not None and delivery.error is None:
        delivery.spool.abort()


class MessageWriter:
    """A message being received into a spool file, then filed as a `delivery` of a
    `commit` batch.

    `write` runs on the event loop (writes gathered into WRITE_BUFFER pieces).
    `spool` must be under the mail folder, on the filesystem of the maildirs,
    so that link(2) works.
    """

    def __init__(self, spool: Path, hostname: str) -> None:
        if not spool.is_dir():
            spool.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        while True:
            path = spool / unique_name(hostname)
            try:
                fd = durable.OS.create(path)
                break
            except FileExistsError:  # pragma: no cover - needs a clash of unique names
                continue
        self._path: Path | None = path
        self._fd: int | None = fd
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._line_ends = LineEnds()  # the size so far, and the W= of the names
        self._lost: OSError | None = None  # a write that failed: the file is not whole

    @property
    def size(self) -> int:
        """Octets written so far."""
        return self._line_ends.size

    @property
    def sent(self) -> int:
        """The octets as POP3 sends them (maildir.LineEnds)."""
        return self._line_ends.sent

    @property
    def path(self) -> Path:
        if self._path is None:
            raise ValueError("the message was committed or aborted")
        return self._path

    def write(self, data: bytes) -> None:
        """Append `data` (CRLF line ends, exactly as they should be stored)."""
        if self._path is None:
            raise ValueError("write after commit or abort")
        self._buffer.append(data)
        self._buffered += len(data)
        self._line_ends.feed(data)
        if self._buffered >= WRITE_BUFFER:
            self.flush()

    def flush(self) -> None:
        """Write what is buffered to the spool file."""
        if self._lost is not None:
            raise self._lost
        if self._buffer:
            assert self._fd is not None
            buffer, self._buffer, self._buffered = self._buffer, [], 0
            try:
                durable.OS.write(self._fd, self.path, buffer)
            except OSError as exc:
                self._lost = exc  # part of it may be written: never file this message
                raise

    def sync(self) -> None:
        """The spool file's data on disk (durable step 2)."""
        assert self._fd is not None
        durable.OS.datasync(self._fd, self.path)

    def delivery(self, maildirs: list[Path]) -> Delivery:
        """This message as one delivery of a `commit` batch."""
        if self._path is None:
            raise ValueError("commit after commit or abort")
        if self._lost is not None:
            raise self._lost
        return Delivery(list(maildirs), spool=self)

    def read_back(self, chunk_size: int = 256 * 1024, skip: int = 0) -> Iterator[bytes]:
        """The bytes written so far, the first `skip` left out, from the spool file
        (BLOCKING). Used to hand a large message to the queue as well as to maildirs."""
        self.flush()
        with open(self.path, "rb") as f:
            f.seek(skip)
            while chunk := f.read(chunk_size):
                yield chunk

    def abort(self) -> None:
        """Close and remove the spool file: the message was filed, or is dropped. Safe
        to call twice."""
        path, self._path = self._path, None
        self._buffer, self._buffered = [], 0
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
