"""BatchThread: jobs run in batches on one thread; each submitter gets its own answer."""

from __future__ import annotations

import asyncio
import threading

import pytest

from postroom.batch import BatchThread


def test_results_and_errors_go_to_their_own_submitter() -> None:
    batches: list[list[int]] = []
    threads: set[int] = set()

    def run(jobs: list[int]) -> list[int | BaseException]:
        batches.append(jobs)
        threads.add(threading.get_ident())
        return [ValueError(f"odd {j}") if j % 2 else j * 10 for j in jobs]

    async def scenario() -> list[object]:
        worker: BatchThread[int, int] = BatchThread("test-batch", run)
        try:
            return await asyncio.gather(*(worker.submit(j) for j in range(20)),
                                        return_exceptions=True)
        finally:
            worker.close()

    results = asyncio.run(scenario())
    for j, result in enumerate(results):
        if j % 2:
            assert isinstance(result, ValueError) and str(result) == f"odd {j}"
        else:
            assert result == j * 10
    assert sum(len(b) for b in batches) == 20
    assert len(threads) == 1 and threading.get_ident() not in threads


def test_a_failing_batch_fails_each_of_its_jobs() -> None:
    def run(jobs: list[int]) -> list[int]:
        raise OSError("disk gone")

    async def scenario() -> None:
        worker: BatchThread[int, int] = BatchThread("test-batch", run)
        try:
            with pytest.raises(OSError, match="disk gone"):
                await worker.submit(1)
        finally:
            worker.close()

    asyncio.run(scenario())


def test_a_lingering_thread_takes_the_jobs_of_its_linger_in_one_batch() -> None:
    batches: list[list[int]] = []

    def run(jobs: list[int]) -> list[int | BaseException]:
        batches.append(jobs)
        return jobs

    async def one_by_one(worker: BatchThread[int, int]) -> list[int]:
        waiting = []
        for j in range(5):
            waiting.append(asyncio.ensure_future(worker.submit(j)))
            await asyncio.sleep(0.005)  # the thread is awake (lingering) after the first
        return list(await asyncio.gather(*waiting))

    async def scenario() -> list[int]:
        worker: BatchThread[int, int] = BatchThread("test-linger", run, linger=0.5)
        try:
            return await one_by_one(worker)
        finally:
            worker.close()

    assert asyncio.run(scenario()) == [0, 1, 2, 3, 4]
    assert batches == [[0, 1, 2, 3, 4]]
