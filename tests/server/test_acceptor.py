"""The primary's submission listener takes only what the workers leave (server.acceptor)."""

from __future__ import annotations

import asyncio
import socket
import ssl

import pytest

from postroom.server.acceptor import DeferredServer


class Greeter(asyncio.Protocol):
    """Says who accepted the connection, then waits."""

    def __init__(self, name: str, log: list[str]) -> None:
        self.name = name
        self.log = log

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.log.append(self.name)
        transport.write(f"{self.name}\r\n".encode())  # type: ignore[attr-defined]


def no_refusal(sock: socket.socket, exc: OSError) -> int:
    """An accept_failed that answers no waiting connection (server.descriptors does)."""
    return 0


def listening(kind: type[socket.socket] = socket.socket) -> socket.socket:
    sock = kind()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    return sock


async def greeting(port: int, context: ssl.SSLContext | None = None) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
    try:
        return await asyncio.wait_for(reader.readline(), 5)
    finally:
        writer.close()


def test_alone_it_takes_every_connection_after_its_delay() -> None:
    async def scenario() -> tuple[list[bytes], list[str], float]:
        sock = listening()
        log: list[str] = []
        server = DeferredServer(sock, lambda: Greeter("primary", log), no_refusal, delay=0.05)
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            lines = await asyncio.gather(*(greeting(sock.getsockname()[1]) for _ in range(20)))
        finally:
            server.close()
        return lines, log, loop.time() - started

    lines, log, took = asyncio.run(scenario())
    assert lines == [b"primary\r\n"] * 20 and len(log) == 20
    assert took >= 0.05  # it let others have their turn first


def test_an_ordinary_listener_on_the_same_socket_wins_every_connection() -> None:
    """The worker's listener accepts at once; the primary's finds nothing left."""

    async def scenario() -> list[str]:
        sock = listening()
        log: list[str] = []
        deferred = DeferredServer(sock, lambda: Greeter("primary", log), no_refusal, delay=0.2)
        worker = await asyncio.get_running_loop().create_server(
            lambda: Greeter("worker", log), sock=sock.dup())
        try:
            port = sock.getsockname()[1]
            for _ in range(10):
                assert await greeting(port) == b"worker\r\n"
            await asyncio.sleep(0.3)  # the primary's look comes, and finds nothing
        finally:
            deferred.close()
            worker.close()
        return log

    assert asyncio.run(scenario()) == ["worker"] * 10


def test_closed_it_accepts_nothing_more() -> None:
    async def scenario() -> list[str]:
        sock = listening()
        port = sock.getsockname()[1]
        spare = sock.dup()  # another process's copy keeps the port
        log: list[str] = []
        server = DeferredServer(sock, lambda: Greeter("primary", log), no_refusal, delay=0.01)
        assert await greeting(port) == b"primary\r\n"
        server.close()
        server.close()  # twice is harmless
        assert sock.fileno() == -1
        client = socket.create_connection(("127.0.0.1", port))  # queued, never served
        await asyncio.sleep(0.1)
        client.close()
        spare.close()
        return log

    assert asyncio.run(scenario()) == ["primary"]


class FailingOnce(socket.socket):
    """A listening socket whose first accept(2) fails as when out of descriptors."""

    failed = False

    def accept(self) -> tuple[socket.socket, object]:  # type: ignore[override]
        if not self.failed:
            self.failed = True
            raise OSError(24, "Too many open files")
        return super().accept()


def test_an_accept_error_pauses_and_then_accepts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("postroom.server.acceptor.ACCEPT_ERROR_PAUSE", 0.2)

    async def scenario() -> tuple[list[str], float]:
        sock = listening(FailingOnce)
        log: list[str] = []
        server = DeferredServer(sock, lambda: Greeter("primary", log), no_refusal, delay=0.01)
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            assert await greeting(sock.getsockname()[1]) == b"primary\r\n"
        finally:
            server.close()
        return log, loop.time() - started

    log, took = asyncio.run(scenario())
    assert log == ["primary"] and took >= 0.2
