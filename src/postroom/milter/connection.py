"""One connection to one filter: the socket, the clock, and the core's steps in between.

`MilterSpec` says where a filter listens ("inet:HOST:PORT", "inet6:HOST:PORT",
"unix:PATH", as Postfix's smtpd_milters spells them), how long each wait may
take and what to do when the filter fails. `MilterConnection.step` sends one
step and waits for its verdict; a filter that does not answer in time, closes,
or breaks the protocol raises MilterFailure, after which the connection is
closed and not used again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from postroom.protocol import milter_client as core
from postroom.protocol.milter_client import Event, Modification, Negotiated, Verdict

READ_SIZE = 256 * 1024  # one read from the filter


class MilterFailure(Exception):
    """The filter is down, timed out, or broke the protocol; str() says which."""


@dataclass(frozen=True)
class MilterSpec:
    """One filter as the config names it, with its limits (as Postfix's milter_* settings)."""

    socket: str  # "inet:HOST:PORT", "inet6:HOST:PORT" or "unix:PATH"
    default_action: str = "tempfail"  # "tempfail" or "accept" (milter_default_action)
    connect_timeout: float = 30.0  # milter_connect_timeout: connecting and negotiating
    command_timeout: float = 30.0  # milter_command_timeout: connect, HELO, MAIL, RCPT steps
    content_timeout: float = 300.0  # milter_content_timeout: headers, body, end of message

    def __str__(self) -> str:
        return self.socket


def parse_socket(text: str) -> tuple[str, str, int]:
    """("inet", host, port) or ("unix", path, 0); ValueError saying what is wrong."""
    kind, sep, rest = text.partition(":")
    if not sep or kind not in ("inet", "inet6", "unix", "local"):
        raise ValueError(f'{text!r} is not "inet:HOST:PORT", "inet6:HOST:PORT" or "unix:PATH"')
    if kind in ("unix", "local"):
        if not rest:
            raise ValueError(f"{text!r}: the socket path is empty")
        return "unix", rest, 0
    host, sep, port = rest.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f'{text!r} is not "{kind}:HOST:PORT" (port 1-65535)')
    return "inet", host, int(port)


class MilterConnection:
    """An open, negotiated session with one filter."""

    def __init__(self, spec: MilterSpec, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.spec = spec
        self.core = core.MilterClient()
        self._reader = reader
        self._writer = writer
        self.negotiated: Negotiated | None = None

    @classmethod
    async def open(cls, spec: MilterSpec) -> MilterConnection:
        """Connect and negotiate within the connect timeout; MilterFailure if not."""
        kind, where, port = parse_socket(spec.socket)
        try:
            async with asyncio.timeout(spec.connect_timeout):
                if kind == "unix":
                    reader, writer = await asyncio.open_unix_connection(where)
                else:
                    reader, writer = await asyncio.open_connection(where, port)
        except (OSError, TimeoutError) as exc:
            raise MilterFailure(f"cannot connect: {exc or 'timed out'}") from None
        conn = cls(spec, reader, writer)
        try:
            conn.core.negotiate()
            event = await conn._answer(spec.connect_timeout)
            assert isinstance(event, Negotiated)
        except MilterFailure:
            conn.close()
            raise
        conn.negotiated = event
        return conn

    async def step(self, send: Callable[[], bool], timeout: float,
                   modifications: list[Modification] | None = None) -> Verdict:
        """Send one step (a bound method of the core) and await its verdict; "continue"
        for a step the filter takes without answering. Modifications (end of message)
        are appended to `modifications`."""
        try:
            awaits = send()
        except ValueError as exc:  # a value the protocol cannot carry (a NUL)
            raise MilterFailure(f"cannot send: {exc}") from None
        if not awaits:
            # Unanswered steps (SMFIP_NR_*) still wait for the filter to read them, so
            # a slow filter cannot make the transport buffer a whole message.
            await self._drain(timeout)
            return core.CONTINUE
        while True:
            event = await self._answer(timeout)
            if isinstance(event, Verdict):
                return event
            if modifications is None or isinstance(event, Negotiated | core.Progress):
                raise MilterFailure(f"unexpected answer {event}")  # pragma: no cover
            modifications.append(event)

    async def _answer(self, timeout: float) -> Event:
        """The filter's next event, waiting at most `timeout` since the last sign of
        life (SMFIR_PROGRESS restarts the clock, as in Postfix)."""
        await self._drain(timeout)
        while True:
            try:
                event = self.core.next_event()
            except core.RemoteProtocolError as exc:
                self.close()
                raise MilterFailure(str(exc)) from None
            if isinstance(event, core.Progress):
                continue  # the clock restarts below, at the next read
            if event is not core.NEED_DATA:
                return event  # type: ignore[return-value]
            try:
                data = await asyncio.wait_for(self._reader.read(READ_SIZE), timeout)
            except TimeoutError:
                self.close()
                raise MilterFailure(f"timed out after {timeout:g}s awaiting the answer to "
                                    f"{self.core.awaiting}") from None
            except OSError as exc:
                self.close()
                raise MilterFailure(f"lost connection: {exc}") from None
            self.core.receive_data(data)

    async def _drain(self, timeout: float) -> None:
        """Write what the core queued; wait while the transport holds more than its
        high-water mark (the filter reads too slowly), at most `timeout`."""
        self.flush()
        try:
            await asyncio.wait_for(self._writer.drain(), timeout)
        except (OSError, TimeoutError) as exc:
            self.close()
            raise MilterFailure(f"cannot write: {exc or 'timed out'}") from None

    def flush(self) -> None:
        """Write what the core queued (steps that await no answer)."""
        data = self.core.data_to_send()
        if data and not self._writer.is_closing():
            self._writer.write(data)

    def close(self) -> None:
        if not self._writer.is_closing():
            self._writer.close()

    def quit(self) -> None:
        """SMFIC_QUIT, then close (the transport sends what it holds first)."""
        if self.core.state is not core.MilterState.CLOSED and self.core.awaiting is None:
            self.core.quit()
            self.flush()
        self.close()
