"""Per-request deadlines on real sockets: bytes trickled in buy no time (slowloris).

A command line must be whole within the command timeout of the moment the
server began to wait for it; message content must keep a minimum rate; near
the connection limit every request gets less time; a client that never reads
its replies is dropped. See server/deadline.py and server/limits.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from postroom.config import load_config
from postroom.server.main import Running, start
from postroom.store.factory import open_store


@asynccontextmanager
async def running_server(tmp_path: Path, smtp: str = "", pop3: str = "") -> AsyncIterator[Running]:
    (tmp_path / "postroom.toml").write_text(
        'hostname = "mx.corp.example"\ndomains = ["corp.example"]\n'
        '[listen]\nsmtp = "127.0.0.1:0"\npop3 = "127.0.0.1:0"\n'
        f"[smtp]\n{smtp}\n[pop3]\n{pop3}\n"
    )
    config = load_config(tmp_path)
    open_store(config.store).users.add_user("boss@corp.example", "boss-secret")
    running = await start(config)
    try:
        yield running
    finally:
        await running.stop(grace=1)


def trickle(address: tuple[str, int], opening: bytes, drip: bytes, every: float,
            limit: float = 30.0) -> tuple[bytes, float]:
    """Send `opening`, then `drip` one byte at a time every `every` seconds until the
    server closes; return what it sent and how long the drip lasted."""
    with socket.create_connection(address, timeout=limit) as sock:
        sock.sendall(opening)
        sock.settimeout(every)
        received = bytearray()
        started = time.monotonic()
        position = 0
        while time.monotonic() - started < limit:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                chunk = None
            except ConnectionResetError:
                break
            if chunk == b"":
                break
            if chunk:
                received += chunk
                continue
            try:
                sock.sendall(drip[position % len(drip):][:1])
            except (BrokenPipeError, ConnectionResetError):
                break
            position += 1
        return bytes(received), time.monotonic() - started


def test_a_command_trickled_a_byte_at_a_time_times_out(tmp_path: Path) -> None:
    async def scenario() -> tuple[bytes, float]:
        async with running_server(tmp_path, smtp='command_timeout = "1s"') as server:
            return await asyncio.to_thread(
                trickle, server.address("smtp"), b"", b"EHLO slow.example" * 100, 0.2)

    received, lasted = asyncio.run(scenario())
    assert b"421 4.4.2" in received  # the timeout, after the greeting
    assert lasted < 10  # the 1 s deadline held while bytes kept coming


def test_content_trickled_below_the_minimum_rate_times_out(tmp_path: Path) -> None:
    opening = (b"EHLO c.example\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<boss@corp.example>\r\n"
               b"DATA\r\n")

    async def scenario() -> tuple[bytes, float]:
        async with running_server(tmp_path, smtp='data_timeout = "1s"') as server:
            return await asyncio.to_thread(
                trickle, server.address("smtp"), opening, b"line of text\r\n", 0.2)

    received, lasted = asyncio.run(scenario())
    assert b"354 " in received and b"421 4.4.2" in received
    assert lasted < 10


def test_content_at_a_fair_rate_outlasts_the_data_timeout(tmp_path: Path) -> None:
    """The deadline moves out with what arrives: 4 KiB every 0.5 s for 3 s with a 1 s
    data timeout is a fair rate, and the message is delivered."""

    async def scenario() -> bytes:
        async with running_server(tmp_path, smtp='data_timeout = "1s"') as server:
            def client() -> bytes:
                with socket.create_connection(server.address("smtp"), timeout=10) as sock:
                    sock.sendall(b"EHLO c.example\r\nMAIL FROM:<a@b.example>\r\n"
                                 b"RCPT TO:<boss@corp.example>\r\nDATA\r\n")
                    reader = sock.makefile("rb")
                    while not reader.readline().startswith(b"354"):
                        pass
                    for _ in range(6):
                        sock.sendall(b"x" * 62 + b"\r\n" * 1 + (b"y" * 62 + b"\r\n") * 63)
                        time.sleep(0.5)  # the client's pace, not synchronization
                    sock.sendall(b".\r\nQUIT\r\n")
                    return reader.read()

            return await asyncio.to_thread(client)

    assert b"250 2.0.0 Ok: queued" in asyncio.run(scenario())


def test_under_stress_an_idle_session_gets_less_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With 4 of 5 slots taken (server.limits.STRESS_FRACTION), the 5-minute command
    timeout shrinks to STRESS_TIMEOUT."""
    monkeypatch.setattr("postroom.server.limits.STRESS_TIMEOUT", 0.5)

    async def scenario() -> list[bytes]:
        async with running_server(tmp_path, smtp="max_connections = 5") as server:
            def clients() -> list[bytes]:
                socks = [socket.create_connection(server.address("smtp"), timeout=10)
                         for _ in range(4)]
                try:
                    replies = []
                    for sock in socks:
                        received = bytearray()
                        while chunk := sock.recv(4096):
                            received += chunk
                        replies.append(bytes(received))
                    return replies
                finally:
                    for sock in socks:
                        sock.close()

            return await asyncio.to_thread(clients)

    replies = asyncio.run(scenario())
    assert all(b"421 4.4.2" in reply for reply in replies), replies


def test_pop3_command_trickled_before_login_times_out(tmp_path: Path) -> None:
    async def scenario() -> tuple[bytes, float]:
        async with running_server(tmp_path, pop3='idle_timeout = "1s"') as server:
            return await asyncio.to_thread(
                trickle, server.address("pop3"), b"", b"USER boss@corp.example" * 100, 0.2)

    received, lasted = asyncio.run(scenario())
    assert received.startswith(b"+OK") and lasted < 10


def test_a_client_that_never_reads_is_dropped(tmp_path: Path) -> None:
    """Commands whose replies pile up unread: the write deadline ends the session
    while the client still holds its socket open."""

    async def scenario() -> bool:
        async with running_server(tmp_path, smtp='command_timeout = "1s"') as server:
            sessions = server.services["smtp"].sessions
            done = threading.Event()

            def client() -> None:
                with socket.create_connection(server.address("smtp"), timeout=10) as sock:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                    with contextlib.suppress(OSError):
                        for _ in range(20_000):  # about 20 MB of HELP replies, never read
                            sock.sendall(b"HELP\r\n" * 10)
                    done.wait(30)

            thread = threading.Thread(target=client)
            thread.start()
            try:
                loop = asyncio.get_running_loop()
                deadline = loop.time() + 20
                while not sessions and loop.time() < deadline:
                    await asyncio.sleep(0.01)  # the session starts
                while sessions and loop.time() < deadline:
                    await asyncio.sleep(0.05)  # until the server drops it
                return not sessions
            finally:
                done.set()
                await asyncio.to_thread(thread.join)

    assert asyncio.run(scenario())
