"""Process control: one `postroom serve` per data folder, and how other processes reach it.

The lock. The running server holds an exclusive flock(2) on DATA/postroom.pid,
which holds its process ID, for its whole life: from before it binds its
listeners and loads the queue until after the last delivery of its drain has
ended (as Postfix's master holds master.lock). A second `postroom serve` on
the same folder finds the lock taken and refuses to start, naming the pid.
The kernel drops the lock when the process dies, kill -9 included, so a pid
file left behind never blocks a restart. Forked worker processes inherit the
locked descriptor (one open file description, so one lock) and never unlock
it; only the process that took the lock removes the file, and only while it
still holds it.

The control socket. Other processes (`postroom queue`, `postroom sendmail`)
never signal a pid read from a file: after a crash that pid may belong to an
unrelated program. They connect to the server's Unix socket
DATA/postroom.ctl, as Postfix's `postqueue -f` writes to the queue manager's
public socket: only the server listening there hears them, and its answer
names its pid. A socket file left behind by a killed server refuses the
connection. The server binds it right after taking the lock and answers on
it through its drain ("stopping").

The request is one line, the answer one line (both ASCII, CRLF or LF):

    rescan  ->  "ok PID"        the server reads the queue folder again
            ->  "stopping PID"  it is draining: it starts no delivery
    wake ID ->  "ok PID"        the server reads that message's envelope again and
                                tries it now (queued, flushed, held, released, deleted)
    flush   ->  "ok PID"        every message is tried now (`postqueue -f`)
    reload  ->  "ok PID"        the new config is in force (server.reload)
            ->  "refused PID ERROR"  the one-line error; the old config stays
            ->  "stopping PID"
    other   ->  "error unknown request"

Worker processes tell their primary with SIGUSR1 (`wake_parent`), sent only
to the process that forked them while it is still their parent.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

PID_FILE = "postroom.pid"  # in the data folder: the running server's pid; flocked by it
CONTROL_SOCKET = "postroom.ctl"  # in the data folder: the running server's control socket
# How long a client waits for the server's answer: a server busy relaying answers
# between two event-loop callbacks, one starting up once its loop runs.
CONTROL_TIMEOUT = 10.0
# Octets: the longest request line the server reads ("wake " and a queue ID of
# at most 64 characters, postroom.queue.store).
MAX_REQUEST = 80
CONTROL_BACKLOG = 16  # clients waiting to be answered at once (listen(2))
# unix(7): sun_path holds 108 octets with the terminating NUL; a longer path is
# reached through the folder's descriptor in /proc/self/fd.
SUN_PATH_MAX = 107
RESCAN = b"rescan"
FLUSH = b"flush"
WAKE = b"wake "  # followed by a queue ID
RELOAD = b"reload"
MAX_ANSWER = 4096  # octets: the longest answer a client reads (a reload's refusal)


class AlreadyRunning(Exception):
    """Another `postroom serve` holds the data folder's lock."""

    def __init__(self, data_dir: Path, pid: int | None) -> None:
        self.pid = pid
        who = f"pid {pid}" if pid else "its pid not written yet"
        super().__init__(f"{data_dir}: postroom is already running ({who}); "
                         "stop it first, or give this one another --data folder")


class ControlError(Exception):
    """A server listens on the control socket, but its answer did not come."""


@dataclass(frozen=True)
class Answer:
    """What the server said to a request."""

    pid: int
    stopping: bool = False
    refused: str = ""  # a reload's one-line error


