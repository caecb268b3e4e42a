"""Password checks: at most MAX_PASSWORD_CHECKS at once in all server processes together."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from postroom.server.passwords import MAX_PASSWORD_CHECKS, PasswordChecks

PROCESSES = 3
CHECKS_PER_PROCESS = 3
FORK = multiprocessing.get_context("fork")


def wait_until(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_the_bound_holds_across_forked_processes() -> None:
    """Nine checks in three processes: two run, the rest wait for a slot. Each
    check stays until the test lets one go, so the test sees exactly how many
    run at once at every step."""
    checks = PasswordChecks()  # made before the fork, as `postroom serve` does
    active = FORK.Value("i", 0)
    peak = FORK.Value("i", 0)
    started = FORK.Value("i", 0)
    go = FORK.Semaphore(0)

    def verify(address: str, password: str) -> bool:
        with active.get_lock():
            active.value += 1
            started.value += 1
            peak.value = max(peak.value, active.value)
        go.acquire()
        with active.get_lock():
            active.value -= 1
        return password == "right"

    def worker(results: Any) -> None:
        async def run() -> list[bool]:
            return list(await asyncio.gather(*(
                checks.check(verify, "boss@corp.example", "right" if n % 2 else "wrong")
                for n in range(CHECKS_PER_PROCESS))))

        results.put(asyncio.run(run()))

    results: Any = FORK.Queue()
    children = [FORK.Process(target=worker, args=(results,)) for _ in range(PROCESSES)]
    for child in children:
        child.start()
    try:
        total = PROCESSES * CHECKS_PER_PROCESS
        for released in range(total):
            running = min(MAX_PASSWORD_CHECKS, total - released)
            wait_until(lambda r=running, n=released: (active.value, started.value)  # type: ignore[misc]
                       == (r, n + r))
            go.release()
        answers = sorted(sum((results.get(timeout=20) for _ in children), []))
    finally:
        for child in children:
            child.join(timeout=20)
            if child.is_alive():
                child.kill()
    assert peak.value == MAX_PASSWORD_CHECKS
    assert answers == sorted([False, True, False] * PROCESSES)
    assert all(child.exitcode == 0 for child in children)


def test_a_check_that_waits_holds_no_thread_of_the_default_pool() -> None:
    checks = PasswordChecks(limit=1)
    release = threading.Event()

    def slow(address: str, password: str) -> bool:
        release.wait(20)
        return True

    async def scenario() -> None:
        first = asyncio.ensure_future(checks.check(slow, "a@x", "p"))
        waiting = [asyncio.ensure_future(checks.check(slow, "b@x", "p")) for _ in range(40)]
        # The default pool still runs other work while 41 checks are pending.
        assert await asyncio.wait_for(asyncio.to_thread(os.getpid), 10) == os.getpid()
        release.set()
        assert await first and all(await asyncio.gather(*waiting))

    try:
        asyncio.run(scenario())
    finally:
        checks.close()


def test_an_error_in_a_check_frees_its_slot() -> None:
    checks = PasswordChecks(limit=1)

    def broken(address: str, password: str) -> bool:
        raise RuntimeError("directory unreadable")

    async def scenario() -> None:
        with pytest.raises(RuntimeError):
            await checks.check(broken, "a@x", "p")
        assert await checks.check(lambda a, p: True, "a@x", "p")

    try:
        asyncio.run(scenario())
    finally:
        checks.close()
