"""Stream's handler: bytes that arrive while a read waits may be answered in the
data callback, and the read sees exactly what the handler leaves to it."""

from __future__ import annotations

import asyncio
from typing import Any

from postroom.server.stream import Stream


class FakeTransport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


def test_handler_answers_while_a_read_waits_and_can_hand_over_to_the_task() -> None:
    async def scenario() -> None:
        stream = Stream()
        stream.connection_made(FakeTransport())  # type: ignore[arg-type]
        seen: list[bytes] = []

        def handler(data: bytes) -> bool:
            seen.append(data)
            return data != b"needs the task"

        stream.set_handler(handler)
        reading = asyncio.ensure_future(stream.read(timeout=60))
        await asyncio.sleep(0)
        stream.data_received(b"one")  # dealt with: the read keeps waiting
        await asyncio.sleep(0)
        assert seen == [b"one"] and not reading.done()
        stream.data_received(b"needs the task")
        assert await reading == b""  # the handler took its bytes; the task goes on
        reading = asyncio.ensure_future(stream.read(timeout=60))
        await asyncio.sleep(0)
        stream.data_received(b"needs the task")
        stream.data_received(b"after")  # the read is woken: buffered, not handled
        assert await reading == b"after"  # what came after the handler's bytes
        assert seen == [b"one", b"needs the task", b"needs the task"]

        # Not while writing is paused: back-pressure is the task's to wait out.
        stream.pause_writing()
        reading = asyncio.ensure_future(stream.read(timeout=60))
        await asyncio.sleep(0)
        stream.data_received(b"later")
        assert await reading == b"later" and len(seen) == 3

    asyncio.run(scenario())


def test_handled_bytes_restart_the_idle_timeout() -> None:
    async def scenario() -> None:
        stream = Stream()
        stream.connection_made(FakeTransport())  # type: ignore[arg-type]
        stream.set_handler(lambda data: True)
        reading = asyncio.ensure_future(stream.read(timeout=1.0))
        for _ in range(4):  # 1.2 s of activity, never 1 s quiet (room for a slow machine)
            await asyncio.sleep(0.3)
            stream.data_received(b"NOOP\r\n")
        assert not reading.done()
        # The idle timeout comes 1 s after the last command (not the 5 s wait here).
        done, _ = await asyncio.wait({reading}, timeout=5)
        assert reading in done
        assert isinstance(reading.exception(), TimeoutError)

    asyncio.run(scenario())