class ServerLock:
    """The data folder's lock, its pid file and its control socket, held by the running server.

    `acquire` takes all three or raises AlreadyRunning; `release` (in the
    process that acquired it, never in a forked worker) removes both files
    and drops the lock.
    """

    def __init__(self, data_dir: Path, fd: int, control: socket.socket) -> None:
        self.data_dir = data_dir
        self.pid = os.getpid()
        self.control = control  # listening, non-blocking; served by `serve_control`
        self._fd = fd
        self._files = {path: os.stat(path) for path in (data_dir / PID_FILE,
                                                        data_dir / CONTROL_SOCKET)}

    @classmethod
    def acquire(cls, data_dir: Path) -> ServerLock:
        import fcntl

        path = data_dir / PID_FILE
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = _read_pid(fd)
                os.close(fd)
                raise AlreadyRunning(data_dir, pid) from None
            except BaseException:
                os.close(fd)
                raise
            # The server that held the lock removes the file before it lets go: a
            # lock taken on a file no longer under that name locks nothing.
            try:
                if os.path.samestat(os.fstat(fd), os.stat(path)):
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
            control = _listen(data_dir / CONTROL_SOCKET)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(path)
            os.close(fd)
            raise
        return cls(data_dir, fd, control)

    def fileno(self) -> int:
        """The locked descriptor (a worker keeps it open: server.supervisor)."""
        return self._fd

    def in_worker(self) -> None:
        """In a forked worker: close its copy of the control socket (the primary answers).

        The locked descriptor stays open: it is the primary's lock, and it lasts
        until the last process of this server has exited.
        """
        self.control.close()

    def release(self) -> None:
        """Remove the control socket and the pid file, then drop the lock (the acquirer only)."""
        if os.getpid() != self.pid or self._fd < 0:
            return
        self.control.close()
        for path, made in self._files.items():
            with contextlib.suppress(OSError):
                if os.path.samestat(os.stat(path), made):
                    os.unlink(path)
        os.close(self._fd)
        self._fd = -1

    def __enter__(self) -> ServerLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode("ascii").strip()) or None
    except (OSError, ValueError, UnicodeDecodeError):
        return None  # locked, but the pid not written yet


@contextlib.contextmanager
def _address(path: Path) -> Iterator[str]:
    """A name for the socket at `path` that fits sun_path (see SUN_PATH_MAX)."""
    name = os.fspath(path)
    if len(os.fsencode(name)) <= SUN_PATH_MAX or not Path("/proc/self/fd").is_dir():
        yield name
        return
    folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{folder}/{path.name}"
    finally:
        os.close(folder)


def _listen(path: Path) -> socket.socket:
    """Bind the control socket (the lock is held: a file there is a dead server's)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old = os.umask(0o077)  # only the folder's owner may ask
        try:
            with _address(path) as address:
                sock.bind(address)
        finally:
            os.umask(old)
        sock.listen(CONTROL_BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


# -- the server's side -------------------------------------------------------------


async def serve_control(
    lock: ServerLock, rescan: Callable[[], None], stopping: Callable[[], bool],
    wake: Callable[[str | None], None] | None = None,
    reload: Callable[[], Awaitable[str | None]] | None = None,
) -> asyncio.AbstractServer:
    """Answer requests on the lock's control socket until the returned server is closed.

    `rescan` makes the server read its queue folder again; `wake(ID)` reads one
    message again and tries it now, `wake(None)` tries every message now (without
    `wake`, both rescan); `reload` reads the config again (None, or the error
    that refused it). While `stopping()` says so, requests are answered
    "stopping" and change nothing.
    """

    def act(request: bytes) -> None:
        """Do what a known request asks."""
        if request == RESCAN or wake is None:
            rescan()
        elif request == FLUSH:
            wake(None)
        else:  # the scheduler ignores an ID that names no queued message
            wake(request[len(WAKE):].decode("ascii", "replace"))

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One request, one answer, then the connection closes."""
        try:
            request = (await reader.readline()).strip()  # at EOF: what came before it
        except (ValueError, ConnectionError):  # a line longer than MAX_REQUEST, or gone
            request = b""
        pid = os.getpid()
        known = (request in (RESCAN, FLUSH) or (request == RELOAD and reload is not None)
                 or (request.startswith(WAKE) and len(request) > len(WAKE)))
        if not known:
            reply = "error unknown request"
        elif stopping():
            reply = f"stopping {pid}"
        elif request == RELOAD:
            assert reload is not None
            refused = await reload()
            one_line = " ".join((refused or "").split())[:MAX_ANSWER - 32]
            reply = f"refused {pid} {one_line}" if refused else f"ok {pid}"
        else:
            act(request)
            reply = f"ok {pid}"
        writer.write(reply.encode("utf-8", "replace") + b"\n")
        writer.close()

    # The loop calls listen(2) again, with its own default (100) unless told.
    return await asyncio.start_unix_server(answer, sock=lock.control, limit=MAX_REQUEST,
                                           backlog=CONTROL_BACKLOG)


