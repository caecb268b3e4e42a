"""An asyncio byte channel for clients: reads with timeouts, writes with flow control, STARTTLS.

The connection under every client session postroom opens: the relay's
(`delivery.smtp_out`) and the user's tools' (`client.send`, `client.fetch`).
Make one with `loop.create_connection(Channel, host, port)`.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any, cast


class Channel(asyncio.Protocol):
    """The connection's bytes: reads with a timeout, writes with flow control, client TLS.

    Not asyncio's StreamReader: what arrives after the 220 to STARTTLS must be
    seen (and refused), never kept to be read as if it had come over TLS.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._chunks: list[bytes] = []
        self._eof = False
        self._lost = False
        self._read_waiter: asyncio.Future[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None
        self._write_paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._chunks.append(data)
        self._wake(self._read_waiter)

    def eof_received(self) -> bool:
        self._eof = True
        self._wake(self._read_waiter)
        return False  # close: a server that stopped talking is of no more use

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = self._lost = True
        self._wake(self._read_waiter)
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc or ConnectionResetError("connection lost"))

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake(self._drain_waiter)

    @staticmethod
    def _wake(waiter: asyncio.Future[None] | None) -> None:
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def take(self) -> bytes:
        """Whatever has arrived and was not read yet (no waiting)."""
        data = b"".join(self._chunks)
        self._chunks.clear()
        return data

    async def read(self, timeout: float) -> bytes:
        """What arrived, waiting up to `timeout` seconds for some; b"" at EOF."""
        while not self._chunks:
            if self._eof:
                return b""
            self._read_waiter = asyncio.get_running_loop().create_future()
            await self._wait(self._read_waiter, timeout)
            self._read_waiter = None
        return self.take()

    def write(self, data: bytes) -> None:
        if self._lost or self.transport is None or self.transport.is_closing():
            raise ConnectionResetError("connection closed")
        self.transport.write(data)

    async def drain(self, timeout: float) -> None:
        """Wait (up to `timeout`) until the transport's buffer is below its high-water mark."""
        while self._write_paused:
            if self._lost:
                raise ConnectionResetError("connection lost")
            self._drain_waiter = asyncio.get_running_loop().create_future()
            await self._wait(self._drain_waiter, timeout)
            self._drain_waiter = None

    @staticmethod
    async def _wait(waiter: asyncio.Future[None], timeout: float) -> None:
        # A timer per wait rather than asyncio.wait_for, which makes a task.
        timer = asyncio.get_running_loop().call_later(timeout, _expire, waiter)
        try:
            await waiter
        finally:
            timer.cancel()

    async def start_tls(self, context: ssl.SSLContext, name: str, timeout: float) -> None:
        assert self.transport is not None
        new = await asyncio.get_running_loop().start_tls(
            self.transport,
            self,
            context,
            server_side=False,
            server_hostname=name,
            ssl_handshake_timeout=timeout,
        )
        if new is None:  # pragma: no cover - only when the transport closed meanwhile
            raise ConnectionResetError("connection closed during the TLS handshake")
        self.transport = new

    def get_extra_info(self, name: str) -> Any:
        return self.transport.get_extra_info(name) if self.transport is not None else None

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())
