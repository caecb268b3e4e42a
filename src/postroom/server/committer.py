"""Group commit: one thread makes many received messages durable with few journal commits.

Every message must be on disk before its 250 (RFC 5321 6.1). Doing that per
message in a thread pool costs two journal commits each (the file, then the
new/ directory) and, worse, a GIL hand-off per message between the event loop
and several threads, which showed up as most of the server's system time.
Here a single thread takes every message waiting when it wakes, writes them
all to tmp/, fdatasyncs them (on ext4 the first one commits the journal
transaction that holds all of them, so the rest are cheap), renames each into
new/ (hard links for further recipients), fsyncs each new/ directory once, and
answers the whole batch with one wake-up of the event loop. Under load the
batch grows by itself; idle, a batch is one message and costs what a direct
commit would. (Syncing the batch's files from several threads at once was
tried: the block layer merges their flushes, but the thread hand-offs cost
more than that saves, on the receiving and on the relaying benchmark.)
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from postroom.batch import BatchThread
from postroom.store.atomic import fsync_dir
from postroom.store.maildir import FILE_MODE, ensure_maildir, sent_size, unique_name


@dataclass
class _Job:
    chunks: Sequence[bytes]
    maildirs: list[Path]
    tmp: Path | None = None
    fd: int | None = None
    finals: dict[Path, Path] = field(default_factory=dict)
    error: BaseException | None = None


def _create(tmp: Path, maildir: Path) -> int:
    """Create `tmp` in `maildir`'s tmp/; the maildir is made only when that fails
    (checking first would cost three stat(2) calls on every message)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    try:
        return os.open(tmp, flags, FILE_MODE)
    except FileNotFoundError:
        ensure_maildir(maildir)
        return os.open(tmp, flags, FILE_MODE)


class GroupCommitter:
    """Files messages held in memory into Maildirs, durably, in batches."""

    def __init__(self, hostname: str) -> None:
        self._hostname = hostname
        self._thread: BatchThread[_Job, list[Path]] = BatchThread(
            "postroom-commit", self._run_batch
        )

    async def deliver(self, chunks: Sequence[bytes], maildirs: list[Path]) -> list[Path]:
        """Store the message in each maildir's new/ (one copy per distinct maildir);
        return the final paths, parallel to `maildirs`. Raises OSError on failure,
        after removing whatever this message had written."""
        return await self._thread.submit(_Job(chunks, maildirs))

    def close(self) -> None:
        """Let the thread finish the batch in hand and end."""
        self._thread.close()

    # -- the commit thread ----------------------------------------------------------

    def _run_batch(self, batch: list[_Job]) -> list[list[Path] | BaseException]:
        self._commit(batch)
        return [job.error if job.error is not None else [job.finals[m] for m in job.maildirs]
                for job in batch]

    def _commit(self, batch: list[_Job]) -> None:
        for job in batch:
            self._guard(job, self._write)
        for job in batch:
            self._guard(job, self._sync_file)
        for job in batch:
            self._guard(job, self._link)
        new_dirs = {final.parent for job in batch if job.error is None
                    for final in job.finals.values()}
        failed_dirs: dict[Path, OSError] = {}
        for new_dir in new_dirs:
            try:
                fsync_dir(new_dir)
            except OSError as exc:
                failed_dirs[new_dir] = exc
        for job in batch:
            if job.error is None:
                for final in job.finals.values():
                    if final.parent in failed_dirs:
                        job.error = failed_dirs[final.parent]
                        self._undo(job)
                        break
            if job.tmp is not None:
                with contextlib.suppress(OSError):
                    job.tmp.unlink()

    @staticmethod
    def _guard(job: _Job, step: object) -> None:
        if job.error is not None:
            return
        try:
            step(job)  # type: ignore[operator]
        except OSError as exc:
            job.error = exc
            GroupCommitter._undo(job)

    def _write(self, job: _Job) -> None:
        first = job.maildirs[0]
        size = sum(len(c) for c in job.chunks)
        sent = sent_size(job.chunks)
        while True:
            tmp = first / "tmp" / unique_name(self._hostname, size, sent)
            try:
                fd = _create(tmp, first)
                break
            except FileExistsError:  # pragma: no cover - needs a clash of unique names
                continue
        job.tmp, job.fd = tmp, fd
        data = list(job.chunks)
        while data:
            written = os.writev(fd, data)
            while data and written >= len(data[0]):
                written -= len(data.pop(0))
            if written:
                data[0] = data[0][written:]

    @staticmethod
    def _sync_file(job: _Job) -> None:
        assert job.fd is not None
        fd, job.fd = job.fd, None
        try:
            os.fdatasync(fd)
        finally:
            os.close(fd)

    @staticmethod
    def _link(job: _Job) -> None:
        """Link the file into every other maildir's new/, then rename it into the first
        one's: either makes the whole file appear at once, and the rename leaves
        nothing in tmp/ to remove (each system call here is a GIL hand-off)."""
        tmp = job.tmp
        assert tmp is not None
        first = job.maildirs[0]
        for maildir in job.maildirs:
            if maildir == first or maildir in job.finals:
                continue
            final = maildir / "new" / tmp.name
            try:
                os.link(tmp, final)
            except FileNotFoundError:
                ensure_maildir(maildir)  # a new mailbox: make its folders, then again
                os.link(tmp, final)
            job.finals[maildir] = final
        final = first / "new" / tmp.name
        os.rename(tmp, final)
        job.tmp = None
        job.finals[first] = final

    @staticmethod
    def _undo(job: _Job) -> None:
        if job.fd is not None:
            with contextlib.suppress(OSError):
                os.close(job.fd)
            job.fd = None
        for final in job.finals.values():
            with contextlib.suppress(OSError):
                final.unlink()
        job.finals.clear()
