"""A worker thread that runs jobs in batches and answers each on its own event loop.

The group commits (Maildir filing, adding to the queue, removing from it) share it:
callers await their job's result; one thread takes every job waiting when it wakes,
runs them with one round of syncs, and wakes each event loop once for the batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

J = TypeVar("J")  # what a job carries
R = TypeVar("R")  # what it yields


@dataclass
class _Pending(Generic[J, R]):
    job: J
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[R]


class BatchThread(Generic[J, R]):
    """`await submit(job)` -> the result `run_batch` gave for it (or its exception).

    `run_batch(jobs)` runs in the thread and returns, per job in order, a result
    or a BaseException to raise in the submitter.

    `linger`: once a job has woken the thread, it waits this many seconds for
    more before it runs the batch, so that one wake-up (a futex call and a
    hand-off of the interpreter lock) serves many jobs. Only for work whose
    submitters can wait (removing messages already delivered).
    """

    def __init__(self, name: str, run_batch: Callable[[list[J]], Sequence[R | BaseException]],
                 *, linger: float = 0.0):
        self._name = name
        self._linger = linger
        self._run_batch = run_batch
        self._pending: list[_Pending[J, R]] = []
        self._ready = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    async def submit(self, job: J) -> R:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        pending: _Pending[J, R] = _Pending(job, loop, future)
        with self._ready:
            if self._thread is None:  # started lazily: never before a fork
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            self._pending.append(pending)
            self._ready.notify()
        return await future

    def close(self) -> None:
        """Let the thread finish the batch in hand, then end."""
        with self._ready:
            self._stopping = True
            self._ready.notify()

    def _run(self) -> None:
        while True:
            with self._ready:
                while not self._pending and not self._stopping:
                    self._ready.wait()
                if self._linger and not self._stopping:
                    self._ready.release()  # submitters append meanwhile
                    try:
                        time.sleep(self._linger)
                    finally:
                        self._ready.acquire()
                batch, self._pending = self._pending, []
                if not batch and self._stopping:
                    return
            try:
                results = list(self._run_batch([p.job for p in batch]))
            except BaseException as exc:  # noqa: BLE001 - handed to every submitter
                results = [exc] * len(batch)
            by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Pending[J, R], object]]] = {}
            for pending, result in zip(batch, results, strict=True):
                by_loop.setdefault(pending.loop, []).append((pending, result))
            for loop, answers in by_loop.items():
                with contextlib.suppress(RuntimeError):  # that loop is closed
                    loop.call_soon_threadsafe(_settle, answers)


def _settle(answers: list[tuple[_Pending[Any, Any], object]]) -> None:
    for pending, result in answers:
        if pending.future.done():
            continue
        if isinstance(result, BaseException):
            pending.future.set_exception(result)
        else:
            pending.future.set_result(result)
