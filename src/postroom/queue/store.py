"""The queue on disk: one file per queued message, envelope and bytes together, written durably.

Layout under the queue folder:

    messages/<id>         the queue file: one line "postroom-envelope " + the Envelope
                          (postroom.queue.envelope) as JSON + LF, then the message bytes
                          (CRLF lines, as received; postroom.queue.queuefile)
    envelopes/<id>.json   the Envelope as it is now, once it has changed since it was
                          queued (a delivery deferred, a hold): it overrides the first line
    lock                  taken (flock) around every change, see below
    spare/                blanked files of finished messages, reused (postroom.queue.spares)

As in Postfix's queue files, the envelope and the content share one file, so
queuing a message costs one file, one data sync and one directory sync.
Envelope changes do not rewrite the message: they go to envelopes/, which
readers prefer.

Invariants. The queue file is the commit record: a message counts as queued
exactly when messages/<id> exists, and a queue file is whole whenever it has
its name (postroom.queue.adding writes it as a temporary file, syncs it,
gives it its name, then syncs the folder). `remove` deletes the queue file
first (and syncs the folder), then the envelope that overrides it: a crash in
between leaves an envelope without its message, which `recover` deletes.
While a message is being added its temporary file is flocked, and `recover`
leaves a flocked file alone.

Several processes change the queue: the server (the scheduler), `postroom
queue` (hold, flush, delete) and `postroom sendmail` (add). Every write is an
atomic rename or link, so a reader sees the old or the new file, never a mix.
Each change but adding also runs under an exclusive flock(2) on `lock`, so a
read-modify-write (`update`) never interleaves with another one nor brings
back an envelope that `remove` just deleted. The scheduler merges its part
into what is on disk, keeping the fields the command line owns (`held`).
Where flock(2) is missing (Windows) only the in-process lock remains, and
the last writer wins.

Every method blocks (fsync); the asyncio server runs them in worker threads.
"""

from __future__ import annotations

import builtins
import contextlib
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from postroom.queue import adding
from postroom.queue.content import Content
from postroom.queue.envelope import Envelope
from postroom.queue.queuefile import ENVELOPE_TAG, read_envelope_line
from postroom.queue.spares import SPARE, Spares, try_lock, unlink
from postroom.store import durable
from postroom.store.atomic import atomic_write

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("postroom.queue")

MESSAGES = "messages"
ENVELOPES = "envelopes"
LOCK_NAME = "lock"
ENVELOPE_SUFFIX = ".json"
TEMP_SUFFIX = adding.TEMP_SUFFIX  # temporary files: queue files being added, envelopes
# Queue IDs become file names: letters, digits, "-" and "_" only, so no ID can
# name a path outside the queue ("../x") or a hidden temporary file (".x.tmp").
_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
# Without flock a temporary file cannot say it is still being written; one this
# old is taken to be left over from a crash.
STALE_TEMP_AGE = 24 * 3600.0
# A temporary file made a moment ago may not be flocked yet (mkstemp, then flock;
# atomic_write's files never are): one younger than this is never removed.
FRESH_TEMP_AGE = 60.0


class QueueError(ValueError):
    """A queue operation that cannot be done; str() is one line for people."""


class NotQueued(QueueError):
    """No message with this queue ID is in the queue."""

    def __init__(self, queue_id: str) -> None:
        super().__init__(f"no message {queue_id} in the queue")
        self.queue_id = queue_id


class CorruptEnvelope(QueueError):
    """An envelope (its file, or a queue file's first line) that cannot be read back."""


def check_queue_id(queue_id: str) -> str:
    """Return `queue_id` if it is safe as a file name, else raise QueueError."""
    if not _ID.fullmatch(queue_id):
        raise QueueError(f"not a queue ID: {queue_id!r}")
    return queue_id


