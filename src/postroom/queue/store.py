"""The queue on disk: one message file and one envelope file per queued message, written durably.

Layout under the queue folder:

    messages/<id>         the message bytes (CRLF lines, as received)
    envelopes/<id>.json   the Envelope (postroom.queue.envelope), rewritten on every change
    lock                  taken (flock) around every change, see below
    spare/                blanked files of finished messages, reused (postroom.queue.spares)

Invariants. `add` writes the message first (temporary file, fsync, rename,
fsync of the folder) and the envelope second, so an envelope always has its
message; `remove` deletes the envelope first, so a crash leaves at worst a
message without an envelope: an orphan that `recover` deletes. The envelope
is the commit record: a message counts as queued exactly when its envelope
file exists. While a message is being added its file is flocked, from its
creation as a temporary file until its envelope is in place, and `recover`
leaves a flocked file alone.

Several processes change the queue: the server (the scheduler), `postroom
queue` (hold, flush, delete) and `postroom sendmail` (add). Every write is an
atomic rename, so a reader sees the old or the new file, never a mix. Each
change but `add_many` (see above) also runs under an exclusive flock(2) on `lock`, so a
read-modify-write (`update`) never interleaves with another one and a `save`
never brings back an envelope that `remove` just deleted. Between two
changes the last writer wins: a whole-envelope `save` made from an old copy
undoes what another process wrote in the meantime. The scheduler therefore
changes envelopes with `update`, keeping the fields the command line owns
(`held`). Where flock(2) is missing (Windows) only the in-process lock
remains, and last-writer-wins is all that holds.

Every method blocks (fsync); the asyncio server runs them in worker threads.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from postroom.queue.envelope import Envelope
from postroom.queue.spares import SPARE, Spares, Taken
from postroom.store.atomic import atomic_write, fsync_dir

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("postroom.queue")

MESSAGES = "messages"
ENVELOPES = "envelopes"
LOCK_NAME = "lock"
ENVELOPE_SUFFIX = ".json"
TEMP_SUFFIX = ".tmp"
# Queue IDs become file names: letters, digits, "-" and "_" only, so no ID can
# name a path outside the queue ("../x") or a hidden temporary file (".x.tmp").
_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
# The data and what it takes to read it back (the size), not the timestamps: a
# reused file rewritten at its old size then needs no inode write (fsync where
# the platform lacks fdatasync).
_datasync = getattr(os, "fdatasync", os.fsync)
# link(2) errors that mean "no hard links here" (not "the name is taken").
_NO_LINK_ERRNOS = {errno.EPERM, errno.EMLINK, errno.EXDEV, errno.ENOSYS,
                   getattr(errno, "EOPNOTSUPP", errno.EPERM),
                   getattr(errno, "ENOTSUP", errno.EPERM)}
# Without flock a temporary file cannot say it is still being written; one this
# old is taken to be left over from a crash.
STALE_TEMP_AGE = 24 * 3600.0


class QueueError(ValueError):
    """A queue operation that cannot be done; str() is one line for people."""


class NotQueued(QueueError):
    """No message with this queue ID is in the queue."""

    def __init__(self, queue_id: str) -> None:
        super().__init__(f"no message {queue_id} in the queue")
        self.queue_id = queue_id


class CorruptEnvelope(QueueError):
    """An envelope file that cannot be read back."""


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
        self._thread_lock = threading.RLock()
        self._depth = 0  # nesting of locked() in the thread that holds _thread_lock
        self._reported: set[tuple[str, int, int]] = set()  # corrupt files already logged
        self.spares = Spares(self.dir / SPARE)
        self._folders_made = False  # see _make_folders
        if create:
            for folder in (self.messages, self.envelopes, self.spares.folder):
                folder.mkdir(mode=0o700, parents=True, exist_ok=True)

    # -- paths and locking -----------------------------------------------------

    def message_path(self, queue_id: str) -> Path:
        return self.messages / check_queue_id(queue_id)

    def envelope_path(self, queue_id: str) -> Path:
        return self.envelopes / (check_queue_id(queue_id) + ENVELOPE_SUFFIX)

    def _make_folders(self, *, again: bool = False) -> None:
        """Make the message and envelope folders once per store, or `again` (a folder
        was found missing): checking on every add cost two failing mkdir(2) calls
        per batch, and every system call in a queue thread is a hand-off of the
        interpreter lock."""
        if again or not self._folders_made:
            for folder in (self.messages, self.envelopes):
                folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._folders_made = True

    def _temp_file(self, folder: Path) -> Taken:
        """A temporary file in `folder`, open for writing: a spare when there is one.

        Write it from the start, then call `trim` with the octets written.
        """
        taken = self.spares.take(folder, TEMP_SUFFIX)
        if taken is not None:
            return taken
        try:
            fd, path = tempfile.mkstemp(dir=folder, prefix=".", suffix=TEMP_SUFFIX)
        except FileNotFoundError:  # the folder was removed under us: make it again
            self._make_folders(again=True)
            fd, path = tempfile.mkstemp(dir=folder, prefix=".", suffix=TEMP_SUFFIX)
        return Taken(fd, path, 0)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the queue's lock: other threads of this process and other processes wait.

        Re-entrant within one thread; the flock is taken once, by the
        outermost call (a second open file would block on the first).
        """
        with self._thread_lock:
            if self._depth or fcntl is None or not self.dir.is_dir():
                self._depth += 1
                try:
                    yield
                finally:
                    self._depth -= 1
                return
            fd = os.open(self.dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                self._depth += 1
                try:
                    yield
                finally:
                    self._depth -= 1
            finally:
                os.close(fd)  # releases the flock

    # -- adding ----------------------------------------------------------------

    def add(self, envelope: Envelope, chunks: Iterable[bytes]) -> None:
        """Queue a message durably; when this returns, a crash cannot lose it.

        The chunks are written to a temporary file outside the lock (it may be
        large or arrive slowly); the rename into place and the envelope write
        happen under the lock, so `recover` never sees the message without
        its envelope. Sets `envelope.size` to the number of octets written.
        Raises FileExistsError if the queue ID is taken (IDs are unique, so
        that is a bug elsewhere, never a silent overwrite).
        """
        queue_id = check_queue_id(envelope.queue_id)
        # Made on every call, unlike add_many's: this path is not the server's,
        # and the envelope is written by atomic_write, which would not recover.
        self._make_folders(again=True)
        temp = self._temp_file(self.messages)
        tmp_name = temp.path
        final = self.message_path(queue_id)
        placed = False
        try:
            with os.fdopen(temp.fd, "wb") as f:
                if fcntl is not None:
                    # Tells `recover` in another process that this file is being written.
                    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                size = 0
                for chunk in chunks:
                    f.write(chunk)
                    size += len(chunk)
                f.flush()
                temp.trim(size)
                _datasync(f.fileno())
                envelope.size = size
                with self.locked():
                    if final.exists() or self.envelope_path(queue_id).exists():
                        raise FileExistsError(f"queue ID {queue_id} is already in use")
                    os.replace(tmp_name, final)
                    placed = True
                    fsync_dir(self.messages)
                    atomic_write(self.envelope_path(queue_id), envelope.to_json())
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)
            if placed and not self.envelope_path(queue_id).exists():
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(final)
            raise

    def add_many(
        self, items: list[tuple[Envelope, Iterable[bytes]]]
    ) -> list[BaseException | None]:
        """`add` for several messages with one round of syncs (group commit).

        Every file is written first, then all are fsynced (on a journaling
        filesystem the first sync commits the others' writes too), then the
        messages are renamed into place and their folder fsynced, and only then
        the envelopes, so that no envelope can be on disk without its message.
        Returns, per item, None when it is queued or the exception that
        stopped it (the others are not affected).
        """
        self._make_folders()
        errors: list[BaseException | None] = [None] * len(items)
        temps: list[tuple[str, str] | None] = [None] * len(items)
        files: list[tuple[int, int]] = []
        for i, (envelope, chunks) in enumerate(items):
            try:
                check_queue_id(envelope.queue_id)
                message = self._temp_file(self.messages)
                mfd, mtmp = message.fd, message.path
                efd, etmp = -1, ""
                try:
                    if fcntl is not None:
                        fcntl.flock(mfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    size = 0
                    for chunk in chunks:
                        _write_all(mfd, chunk)
                        size += len(chunk)
                    message.trim(size)
                    envelope.size = size
                    record = self._temp_file(self.envelopes)
                    efd, etmp = record.fd, record.path
                    if fcntl is not None:  # as for the message: `recover` leaves it be
                        fcntl.flock(efd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    data = envelope.to_json()
                    _write_all(efd, data)
                    record.trim(len(data))
                except BaseException:
                    os.close(mfd)
                    _unlink(Path(mtmp))
                    if efd >= 0:
                        os.close(efd)
                        _unlink(Path(etmp))
                    raise
                temps[i] = (mtmp, etmp)
                files.append((mfd, efd))
            except Exception as e:  # noqa: BLE001 - reported per item
                errors[i] = e
        try:
            try:
                for mfd, efd in files:
                    _datasync(mfd)
                    _datasync(efd)
            except OSError as e:
                for i, t in enumerate(temps):
                    if t is not None and errors[i] is None:
                        errors[i] = e
            # No queue lock: the files stay open, and flocked, until the envelopes
            # are in place, which is all `recover` needs to leave them be; nothing
            # else touches a message that has no envelope yet. Server processes
            # queue from several threads and processes at once, and each holder of
            # the lock would make the others wait through its directory syncs.
            placed: list[int] = []
            for i, t in enumerate(temps):
                if t is None or errors[i] is not None:
                    continue
                try:
                    self._place_new(t[0], items[i][0].queue_id)
                except OSError as e:
                    errors[i] = e
                    continue
                placed.append(i)
            fsync_dir(self.messages)
            for i in placed:
                t = temps[i]
                assert t is not None
                try:
                    os.replace(t[1], self.envelope_path(items[i][0].queue_id))
                except OSError as e:
                    errors[i] = e
                    _unlink(self.message_path(items[i][0].queue_id))
            fsync_dir(self.envelopes)
        finally:
            for mfd, efd in files:
                os.close(mfd)
                os.close(efd)
        for i, t in enumerate(temps):
            if t is not None and errors[i] is not None:
                for name in t:
                    if name:
                        _unlink(Path(name))
        return errors

    def _place_new(self, temp: str, queue_id: str) -> None:
        """Give the temporary message file `temp` its queue name, never over another.

        link(2) fails when the name exists, atomically: without the queue lock,
        two adds of one ID (two processes whose IDs collided) cannot both win,
        as a check followed by a rename could. Where hard links are missing,
        the check and the rename happen under the queue lock instead.
        """
        final = self.message_path(queue_id)
        if self.envelope_path(queue_id).exists():
            raise FileExistsError(f"queue ID {queue_id} is already in use")
        try:
            os.link(temp, final)
        except FileExistsError:
            raise FileExistsError(f"queue ID {queue_id} is already in use") from None
        except OSError as e:
            if e.errno not in _NO_LINK_ERRNOS:
                raise
            with self.locked():
                if final.exists():
                    raise FileExistsError(f"queue ID {queue_id} is already in use") from None
                os.replace(temp, final)
            return
        _unlink(Path(temp))

    # -- reading ---------------------------------------------------------------

    def load(self, queue_id: str) -> Envelope:
        """The envelope of `queue_id`; NotQueued if absent, CorruptEnvelope if unreadable."""
        path = self.envelope_path(queue_id)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise NotQueued(queue_id) from None
        return self._parse(path, data)

    def _parse(self, path: Path, data: bytes) -> Envelope:
        try:
            envelope = Envelope.from_json(data)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CorruptEnvelope(f"{path}: unreadable envelope: {e}") from None
        if envelope.queue_id + ENVELOPE_SUFFIX != path.name:
            raise CorruptEnvelope(f"{path}: holds the envelope of {envelope.queue_id!r}")
        return envelope

    def ids(self) -> list[str]:
        """The queue IDs that have an envelope, sorted."""
        try:
            names = os.listdir(self.envelopes)
        except FileNotFoundError:
            return []
        return sorted(
            name[: -len(ENVELOPE_SUFFIX)]
            for name in names
            if name.endswith(ENVELOPE_SUFFIX) and _ID.fullmatch(name[: -len(ENVELOPE_SUFFIX)])
        )

    def list(self) -> list[Envelope]:
        """Every readable envelope, oldest first.

        A corrupt file is skipped and logged (once per version of the file),
        never raised: one bad file must not stop the delivery of the rest.
        """
        result = []
        for queue_id in self.ids():
            path = self.envelope_path(queue_id)
            try:
                result.append(self._parse(path, path.read_bytes()))
            except FileNotFoundError:
                continue  # removed while we listed
            except (CorruptEnvelope, OSError) as e:
                self._report(path, str(e))
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

    def save(self, envelope: Envelope) -> None:
        """Rewrite the envelope atomically (last writer wins).

        Raises NotQueued when the message is gone (deleted meanwhile): an
        envelope is never written without its message.
        """
        with self.locked():
            if not self.message_path(envelope.queue_id).exists():
                raise NotQueued(envelope.queue_id)
            atomic_write(self.envelope_path(envelope.queue_id), envelope.to_json())

    def update(self, queue_id: str, change: Callable[[Envelope], object]) -> Envelope:
        """Read, change (in place) and rewrite one envelope under the lock; returns it.

        The way to change part of an envelope another process may also change.
        NotQueued when the message is not (or no longer) in the queue.
        """
        with self.locked():
            envelope = self.load(queue_id)
            if not self.message_path(queue_id).exists():
                raise NotQueued(queue_id)
            change(envelope)
            atomic_write(self.envelope_path(queue_id), envelope.to_json())
            return envelope

    def remove(self, queue_id: str) -> None:
        """Delete a message: the envelope first (the commit), then the bytes.

        NotQueued when neither file exists.
        """
        error = self.remove_many([queue_id])[0]
        if error is not None:
            raise error

    def remove_many(
        self, queue_ids: builtins.list[str], *, reuse: bool = False
    ) -> builtins.list[BaseException | None]:
        """`remove` for several messages with one sync of the envelope folder.

        Per ID: None once it is gone, NotQueued when neither file existed, or the
        OSError that stopped it (its message file is then kept).

        `reuse`: keep the blanked files for later adds (postroom.queue.spares)
        instead of unlinking them. Only for a caller that knows nobody reads
        the message any more, as the scheduler does of a message whose
        deliveries it has just finished: an unlinked file stays whole for
        whoever still has it open, a reused one is blanked and refilled.
        """
        drop = self.spares.retire if reuse else Path.unlink
        errors: builtins.list[BaseException | None] = [None] * len(queue_ids)
        with self.locked():
            removed_envelopes = False
            for i, queue_id in enumerate(queue_ids):
                try:
                    drop(self.envelope_path(queue_id))
                    removed_envelopes = True
                except FileNotFoundError:
                    errors[i] = NotQueued(queue_id)
                except OSError as e:
                    errors[i] = e
            if removed_envelopes:
                # The envelopes' removal is the commit point. The message files need
                # no sync: if a crash brings one back without its envelope,
                # `recover` removes it as an orphan.
                try:
                    fsync_dir(self.envelopes)
                except OSError as e:
                    errors = [e if err is None else err for err in errors]
            for i, queue_id in enumerate(queue_ids):
                if errors[i] is not None and not isinstance(errors[i], NotQueued):
                    continue
                try:
                    drop(self.message_path(queue_id))
                    errors[i] = None  # a message without its envelope: gone now too
                except FileNotFoundError:
                    pass
                except OSError as e:
                    if errors[i] is None:
                        errors[i] = e
        return errors

    def recover(self) -> int:
        """Clean up after a crash; returns the number of files removed.

        Removes messages without an envelope (an `add` or `remove` that was cut
        short), temporary files nobody is writing any more, and envelopes whose
        message is missing (nothing left to deliver; logged as errors).
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
                if name.endswith(TEMP_SUFFIX):
                    if self._temp_is_stale(path) and _unlink(path):
                        removed += 1
                elif name + ENVELOPE_SUFFIX not in envelope_names and self._orphan(path):
                    log.warning("%s: removed a message without envelope (crash)", name)
                    removed += 1
            for name in sorted(envelope_names):
                path = self.envelopes / name
                if name.endswith(TEMP_SUFFIX):
                    # `add_many` writes envelope temp files before taking this lock,
                    # holding an flock on each while it does.
                    if self._temp_is_stale(path):
                        removed += _unlink(path)
                elif name.endswith(ENVELOPE_SUFFIX):
                    queue_id = name[: -len(ENVELOPE_SUFFIX)]
                    if queue_id not in message_names and _unlink(path):
                        log.error("%s: removed an envelope whose message is missing", queue_id)
                        removed += 1
            if removed:
                fsync_dir(self.messages)
                fsync_dir(self.envelopes)
        return removed

    def _orphan(self, path: Path) -> bool:
        """Remove a message listed without an envelope if it is one; True if removed.

        `add_many` renames a message into place before its envelope, without
        the queue lock, holding an flock on the file until the envelope is in
        place: a message flocked by someone else is being added. Once the flock
        is ours, the envelope is looked for again, as the listing may be older
        than an add that finished meanwhile.
        """
        if fcntl is None:
            return _unlink(path)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # being added
            if (self.envelopes / (path.name + ENVELOPE_SUFFIX)).exists():
                return False
            return _unlink(path)
        finally:
            os.close(fd)

    @staticmethod
    def _temp_is_stale(path: Path) -> bool:
        """True unless another process is still writing this temporary message file."""
        if fcntl is None:
            try:
                return time.time() - path.stat().st_mtime > STALE_TEMP_AGE
            except FileNotFoundError:
                return False
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # `add` holds it: still being written
        finally:
            os.close(fd)
        return True


def _write_all(fd: int, data: bytes) -> None:
    """os.write until every octet of `data` is written (a write may take fewer)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _unlink(path: Path) -> bool:
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True
