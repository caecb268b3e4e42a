"""Password checks for the whole server: a few argon2 hashes at a time, across every process.

Every PASS and AUTH costs one argon2id hash of 64 MiB (argon2-cffi's default,
RFC 9106 4's second recommended option), also for a user that does not exist,
whose password is checked against a dummy hash so that the answer takes as
long (no user enumeration by timing). Unbounded, each client sending a
password holds that much memory until its hash is done, in every server
process; the failure delay (policy.auth) comes after the hash and limits none
of it. So, as Dovecot runs its checks in one auth process apart from the
login processes:

- at most MAX_PASSWORD_CHECKS hashes run at once in all processes together: a
  semaphore made before the workers fork is shared by all of them;
- each process runs its checks in a pool of that many threads of its own, so a
  check waiting for its turn holds no thread of the default pool (which files
  mail) and a client that leaves before its turn costs nothing;
- when a process has no check left running, it asks the C library to hand the
  memory the hashes freed back to the system (glibc's malloc_trim(3); hashes
  smaller than its mmap threshold would otherwise stay in the thread's arena).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from postroom.server.heap import release as give_memory_back

# Password hashes running at once in the whole server, whatever the number of CPUs
# or worker processes: with argon2-cffi's 64 MiB per hash, 128 MiB at most.
MAX_PASSWORD_CHECKS = 2

Verify = Callable[[str, str], bool]


def _make_slots(limit: int) -> Any:
    """A semaphore that works across fork(2), or a thread one where there is none."""
    try:
        return multiprocessing.get_context("fork").BoundedSemaphore(limit)
    except (ValueError, OSError, ImportError):  # no fork, or no POSIX semaphores (/dev/shm)
        return threading.BoundedSemaphore(limit)


class PasswordChecks:
    """Runs `verify(address, password)` calls, MAX_PASSWORD_CHECKS at a time server-wide.

    Make it before the worker processes fork; each process then starts its own
    threads when it first checks a password.
    """

    def __init__(self, limit: int = MAX_PASSWORD_CHECKS) -> None:
        self.limit = limit
        self._slots = _make_slots(limit)
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid = 0
        self._lock = threading.Lock()
        self._running = 0  # checks of this process waiting or under way
        # A worker forked later from the running primary (server.supervisor) copies
        # the lock as it is, perhaps held by one of the primary's threads: it starts
        # with its own.
        os.register_at_fork(after_in_child=self._forked)

    def _forked(self) -> None:
        self._lock = threading.Lock()
        self._running = 0
        self._pool = None

    async def check(self, verify: Verify, address: str, password: str) -> bool:
        """`verify(address, password)`, in its turn (a store.api.PasswordGate)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor(), self._run, verify, address,
                                          password)

    def close(self) -> None:
        """Stop this process's threads; checks not started are dropped."""
        if self._pool is not None and self._pool_pid == os.getpid():
            self._pool.shutdown(wait=False, cancel_futures=True)
        self._pool = None

    def _executor(self) -> ThreadPoolExecutor:
        pid = os.getpid()
        if self._pool is None or self._pool_pid != pid:  # a forked worker makes its own
            self._pool = ThreadPoolExecutor(self.limit, thread_name_prefix="postroom-auth")
            self._pool_pid = pid
        return self._pool

    def _run(self, verify: Verify, address: str, password: str) -> bool:
        with self._lock:
            self._running += 1
        try:
            with self._slots:
                return verify(address, password)
        finally:
            with self._lock:
                self._running -= 1
                idle = self._running == 0
            if idle:
                give_memory_back()
