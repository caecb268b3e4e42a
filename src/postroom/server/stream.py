"""A byte stream over an asyncio transport that sessions `await`, with an honest STARTTLS.

asyncio's StreamReader is not used because STARTTLS needs two things it does
not offer. First, reading must stop *before* the 220 reply to STARTTLS goes
out: a fast client sends its TLS ClientHello the moment it sees the 220, and
if those bytes land in a plaintext read buffer the handshake never starts.
Second, plaintext that arrived after the STARTTLS command must be thrown away,
never read after the handshake (RFC 3207 4.2, RFC 2595 4: the command
injection of CVE-2011-0411). Here both are explicit: `pause_reading()` before
the reply, then `start_tls()` drops whatever plaintext is buffered.

TLS itself runs here too (server.tls), not in the event loop's transport, so
that a client's half-close, a FIN or a close_notify, ends only its side: the
session answers everything it read before the connection closes.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Callable
from typing import Any, cast

from postroom.server.tls import ServerTLS

# Stop reading from the socket when this much is buffered and not yet consumed
# by the session (back-pressure for a client that sends faster than we store).
HIGH_WATER = 1024 * 1024

# A closing stream sends its FIN, then reads and drops what the client still sends
# until the client's own FIN, for at most this long. Closing a socket with unread
# bytes in it sends a reset, and the client's kernel then drops the replies it has
# not read yet: the 250 and 221 to a pipelined BDAT LAST and QUIT, when the
# client's close_notify lands after the QUIT (Exim's order). Apache's "lingering
# close" waits as long.
LINGER_SECONDS = 2.0


class Stream(asyncio.Protocol):
    """The protocol object of one connection, and the session's handle on it."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._eof = False
        self._closed = False
        self._read_waiter: asyncio.Future[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None
        self._write_paused = False
        self._reading_paused = False
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._kicked = False
        self._handler: Callable[[bytes], bool] | None = None
        self._tls: ServerTLS | None = None
        self._handshake: asyncio.Future[None] | None = None  # until the TLS handshake ends
        self._linger: asyncio.TimerHandle | None = None  # closing: our FIN is out

    # -- asyncio.Protocol callbacks ------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = cast(asyncio.Transport, transport)
        self._loop = asyncio.get_running_loop()

    def data_received(self, data: bytes) -> None:
        if self._linger is not None:
            return  # closing: nothing more is read (see LINGER_SECONDS)
        tls = self._tls
        if tls is None:
            self._take(data)
            return
        try:
            plain = tls.receive(data)
        except ssl.SSLError as exc:
            self._write_tls(tls)  # the alert that tells the client why
            self._tls_failed(exc)
            return
        self._write_tls(tls)  # handshake messages, session tickets
        handshake = self._handshake
        if tls.handshake_done and handshake is not None and not handshake.done():
            handshake.set_result(None)
        if plain:
            self._take(plain)
        if tls.peer_closed and not self._eof:
            self.eof_received()

    def _take(self, data: bytes) -> None:
        """Plaintext from the client: to the handler, or buffered for read()."""
        waiter = self._read_waiter
        if (
            self._handler is not None
            and waiter is not None
            and not waiter.done()
            and not self._chunks
            and not self._write_paused
        ):
            # The session is idle, waiting for its next command: let it answer
            # right here instead of waking its task (see set_handler).
            if not self._handler(data):
                self._kicked = True
                waiter.set_result(None)
            return
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > HIGH_WATER and not self._reading_paused and self.transport:
            self.transport.pause_reading()
            self._reading_paused = True
        self._wake_reader()

    def eof_received(self) -> bool:
        """The client closed its sending side (a FIN, or TLS close_notify).

        A FIN ends only the client's direction (RFC 9293 3.6): it may have
        pipelined commands and QUIT, then half-closed and waited for the
        replies. The transport stays open, the session answers everything it
        read and then closes. TLS 1.3 says the same of close_notify (RFC 8446
        6.1), and OpenSSL writes after it in TLS 1.2 as well.
        """
        if self._linger is not None:
            return False  # the lingering close is over: the transport closes itself
        self._eof = True
        self._wake_reader()
        handshake = self._handshake
        if handshake is not None and not handshake.done():
            handshake.set_exception(ConnectionResetError("EOF during the TLS handshake"))
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self._linger is not None:
            self._linger.cancel()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._eof = True
        self._closed = True
        self._wake_reader()
        handshake = self._handshake
        if handshake is not None and not handshake.done():
            handshake.set_exception(exc or ConnectionResetError("connection lost"))
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_exception(exc or ConnectionResetError("connection lost"))

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    # -- what sessions use ----------------------------------------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """As a transport's; "ssl_object" is this stream's TLS once its handshake is done."""
        if name == "ssl_object":
            tls = self._tls
            return tls.ssl_object if tls is not None and tls.handshake_done else default
        return self.transport.get_extra_info(name, default) if self.transport else default

    def set_handler(self, handler: Callable[[bytes], bool] | None) -> None:
        """Bytes that arrive while a read() waits go to `handler(data)` first.

        A session whose answers mostly need no waiting (POP3's RETR of a small
        message) answers them in the callback, without the task switch a woken
        read() costs. The handler takes the bytes either way: True means it dealt
        with them and the read goes on waiting (its timeout starts again); False
        means it needs its task: the read returns at once, with the bytes that
        came after the handler's (b"" when none did). The handler is never called
        while bytes are buffered or while writing is paused, so back-pressure and
        the order of bytes are kept. Handled bytes do not restart the read's
        timeout: a handler that has finished a request calls restart_deadline().
        """
        self._handler = handler

    async def read(self, timeout: float | None = None) -> bytes:
        """Everything buffered, waiting for some if there is none; b"" at EOF, or
        when a handler (see set_handler) asked for the task.

        TimeoutError when nothing came for `timeout` seconds. One timer serves
        many reads: it is armed when a wait starts and none is pending (or the
        pending one is later), and when it fires it re-arms itself for the
        current wait's deadline instead of expiring it (neither asyncio.wait_for,
        which makes a task per read, nor a new timer per read, at thousands of
        commands a second).
        """
        while not self._chunks:
            if self._kicked:
                self._kicked = False
                return b""
            if self._eof:
                return b""
            loop = asyncio.get_running_loop()
            waiter = loop.create_future()
            self._read_waiter = waiter
            if timeout is not None:
                self._deadline = loop.time() + timeout
                self._arm_timer(loop)
            try:
                await waiter
            finally:
                self._read_waiter = None
        self._kicked = False
        data = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks.clear()
        self._buffered = 0
        self._resume_if_paused()
        return data

    def restart_deadline(self, timeout: float) -> None:
        """The read now waiting (if any) times out `timeout` seconds from now."""
        loop = self._loop
        if loop is None or self._read_waiter is None:
            return
        self._deadline = loop.time() + timeout
        self._arm_timer(loop)

    def _arm_timer(self, loop: asyncio.AbstractEventLoop) -> None:
        timer = self._timer
        if timer is not None:
            if timer.when() <= self._deadline:
                return  # it fires first and re-arms itself for the deadline
            timer.cancel()
        self._timer = loop.call_at(self._deadline, self._check_deadline)

    def _check_deadline(self) -> None:
        self._timer = None
        waiter = self._read_waiter
        if waiter is None or waiter.done():
            return  # not waiting now: the next wait arms a timer again
        loop = asyncio.get_running_loop()
        if loop.time() >= self._deadline:
            waiter.set_exception(TimeoutError())
        else:
            self._timer = loop.call_at(self._deadline, self._check_deadline)

    def write(self, data: bytes) -> None:
        if self.transport is None or self._closed:
            return
        tls = self._tls
        if tls is None:
            self.transport.write(data)
            return
        if not tls.handshake_done:
            return  # nothing the session says can reach a client still shaking hands
        try:
            tls.send(data)
        except ssl.SSLError as exc:
            self._tls_failed(exc)
            return
        self._write_tls(tls)

    async def drain(self, timeout: float) -> None:
        """Wait until the client has taken what was written, down to the transport's
        low-water mark; TimeoutError when it takes nothing for `timeout` seconds
        (a client that sends commands but never reads would hold the session)."""
        if self._closed:
            raise ConnectionResetError("connection lost")
        if not self._write_paused:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._drain_waiter = waiter
        try:
            await asyncio.wait_for(waiter, timeout)
        finally:
            self._drain_waiter = None

    def pause_reading(self) -> None:
        """Leave further bytes in the kernel (call before answering STARTTLS)."""
        if self.transport is not None and not self._reading_paused:
            self.transport.pause_reading()
            self._reading_paused = True

    async def start_tls(self, context: ssl.SSLContext, timeout: float) -> None:
        """STARTTLS: handshake as the server; plaintext already buffered is discarded.

        Call after pause_reading() and the reply that invites the handshake;
        reading resumes here. TimeoutError, ssl.SSLError or ConnectionError
        when the handshake does not complete.
        """
        assert self.transport is not None and self._tls is None
        self._chunks.clear()
        self._buffered = 0
        self.begin_tls(context)
        self._resume_if_paused()
        await self.handshake(timeout)

    def begin_tls(self, context: ssl.SSLContext) -> None:
        """Everything from now on is TLS (implicit TLS starts here at connection_made)."""
        self._tls = ServerTLS(context)
        self._handshake = asyncio.get_running_loop().create_future()

    async def handshake(self, timeout: float) -> None:
        """Wait for the TLS handshake begun by begin_tls()."""
        assert self._handshake is not None, "begin_tls() first"
        await asyncio.wait_for(self._handshake, timeout)

    def is_closing(self) -> bool:
        return (self._closed or self._linger is not None or self.transport is None
                or self.transport.is_closing())

    def close(self) -> None:
        """Close after what was written has gone (with our close_notify under TLS).

        Unless the client has already closed its side, this is a lingering
        close (see LINGER_SECONDS): our FIN goes out after the last reply, and
        the socket closes at the client's FIN.
        """
        transport = self.transport
        if transport is None or transport.is_closing() or self._linger is not None:
            return
        tls = self._tls
        if tls is not None and tls.handshake_done and not self._closed:
            tls.close()
            self._write_tls(tls)
        if self._eof or self._closed or not transport.can_write_eof():
            transport.close()
            return
        try:
            transport.write_eof()
        except OSError:  # the client is gone already (ENOTCONN)
            transport.close()
            return
        self._chunks.clear()
        self._buffered = 0
        self._linger = asyncio.get_running_loop().call_later(LINGER_SECONDS, transport.close)
        self._resume_if_paused()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # -- internals -------------------------------------------------------------

    def _write_tls(self, tls: ServerTLS) -> None:
        out = tls.outgoing()
        if out and self.transport is not None and not self._closed:
            self.transport.write(out)

    def _tls_failed(self, exc: ssl.SSLError) -> None:
        """A failed handshake or a broken record: the connection is over."""
        handshake = self._handshake
        if handshake is not None and not handshake.done():
            handshake.set_exception(exc)
        self._eof = True
        self._wake_reader()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()  # after the alert already written

    def _wake_reader(self) -> None:
        if self._read_waiter is not None and not self._read_waiter.done():
            self._read_waiter.set_result(None)

    def _resume_if_paused(self) -> None:
        if self._reading_paused and self.transport is not None:
            self.transport.resume_reading()
            self._reading_paused = False
