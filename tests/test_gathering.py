"""gather_few: asyncio.gather's results and errors, without a Task for a lone coroutine."""

from __future__ import annotations

import asyncio

import pytest

from postroom.canonical import canonical_domain
from postroom.gathering import gather_few


async def value(x: int, delay: float = 0.0) -> int:
    await asyncio.sleep(delay)
    return x


async def fail() -> int:
    raise ValueError("no")


def test_results_in_order_and_errors_raised() -> None:
    async def scenario() -> None:
        assert await gather_few([value(1)]) == [1]
        assert await gather_few([value(1, 0.02), value(2), value(3, 0.01)]) == [1, 2, 3]
        assert await gather_few([]) == []
        with pytest.raises(ValueError):
            await gather_few([fail()])
        with pytest.raises(ValueError):
            await gather_few([value(1), fail()])

    asyncio.run(scenario())


def test_canonical_domain_remembers_answers_not_errors() -> None:
    assert canonical_domain("Corp.Example.") == "corp.example"
    assert canonical_domain("Corp.Example.") == "corp.example"
    for _ in range(2):  # an invalid name is refused every time it is asked
        with pytest.raises(ValueError):
            canonical_domain("bad_domain..example")
