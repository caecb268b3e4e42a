"""Pre-forked server processes sharing the listening sockets, so postroom uses every core.

One Python process runs on one core at a time. `postroom serve` binds the
listeners first, then forks `workers - 1` children; the kernel hands each new
connection to whichever process accepts it. The parent is the primary: it
alone runs the relay queue's scheduler (children queue mail and send the
queue ID over a datagram socket pair made before the fork), answers on the
control socket, and forwards SIGTERM/SIGINT to the children before draining
itself. The children inherit the data folder's lock and leave it to the
primary (control.ServerLock). A child asks the kernel to kill it when the
parent dies (PR_SET_PDEATHSIG), so `kill -9` of the server leaves no orphan
holding the ports or the lock. What processes share is safe across them:
Maildir delivery by link(2), the queue under its file lock, POP3 maildrops
under flock(2), the user directory in SQLite.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Iterable

from postroom.control import wake_parent
from postroom.server import metrics

log = logging.getLogger("postroom.master")

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def worker_count(configured: int) -> int:
    """`workers = 0` means one process per CPU this process may run on."""
    if configured > 0:
        return configured
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _die_with_parent(parent: int) -> None:
    """Linux: SIGKILL this process when its parent (pid `parent`) exits, however it exits.

    A parent that died between the fork and the prctl(2) sends no signal, so
    the child looks for itself: adopted by another process already, it leaves
    (the remedy prctl(2) gives for that race), rather than go on holding the
    listening sockets with nobody to stop it.
    """
    if not sys.platform.startswith("linux"):  # pragma: no cover
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


def fork_workers(
    count: int,
    sockets: list[tuple[str, socket.socket]],
    child_main: Callable[[], int],
) -> list[int]:
    """Fork `count` children that each run `child_main()` and exit with its code.

    Call before any event loop or thread exists in this process.
    """
    children: list[int] = []
    parent = os.getpid()
    for _ in range(count):
        pid = os.fork()
        if pid == 0:  # the child
            code = 1
            try:
                _die_with_parent(parent)
                code = child_main()
            except BaseException:  # noqa: BLE001 - report, then leave without unwinding
                log.exception("worker process failed")
            finally:
                logging.shutdown()
                os._exit(code)
        children.append(pid)
    if children:
        log.info("started %d worker process(es): %s", len(children),
                 ", ".join(str(p) for p in children))
    return children


def signal_children(children: Iterable[int], sig: int) -> None:
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def reap_children(children: Iterable[int]) -> None:
    """Wait for every child to exit (they drain on SIGTERM first)."""
    for pid in children:
        with contextlib.suppress(ChildProcessError):
            _pid, status = os.waitpid(pid, 0)
            metrics.worker_gone(pid)
            if os.WIFSIGNALED(status) and os.WTERMSIG(status) != signal.SIGTERM:
                log.warning("worker %d ended by signal %d", pid, os.WTERMSIG(status))


class WakeChannel:
    """Workers tell the primary "queue ID X is new" over a Unix datagram socket pair.

    Made in the primary before the fork, so every process holds both ends. A full
    socket buffer (the primary busy for long) falls back to SIGUSR1 to the primary
    (control.wake_parent), which makes it rescan the whole queue folder: slower,
    but nothing is missed.
    """

    def __init__(self) -> None:
        self.primary = os.getpid()
        self.primary_end, self.worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.primary_end.setblocking(False)
        self.worker_end.setblocking(False)

    def send(self, queue_id: str) -> None:
        """From a worker: wake the primary's scheduler for this message."""
        try:
            self.worker_end.send(queue_id.encode("ascii"))
        except OSError:
            wake_parent(self.primary)

    def listen(self, add_reader: Callable[..., object], wake: Callable[[str], None]) -> None:
        """In the primary: call `wake(queue_id)` for every ID a worker sends."""

        def drain() -> None:
            while True:
                try:
                    data = self.primary_end.recv(256)
                except BlockingIOError:
                    return
                with contextlib.suppress(UnicodeDecodeError):
                    wake(data.decode("ascii"))

        add_reader(self.primary_end.fileno(), drain)
