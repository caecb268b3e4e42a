"""An asyncio byte channel for clients, and a client core's session on it.

The connection under every client session postroom opens: the relay's and
`postroom send`'s (through `net.smtp`) and `postroom fetch`'s. `open_channel`
connects; `CoreSession` moves a sans-IO client core's bytes over the channel.
Their failures are `ConnectionFailure`s that carry facts (errno's words, the
timeout, the ssl error, the command awaited), never a caller's sentence: each
caller words them for its readers.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar, cast

from postroom.protocol._core import NEED_DATA, RemoteProtocolError

Trace = Callable[[str], None]


class ConnectionFailure(Exception):
    """A client connection failed. Each subclass says how; its attributes are the facts
    callers word (as `str.format` fields), and `address` the peer's (ip, port) if any."""

    address: tuple[str, int] | None = None


class ConnectFailed(ConnectionFailure):
    """No connection: `reason` in words (errno's, or the resolver's)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ConnectTimedOut(ConnectFailed):
    """No connection within `timeout` seconds."""

    def __init__(self, timeout: float) -> None:
        super().__init__("timed out")
        self.timeout = timeout


class TLSFailed(ConnectionFailure):
    """The TLS handshake failed: `error` is what ssl or the transport raised (a
    TimeoutError when it took longer than `timeout`); the connection is dropped."""

    def __init__(self, error: OSError, timeout: float) -> None:
        super().__init__(str(error))
        self.error = error
        self.timeout = timeout


class SessionLost(ConnectionFailure):
    """The session broke off while `command` awaited its reply (None: none did); dropped."""

    def __init__(self, command: str | None, detail: str = "", timeout: float = 0.0) -> None:
        super().__init__(detail or type(self).__name__)
        self.command = command
        self.detail = detail
        self.timeout = timeout


class ReplyTimedOut(SessionLost):
    """No reply within `timeout` seconds."""


class SendTimedOut(SessionLost):
    """The peer read nothing of what was sent for `timeout` seconds."""


class PeerClosed(SessionLost):
    """The peer closed the connection."""


class SendFailed(SessionLost):
    """The connection broke while sending: `detail` says how."""


class ProtocolError(SessionLost):
    """The peer broke the protocol (`detail`): a malformed reply, bytes behind a 220..."""


def host_port(host: str, port: int) -> str:
    """ "host:port", or "[v6]:port" for an IPv6 address."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _reason(exc: OSError) -> str:
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host name ({exc.strerror})"
    # asyncio words errors as "Connect call failed (...)": say what errno says.
    return os.strerror(exc.errno) if exc.errno else str(exc) or type(exc).__name__


