"""Awaiting several coroutines at once, without a Task each when there is one.

A relay attempt nearly always waits for one domain, one courier and one hop:
that one is awaited directly, not wrapped in a Task as asyncio.gather would.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


async def gather_few(coros: list[Coroutine[Any, Any, T]]) -> list[T]:
    """Like asyncio.gather(*coros): the results in order; the first exception raises
    (the others keep running, as with gather)."""
    if len(coros) == 1:
        return [await coros[0]]
    return list(await asyncio.gather(*coros))