class QueueStore:
    """Durable envelope + message storage in one folder (see the module docstring)."""

    def __init__(self, queue_dir: str | os.PathLike[str], *, create: bool = True) -> None:
        self.dir = Path(queue_dir)
        self.messages = self.dir / MESSAGES
        self.envelopes = self.dir / ENVELOPES
        self._messages_str, self._envelopes_str = str(self.messages), str(self.envelopes)
        self._thread_lock = threading.RLock()
        self._depth = 0  # nesting of locked() in the thread that holds _thread_lock
        self._reported: set[tuple[str, int, int]] = set()  # corrupt files already logged
        self.spares = Spares(self.dir / SPARE)
        self._folders_made = False  # see make_folders
        if create:
            for folder in (self.messages, self.envelopes, self.spares.folder):
                folder.mkdir(mode=0o700, parents=True, exist_ok=True)

    # -- paths and locking -----------------------------------------------------

    def message_path(self, queue_id: str) -> Path:
        return self.messages / check_queue_id(queue_id)

    def envelope_path(self, queue_id: str) -> Path:
        return self.envelopes / (check_queue_id(queue_id) + ENVELOPE_SUFFIX)

    def make_folders(self, *, again: bool = False) -> None:
        """Make the message and envelope folders once per store, or `again` (a folder
        was found missing): not on every add, where each system call of a queue
        thread hands the interpreter lock over."""
        if again or not self._folders_made:
            for folder in (self.messages, self.envelopes):
                folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._folders_made = True

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the queue's lock: other threads of this process and other processes wait.

        Re-entrant within one thread; the flock is taken once, by the
        outermost call (a second open file would block on the first).
        """
        with self._thread_lock, contextlib.ExitStack() as flock:
            if not self._depth and fcntl is not None and self.dir.is_dir():
                fd = os.open(self.dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
                flock.callback(os.close, fd)  # releases the flock
                fcntl.flock(fd, fcntl.LOCK_EX)
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1

    # -- adding: postroom.queue.adding's functions, as methods --------------------

    add = adding.add  # one message; when it returns, a crash cannot lose it
    add_many = adding.add_many  # several with one round of syncs (group commit)

    # -- reading ---------------------------------------------------------------

    def load(self, queue_id: str) -> Envelope:
        """The envelope of `queue_id`; NotQueued if absent, CorruptEnvelope if unreadable.

        The envelope file when there is one (it is newer), else the queue
        file's first line; `size` is then the message's, measured on the file.
        """
        # Paths as strings: a pathlib.Path interns each part of every name it parses,
        # and a listing of the whole queue reads every envelope.
        path = os.path.join(self._envelopes_str, check_queue_id(queue_id) + ENVELOPE_SUFFIX)
        try:
            with open(path, "rb") as file:
                data = file.read()
        except FileNotFoundError:
            pass
        else:
            return self._parse(path, data, queue_id)
        fd, line, size = self._open_queue_file(queue_id)
        os.close(fd)
        envelope = self._parse(os.path.join(self._messages_str, queue_id),
                               line[len(ENVELOPE_TAG):], queue_id)
        envelope.size = size
        return envelope

    def open_content(self, queue_id: str) -> Content:
        """The message of `queue_id`, open for couriers to read (the caller closes it);
        NotQueued if absent, CorruptEnvelope if its queue file has no envelope line."""
        fd, line, size = self._open_queue_file(queue_id)
        return Content(fd, len(line), size)

    def _open_queue_file(self, queue_id: str) -> tuple[int, bytes, int]:
        """The queue file open for reading, its envelope line and the message's size."""
        path = os.path.join(self._messages_str, check_queue_id(queue_id))
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NotQueued(queue_id) from None
        try:
            line = read_envelope_line(fd)
            if line is None:
                raise CorruptEnvelope(f"{path}: not a queue file (no envelope line)")
            if not line.endswith(b"\n"):
                raise CorruptEnvelope(f"{path}: the envelope line has no end")
            return fd, line, os.fstat(fd).st_size - len(line)
        except BaseException:
            os.close(fd)
            raise

    def _parse(self, path: str, data: bytes, queue_id: str) -> Envelope:
        try:
            envelope = Envelope.from_json(data)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CorruptEnvelope(f"{path}: unreadable envelope: {e}") from None
        if envelope.queue_id != queue_id:
            raise CorruptEnvelope(f"{path}: holds the envelope of {envelope.queue_id!r}")
        return envelope

    def ids(self) -> list[str]:
        """The queue IDs that have a queue file, sorted."""
        try:
            names = os.listdir(self.messages)
        except FileNotFoundError:
            return []
        return sorted(name for name in names if _ID.fullmatch(name))

    def scan_ids(self) -> Iterator[str]:
        """The queue IDs that have a queue file, in the folder's order, as they are read:
        constant memory however many there are (`ids` sorts them all first)."""
        try:
            with os.scandir(self.messages) as entries:
                for entry in entries:
                    if _ID.fullmatch(entry.name):
                        yield entry.name
        except FileNotFoundError:
            return

    def scan(self) -> Iterator[Envelope]:
        """Every readable envelope, in the folder's order, one at a time (a corrupt one is
        skipped and logged, as by `list`): what a command that streams the queue reads."""
        for queue_id in self.scan_ids():
            envelope = self.try_load(queue_id)
            if envelope is not None:
                yield envelope

    def try_load(self, queue_id: str) -> Envelope | None:
        """`load`, or None when the message is gone or cannot be read (logged once)."""
        try:
            return self.load(queue_id)
        except NotQueued:
            return None  # removed while we listed
        except CorruptEnvelope as e:
            self._report(self.message_path(queue_id), str(e))
        except OSError as e:
            self._report(self.message_path(queue_id), f"{queue_id}: {e}")
        return None

    def list(self) -> list[Envelope]:
        """Every readable envelope, oldest first.

        A corrupt file is skipped and logged (once per version of the file),
        never raised: one bad file must not stop the delivery of the rest.
        """
        result = [e for e in map(self.try_load, self.ids()) if e is not None]
        result.sort(key=lambda e: (e.created, e.queue_id))
        return result

    def _report(self, path: Path, why: str) -> None:
        try:
            st = path.stat()
            key = (path.name, st.st_mtime_ns, st.st_size)
        except OSError:
            key = (path.name, 0, 0)
        if key not in self._reported:
            self._reported.add(key)
            log.error("queue: skipping %s", why)

    # -- changing --------------------------------------------------------------

    def update(self, queue_id: str, change: Callable[[Envelope], object]) -> Envelope:
        """Read, change (in place) and rewrite one envelope under the lock; returns it.

        The way to change part of an envelope another process may also change.
        NotQueued when the message is not (or no longer) in the queue: an
        envelope is never written without its message.
        """
        with self.locked():
            envelope = self.load(queue_id)
            if not self.message_path(queue_id).exists():
                raise NotQueued(queue_id)
            change(envelope)
            self._write_envelope(envelope)
            return envelope

    def update_many(
        self, changes: builtins.list[tuple[str, Callable[[Envelope], object]]]
    ) -> builtins.list[Envelope | BaseException]:
        """`update` for several messages under one lock, with one sync of the envelope
        folder for all of them (a group commit); per change, the envelope written or
        the exception that stopped it (NotQueued among them).

        Each new envelope file is data-synced before it takes its name, so a name
        never holds a torn file. The folder is synced once at the end: a crash
        before that may bring back a message's previous envelope, which is always
        one the queue wrote before, for a message still queued (the queue file,
        the commit record, is not touched here). For a deferral that means an
        earlier retry, and for a result already acted on a delivery or notice
        made again: at least once, never lost (the module's invariants).
        """
        results: builtins.list[Envelope | BaseException] = []
        written = False
        with self.locked():
            for queue_id, change in changes:
                try:
                    envelope = self.load(queue_id)
                    if not self.message_path(queue_id).exists():
                        raise NotQueued(queue_id)
                    change(envelope)
                    self._write_envelope(envelope, sync_dir=False)
                    written = True
                    results.append(envelope)
                except (QueueError, OSError) as e:
                    results.append(e)
            if written:
                try:
                    durable.sync_dir(self.envelopes)
                except OSError as e:
                    results = [e if isinstance(r, Envelope) else r for r in results]
        return results

    def _write_envelope(self, envelope: Envelope, *, sync_dir: bool = True) -> None:
        path = self.envelope_path(envelope.queue_id)
        try:
            atomic_write(path, envelope.to_json(), sync_dir=sync_dir)
        except FileNotFoundError:  # the folder was removed under us: make it again
            self.make_folders(again=True)
            atomic_write(path, envelope.to_json(), sync_dir=sync_dir)

    def remove(self, queue_id: str) -> None:
        """Delete a message: its queue file first (the commit), then its envelope file.

        NotQueued when neither file exists.
        """
        error = self.remove_many([queue_id])[0]
        if error is not None:
            raise error

    def remove_many(
        self, queue_ids: builtins.list[str], *, reuse: bool = False
    ) -> builtins.list[BaseException | None]:
        """`remove` for several messages with one sync of the queue folder.

        Per ID: None once it is gone, NotQueued when neither file existed, or the
        OSError that stopped it (its envelope file, if any, is then kept).

        `reuse`: keep the blanked queue files for later adds
        (postroom.queue.spares) instead of unlinking them. Only for a caller
        that knows nobody reads the message any more, as the scheduler does of
        a message whose deliveries it has just finished: an unlinked file stays
        whole for whoever still has it open, a reused one is blanked and refilled.
        """
        drop = self.spares.retire if reuse else Path.unlink
        errors: builtins.list[BaseException | None] = [None] * len(queue_ids)
        with self.locked():
            removed = False
            for i, queue_id in enumerate(queue_ids):
                try:
                    drop(self.message_path(queue_id))
                    removed = True
                except FileNotFoundError:
                    errors[i] = NotQueued(queue_id)
                except OSError as e:
                    errors[i] = e
            if removed:
                # The queue files' removal is the commit point. The envelope files
                # need no sync: if a crash brings one back without its queue file,
                # `recover` removes it.
                try:
                    durable.sync_dir(self.messages)
                except OSError as e:
                    errors = [e if err is None else err for err in errors]
            for i, queue_id in enumerate(queue_ids):
                if errors[i] is not None and not isinstance(errors[i], NotQueued):
                    continue
                try:
                    os.unlink(self.envelope_path(queue_id))
                    errors[i] = None  # an envelope without its message: gone now too
                except FileNotFoundError:
                    pass
                except OSError as e:
                    if errors[i] is None:
                        errors[i] = e
        return errors

    def recover(self) -> int:
        """Clean up after a crash; returns the number of files removed.

        Removes temporary files nobody is writing any more, and envelope files
        whose queue file is gone (a `remove` cut short).
        """
        removed = 0
        with self.locked():
            try:
                envelope_names = set(os.listdir(self.envelopes))
                message_names = set(os.listdir(self.messages))
            except FileNotFoundError:
                return 0
            for name in sorted(message_names):
                path = self.messages / name
                if name.endswith(TEMP_SUFFIX) and self._temp_is_stale(path) and unlink(path):
                    removed += 1
            for name in sorted(envelope_names):
                path = self.envelopes / name
                if name.endswith(TEMP_SUFFIX):
                    if self._temp_is_stale(path):
                        removed += unlink(path)
                elif name.endswith(ENVELOPE_SUFFIX):
                    queue_id = name[: -len(ENVELOPE_SUFFIX)]
                    if queue_id not in message_names and unlink(path):
                        log.warning("%s: removed an envelope whose message is gone (crash)",
                                    queue_id)
                        removed += 1
            if removed:
                durable.sync_dir(self.messages)
                durable.sync_dir(self.envelopes)
        return removed

    @staticmethod
    def _temp_is_stale(path: Path) -> bool:
        """True when nobody is writing this temporary file any more: it is not flocked,
        and has not changed for FRESH_TEMP_AGE seconds (STALE_TEMP_AGE without flock)."""
        try:
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return False
        if fcntl is None or age < FRESH_TEMP_AGE:
            return age > STALE_TEMP_AGE
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            return try_lock(fd)  # else `add` holds it: still being written
        finally:
            os.close(fd)
