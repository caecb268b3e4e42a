"""Awaiting several coroutines at once, without paying for it when there is one.

asyncio.gather wraps every coroutine in a Task: a few microseconds and a trip
through the event loop each. A relay attempt nearly always has one domain,
one courier and one hop to wait for, so the common case awaits it directly.
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