# -- everyone else's side ----------------------------------------------------------


def tell_server(
    data_dir: str | os.PathLike[str], timeout: float = CONTROL_TIMEOUT,
    request: bytes = RESCAN,
) -> Answer | None:
    """Ask the server running on `data_dir` to read its queue folder again (or what
    `request` asks: `wake_request(ID)`, FLUSH, RELOAD).

    None when no server listens (none runs; a starting one reads the folder
    when it starts). ControlError when one listens but no proper answer comes
    within `timeout` seconds. Nothing is ever signalled.
    """
    if not hasattr(socket, "AF_UNIX"):  # pragma: no cover - not POSIX
        return None
    path = Path(data_dir) / CONTROL_SOCKET
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            with _address(path) as address:
                sock.connect(address)
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError):
            return None  # nothing listens there: a file left by a killed server at most
        except OSError as exc:
            raise ControlError(f"cannot reach the server at {path}: "
                               f"{exc.strerror or exc}") from exc
        try:
            sock.sendall(request + b"\n")
            answer = b""
            while b"\n" not in answer and len(answer) <= MAX_ANSWER:
                chunk = sock.recv(MAX_ANSWER)
                if not chunk:
                    break
                answer += chunk
        except TimeoutError as exc:
            raise ControlError(f"the server did not answer within {timeout:g}s") from exc
        except OSError as exc:
            raise ControlError(f"lost the server's answer: {exc.strerror or exc}") from exc
    word, _, rest = answer.decode("utf-8", "replace").strip().partition(" ")
    pid, _, text = rest.partition(" ")
    if word in ("ok", "stopping", "refused") and pid.isdigit():
        return Answer(int(pid), stopping=word == "stopping", refused=text if word == "refused"
                      else "")
    raise ControlError(f"the server answered {answer[:MAX_REQUEST]!r}")


def wake_parent(primary: int) -> None:
    """From a worker: make the primary (pid `primary`, which forked it) rescan its queue.

    Signalled only while it is this process's parent: once it has died the
    worker belongs to another process (and is being killed: PR_SET_PDEATHSIG).
    Where pidfds exist, the signal goes to the process checked, not to a pid.
    """
    try:
        handle = os.pidfd_open(primary)
    except (AttributeError, OSError):
        handle = -1
    try:
        if os.getppid() != primary:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if handle >= 0:
                signal.pidfd_send_signal(handle, signal.SIGUSR1)
            else:
                os.kill(primary, signal.SIGUSR1)
    finally:
        if handle >= 0:
            os.close(handle)


def wake_request(queue_id: str) -> bytes:
    """The request that makes the server read message `queue_id` again and try it now."""
    return WAKE + queue_id.encode("ascii")


def tell_server_in_words(data_dir: str | os.PathLike[str], request: bytes = RESCAN) -> str:
    """`tell_server`, and what came of it as words for a command's output."""
    try:
        answer = tell_server(data_dir, request=request)
    except ControlError as exc:
        return (f"could not tell the server ({exc}); it finds new messages within five "
                "minutes, and a message's changes when it next tries it")
    if answer is None:
        return "the server is not running"
    if answer.stopping:
        return f"the server (pid {answer.pid}) is stopping; it is tried when one starts"
    return f"told the server (pid {answer.pid})"
