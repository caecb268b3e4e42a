"""The primary's watch over its workers: one that dies is started again, a reload replaces them.

The workers are forked once at start (server.workers). After that the
primary runs an event loop, and a worker it forks later (to replace one that
died, or on reload) starts as a copy of that running process: its loop, its
client connections, its threads' state. `fork_from_loop` makes such a copy
safe to run: the copy takes every socket it was not given back from the
primary's objects (each becomes /dev/null, so the primary's connections are
not held open by the copy, and the numbers are not reused under objects that
still name them), never runs or collects the primary's objects, and starts a
new event loop of its own.

A worker that ends without being asked is logged and started again at once;
when it is again one that died within STABLE_SECONDS of its start, that is a
crash loop, and each further start waits twice as long as the one before, up to
MAX_RESTART_DELAY (as Postfix's master throttles a service whose processes
keep failing, service_throttle_time = 60s). On reload the new workers start
first; the old ones are then told to retire (RETIRE_SIGNAL): they stop
accepting, let every session end as it would, and exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import stat
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from postroom.server import metrics
from postroom.server.workers import _die_with_parent

log = logging.getLogger("postroom.master")

# A worker alive this long was no crash loop: the next restart is immediate.
STABLE_SECONDS = 10.0
FIRST_RESTART_DELAY = 1.0  # after a first quick death
MAX_RESTART_DELAY = 60.0  # as Postfix's service_throttle_time
# A retiring worker says it has stopped accepting with this word and its pid (over the
# wake channel, server.workers); a reload answers once all have, or after RETIRE_ACK_SECONDS.
RETIRED = "retired"
RETIRE_ACK_SECONDS = 10.0
# Without pidfds (Linux before 5.3): how often the primary looks for ended workers.
POLL_SECONDS = 1.0
# The primary asks a worker to stop accepting and exit once its sessions have ended.
RETIRE_SIGNAL = signal.SIGUSR2

# What a forked worker runs (server.main makes one per configuration); its exit status.
ChildMain = Callable[[], int]


@dataclass
class Worker:
    pid: int
    started: float  # time.monotonic()


def _release_inherited(keep: set[int]) -> None:
    """In a copy of a running process: every socket above 2 not in `keep` now names
    /dev/null. The primary's connections lose this holder (a client's connection closes
    when the primary closes it); the number stays taken, so an object of the primary that
    still names it, if it ever closes it, closes /dev/null and nothing of ours. Files stay
    open as they are: SQLite keeps what it knows of an open database file per process,
    with its descriptors, and a connection the copy opens to the same file goes through
    that record, as in the workers forked at start."""
    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    try:
        for name in os.listdir("/proc/self/fd"):
            fd = int(name)
            if fd <= 2 or fd == null or fd in keep:
                continue
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(os.fstat(fd).st_mode):
                    os.dup2(null, fd, inheritable=False)
    finally:
        os.close(null)


def fork_from_loop(keep: Iterable[int], child_main: ChildMain, blocked: Iterable[int],
                   flush: Callable[[], None]) -> int:
    """Fork a worker from the primary while its event loop runs; the parent gets its pid.

    `keep`: the descriptors the worker uses (listening sockets, its end of the wake
    channel, the data folder's lock). `blocked`: signals held back until the worker's
    own loop handles them. `flush`: writes out buffered log lines first, or the copy
    would write them again.
    """
    parent = os.getpid()
    flush()
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
    pid = os.fork()
    if pid != 0:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        return pid
    code = 1
    try:
        _die_with_parent(parent)
        # The primary's objects are never collected here: collecting them would close
        # what they hold. The frames below this one (the primary's loop) never resume.
        gc.freeze()
        _release_inherited(set(keep))
        asyncio.events._set_running_loop(None)
        signal.set_wakeup_fd(-1)  # the primary loop's, now /dev/null; the new loop sets its own
        code = child_main()
    except BaseException:  # noqa: BLE001 - report, then leave without unwinding
        log.exception("worker process failed")
    finally:
        logging.shutdown()
        os._exit(code)
    raise AssertionError("unreachable")  # pragma: no cover


def describe(status: int) -> str:
    """A wait status as words: "exited with status 1", "ended by signal 9 (SIGKILL)"."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        with contextlib.suppress(ValueError):
            return f"ended by signal {sig} ({signal.Signals(sig).name})"
        return f"ended by signal {sig}"
    return f"exited with status {os.waitstatus_to_exitcode(status)}"


class Supervisor:
    """The primary's workers: restarted when they die (with backoff), replaced on reload,
    stopped with the primary. `spawn()` forks one worker of the current generation."""

    def __init__(self, children: Iterable[int], spawn: Callable[[], int]) -> None:
        now = time.monotonic()
        self.workers: dict[int, Worker] = {pid: Worker(pid, now) for pid in children}
        self.retiring: set[int] = set()
        self._accepting_old: set[int] = set()  # retiring, not yet known to have stopped accepting
        self._old_closed = asyncio.Event()
        self._spawn = spawn
        self._delay = 0.0  # before the next restart; grows in a crash loop
        self._quick_deaths = 0  # in a row, each within STABLE_SECONDS of its start
        self._pending: set[asyncio.TimerHandle] = set()
        self._stopping = False
        self._all_gone = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._pidfds: dict[int, int] = {}
        self._poller: asyncio.Task[None] | None = None
        self.restarts = 0  # workers started again after dying, for the log and tests

    def install(self) -> None:
        """Watch every worker for its end: a pidfd per process, readable once it has exited
        (pidfd_open(2); uvloop keeps SIGCHLD to itself), else a look every POLL_SECONDS."""
        for pid in self.pids:
            self._watch(pid)

    def _watch(self, pid: int) -> None:
        try:
            fd = os.pidfd_open(pid)
        except (AttributeError, OSError):
            if self._poller is None:
                self._poller = self._loop.create_task(self._poll())
            return
        self._pidfds[pid] = fd
        self._loop.add_reader(fd, self._exited, pid)

    def _exited(self, pid: int) -> None:
        fd = self._pidfds.pop(pid, -1)
        if fd >= 0:
            self._loop.remove_reader(fd)
            os.close(fd)
        self.reap()

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(POLL_SECONDS)
            self.reap()

    def set_spawn(self, spawn: Callable[[], int]) -> None:
        """Workers started from now on run this (a reload's new config)."""
        self._spawn = spawn

    @property
    def pids(self) -> list[int]:
        return [*self.workers, *self.retiring]

    def reap(self) -> None:
        """Take the status of every worker that has ended."""
        for pid in self.pids:
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, status = pid, 0
            if done == pid:
                fd = self._pidfds.pop(pid, -1)
                if fd >= 0:
                    self._loop.remove_reader(fd)
                    os.close(fd)
                self._ended(pid, status)
        if self._stopping and not self.workers and not self.retiring:
            self._all_gone.set()

    def _ended(self, pid: int, status: int) -> None:
        metrics.worker_gone(pid)  # its sessions gauge no longer counts
        if pid in self.retiring:
            self.retiring.discard(pid)
            self.stopped_accepting(pid)
            log.info("worker %d of the previous configuration %s", pid, describe(status))
            return
        worker = self.workers.pop(pid, None)
        if worker is None:
            return
        if self._stopping:
            if os.WIFSIGNALED(status) and os.WTERMSIG(status) != signal.SIGTERM:
                log.warning("worker %d %s", pid, describe(status))
            return
        lived = time.monotonic() - worker.started
        self._quick_deaths = self._quick_deaths + 1 if lived < STABLE_SECONDS else 0
        # The first death is started again at once; each further quick one waits longer.
        self._delay = (0.0 if self._quick_deaths <= 1 else
                       min(FIRST_RESTART_DELAY * 2 ** (self._quick_deaths - 2),
                           MAX_RESTART_DELAY))
        when = f"in {self._delay:g}s (it ran {lived:.1f}s: crash loop)" if self._delay else "now"
        log.warning("worker %d %s; starting another %s", pid, describe(status), when)
        self._schedule(self._delay)

    def _schedule(self, delay: float) -> None:
        handle: asyncio.TimerHandle

        def fire() -> None:
            self._pending.discard(handle)
            self._restart()

        handle = self._loop.call_later(delay, fire)
        self._pending.add(handle)

    def _restart(self) -> None:
        if self._stopping:
            return
        pid = self._start_one()
        if pid:
            self.restarts += 1
            log.info("started worker %d in place of the one that ended", pid)

    def _start_one(self) -> int:
        try:
            pid = self._spawn()
        except OSError as exc:
            log.error("cannot start a worker process: %s; trying again in %gs", exc,
                      MAX_RESTART_DELAY)
            self._schedule(MAX_RESTART_DELAY)
            return 0
        self.workers[pid] = Worker(pid, time.monotonic())
        self._watch(pid)
        return pid

    def stopped_accepting(self, pid: int) -> None:
        """A retiring worker closed its listeners (its RETIRED message)."""
        self._accepting_old.discard(pid)
        if not self._accepting_old:
            self._old_closed.set()

    async def replace(self, count: int) -> list[int]:
        """Reload: start `count` workers of the new generation, then retire the old ones;
        return once none of the old accepts any more (or after RETIRE_ACK_SECONDS), so
        that every connection from then on gets the new config."""
        old = list(self.workers)
        new = [pid for pid in (self._start_one() for _ in range(count)) if pid]
        self._old_closed.clear()
        self._accepting_old = set(old)
        for pid in old:
            self.workers.pop(pid, None)
            self.retiring.add(pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, RETIRE_SIGNAL)
        if new or old:
            log.info("reload: started worker(s) %s; the previous %s finish their sessions",
                     ", ".join(map(str, new)) or "none", ", ".join(map(str, old)) or "none")
        if old:
            try:
                await asyncio.wait_for(self._old_closed.wait(), RETIRE_ACK_SECONDS)
            except TimeoutError:
                log.warning("reload: worker(s) %s did not say they stopped accepting",
                            ", ".join(map(str, sorted(self._accepting_old))))
        return new

    async def stop(self, sig: int = signal.SIGTERM) -> None:
        """Send `sig` to every worker (old generations too) and wait until all have ended."""
        self._stopping = True
        for handle in self._pending:
            handle.cancel()
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        self.reap()
        if self.workers or self.retiring:
            await self._all_gone.wait()
        if self._poller is not None:
            self._poller.cancel()
