"""The primary's submission listener takes only what the workers leave (server.acceptor)."""

from __future__ import annotations

import asyncio
import socket
import ssl
from pathlib import Path

import pytest

from postroom.server.acceptor import DeferredServer
from postroom.tlscert import make_self_signed


class Greeter(asyncio.Protocol):
    """Says who accepted the connection, then waits."""

    def __init__(self, name: str, log: list[str]) -> None:
        self.name = name
        self.log = log

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.log.append(self.name)
        transport.write(f"{self.name}\r\n".encode())  # type: ignore[attr-defined]


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
        server = DeferredServer(sock, lambda: Greeter("primary", log), delay=0.05)
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
        deferred = DeferredServer(sock, lambda: Greeter("primary", log), delay=0.2)
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
        server = DeferredServer(sock, lambda: Greeter("primary", log), delay=0.01)
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


def test_implicit_tls_sessions_start_after_the_handshake(tmp_path: Path) -> None:
    cert_pem, key_pem = make_self_signed("mx.example")
    (tmp_path / "cert.pem").write_bytes(cert_pem)
    (tmp_path / "key.pem").write_bytes(key_pem)
    server_side = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_side.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    client_side = ssl.create_default_context(cafile=tmp_path / "cert.pem")
    client_side.check_hostname = False

    async def scenario() -> tuple[bytes, list[str]]:
        sock = listening()
        log: list[str] = []
        server = DeferredServer(sock, lambda: Greeter("primary", log),
                                ssl_context=server_side, ssl_handshake_timeout=5, delay=0.01)
        try:
            # A client that never speaks TLS ends its own connection, not the listener.
            with socket.create_connection(sock.getsockname(), timeout=10) as plain:
                plain.sendall(b"EHLO not-tls\r\n")
                # The failed handshake ends that connection (an alert, then the close).
                while await asyncio.to_thread(plain.recv, 4096):
                    pass
            return await greeting(sock.getsockname()[1], client_side), log
        finally:
            server.close()

    line, log = asyncio.run(scenario())
    assert line == b"primary\r\n" and log == ["primary"]


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
        server = DeferredServer(sock, lambda: Greeter("primary", log), delay=0.01)
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            assert await greeting(sock.getsockname()[1]) == b"primary\r\n"
        finally:
            server.close()
        return log, loop.time() - started

    log, took = asyncio.run(scenario())
    assert log == ["primary"] and took >= 0.2
