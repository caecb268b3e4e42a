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


def test_handled_bytes_restart_the_timeout_only_when_the_handler_says_so() -> None:
    """A byte alone buys no time (slowloris): the handler restarts the deadline when it
    has answered a whole request (server.deadline)."""

    async def scenario() -> None:
        stream = Stream()
        stream.connection_made(FakeTransport())  # type: ignore[arg-type]
        loop = asyncio.get_running_loop()

        def handler(data: bytes) -> bool:
            if data.endswith(b"\r\n"):
                stream.restart_deadline(1.0)
            return True

        stream.set_handler(handler)
        reading = asyncio.ensure_future(stream.read(timeout=1.0))
        for _ in range(4):  # 1.2 s of whole commands, never 1 s quiet
            await asyncio.sleep(0.3)
            stream.data_received(b"NOOP\r\n")
        assert not reading.done()
        # The timeout comes 1 s after the last whole command (not the 5 s wait here).
        done, _ = await asyncio.wait({reading}, timeout=5)
        assert reading in done
        assert isinstance(reading.exception(), TimeoutError)

        started = loop.time()
        reading = asyncio.ensure_future(stream.read(timeout=1.0))
        while not reading.done():  # a byte every 0.2 s, never a whole line
            await asyncio.sleep(0.2)
            stream.data_received(b"N")
        assert isinstance(reading.exception(), TimeoutError)
        assert loop.time() - started < 3  # the first deadline held

    asyncio.run(scenario())


def test_a_shorter_wait_is_not_held_up_by_a_timer_armed_for_a_longer_one() -> None:
    async def scenario() -> None:
        stream = Stream()
        stream.connection_made(FakeTransport())  # type: ignore[arg-type]
        long_wait = asyncio.ensure_future(stream.read(timeout=60))
        await asyncio.sleep(0)
        stream.data_received(b"x")
        assert await long_wait == b"x"
        short = asyncio.ensure_future(stream.read(timeout=0.2))
        done, _ = await asyncio.wait({short}, timeout=5)
        assert short in done and isinstance(short.exception(), TimeoutError)

    asyncio.run(scenario())