async def open_channel(host: str, port: int, timeout: float) -> Channel:
    """A TCP connection to host:port within `timeout` seconds, or ConnectFailed."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout):
            _transport, channel = await loop.create_connection(Channel, host, port)
    except TimeoutError:
        raise ConnectTimedOut(timeout) from None
    except OSError as exc:
        raise ConnectFailed(_reason(exc)) from None
    return channel


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
        """The client side of a TLS handshake, checking `name`; TLSFailed (and the
        connection dropped) when it fails or takes longer than `timeout`."""
        assert self.transport is not None
        try:
            new = await asyncio.get_running_loop().start_tls(
                self.transport,
                self,
                context,
                server_side=False,
                server_hostname=name,
                ssl_handshake_timeout=timeout,
            )
        except OSError as exc:  # ssl.SSLError and TimeoutError are OSErrors
            self.abort()
            raise TLSFailed(exc, timeout) from None
        if new is None:  # pragma: no cover - only when the transport closed meanwhile
            self.abort()
            raise TLSFailed(ConnectionResetError("connection closed during the handshake"),
                            timeout)
        self.transport = new

    def connected_line(self, host: str, port: int) -> str:
        """What a trace says once connected: "connected to host:port (ip)"."""
        peer = self.get_extra_info("peername")
        ip = f" ({peer[0]})" if peer and peer[0] != host else ""
        return f"connected to {host_port(host, port)}{ip}"

    def tls_description(self) -> str | None:
        """ "TLSv1.3 TLS_AES_256_GCM_SHA384" for a TLS connection, None without TLS."""
        ssl_object = self.get_extra_info("ssl_object")
        if ssl_object is None:
            return None
        cipher = ssl_object.cipher()
        return f"{ssl_object.version()} {cipher[0]}" if cipher else str(ssl_object.version())

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


class ClientCore(Protocol):
    """What `CoreSession` needs of a sans-IO client core (protocol.smtp_client, pop3_client)."""

    @property
    def pending(self) -> tuple[str, ...]: ...

    def data_to_send(self) -> bytes: ...

    def receive_data(self, data: bytes) -> None: ...

    def next_event(self) -> object: ...


CoreT = TypeVar("CoreT", bound=ClientCore)


class CoreSession(Generic[CoreT]):
    """A client core's session on a channel: its bytes both ways, the trace, the end.

    A session that cannot go on (a timeout, EOF, a lost connection, a protocol
    error) raises a SessionLost naming the command awaited, and is dropped.
    """

    closed_event: type  # the core's event for the end of the session

    def __init__(self, channel: Channel, core: CoreT, trace: Trace | None) -> None:
        self.channel = channel
        self.core = core
        self._trace = trace
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def tls_active(self) -> bool:
        """The TLS handshake is done: after STARTTLS/STLS, or at once (implicit TLS)."""
        return self.tls_version is not None

    @property
    def tls_version(self) -> str | None:
        """The TLS protocol in use ("TLSv1.3"), None without TLS."""
        ssl_object = self.channel.get_extra_info("ssl_object")
        return ssl_object.version() if ssl_object is not None else None

    def trace(self, line: str) -> None:
        """Put a line into the trace, if there is one."""
        if self._trace is not None:
            self._trace(line)

    async def start_tls(self, context: ssl.SSLContext, name: str, timeout: float) -> None:
        """The TLS handshake, checking `name` (see Channel.start_tls), then in the trace."""
        await self.channel.start_tls(context, name, timeout)
        self.trace(f"TLS: {self.channel.tls_description()}")

    async def flush(self, timeout: float) -> None:
        """Write what the core holds; the peer must read it within `timeout` seconds."""
        data = self.core.data_to_send()
        if not data:
            return
        try:
            self.channel.write(data)
            await self.channel.drain(timeout)
        except TimeoutError:
            raise self._lost(SendTimedOut(self._awaited(), timeout=timeout)) from None
        except OSError as exc:
            raise self._lost(SendFailed(self._awaited(), str(exc))) from None

    async def next_event(self, timeout: float) -> object:
        """The core's next event, waiting up to `timeout` seconds for each read."""
        command = self._awaited()
        while True:
            try:
                event = self.core.next_event()
            except RemoteProtocolError as exc:
                raise self._lost(ProtocolError(command, str(exc))) from None
            if event is not NEED_DATA:
                if isinstance(event, self.closed_event):
                    raise self._lost(PeerClosed(command))
                return event
            try:
                data = await self.channel.read(timeout)
            except TimeoutError:
                raise self._lost(ReplyTimedOut(command, timeout=timeout)) from None
            self.core.receive_data(data)

    def close(self, *, abort: bool = False) -> None:
        """Close the connection (`abort`: drop it, unsent bytes and all) without QUIT."""
        if self._closed:
            return
        self._closed = True
        if abort:
            self.channel.abort()
        else:
            self.channel.close()

    def _awaited(self) -> str | None:
        pending = self.core.pending
        return pending[0] if pending else None

    def _lost(self, failure: ConnectionFailure) -> ConnectionFailure:
        """The connection cannot go on: drop it, and the failure to raise."""
        self.close(abort=True)
        return failure
