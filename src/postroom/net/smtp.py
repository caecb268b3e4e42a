"""One SMTP client connection made ready to send: connect, greeting, EHLO, STARTTLS, AUTH, QUIT.

The asyncio side of `protocol.smtp_client` that the relay (`delivery.smtp_out`)
and `postroom send` (`client.send`) share; each runs its own mail transaction
over it with `flush`, `reply` and `command`. `SMTPConnection.open`
connects, starts TLS at once where it is implicit (RFC 8314), reads the
greeting, says EHLO (HELO when EHLO gets a 5xx, RFC 5321 3.2), STARTTLS when
offered (RFC 3207) unless TLS is "none" or already on, EHLO again over TLS
(RFC 3207 4.2: what was learnt before is void), and, given a login, AUTH
PLAIN, else LOGIN (RFC 4954), never without TLS.

TLS "required" fails when STARTTLS is not offered, refused or its handshake
fails. "opportunistic" goes on in plaintext when STARTTLS is not offered or
refused, and after a failed handshake opens a new plaintext connection, as
Postfix does at security level "may" and Exim with tls_tempfail_tryclear:
encryption that was only offered by chance must not keep the mail from going.
Bytes behind the 220 to STARTTLS are refused (RFC 3207 4.2; the response
injection of CVE-2011-0411): the core raises, and the session is dropped.

Every failure is a `ConnectionFailure` that carries facts (the reply, the
command awaited, the timeout), not sentences: the relay words them as RFC 3463
statuses and DSN texts, `send` as one-line errors. A failed session is closed:
with QUIT after a refusal, dropped after a timeout, a lost connection or a
protocol error, closed after a 421 (RFC 5321 3.8).
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from dataclasses import dataclass, field

from postroom.net.channel import (
    Channel,
    ConnectionFailure,
    CoreSession,
    TLSFailed,
    Trace,
    open_channel,
)
from postroom.protocol.replies import Reply
from postroom.protocol.sasl import LOGIN, PLAIN, ClientExchange, SASLError
from postroom.protocol.smtp_client import (
    EHLO,
    ConnectionClosed,
    Extensions,
    Response,
    SMTPClient,
    State,
)

# RFC 5321 4.5.3.2: how long a client waits, at least, for each reply.
GREETING_TIMEOUT = 300.0  # 4.5.3.2.1: the initial 220 message, 5 minutes
COMMAND_TIMEOUT = 300.0  # EHLO, STARTTLS and its handshake, AUTH: as MAIL's (4.5.3.2.2)
CONNECT_TIMEOUT = 30.0  # the TCP connection: the RFC names none; Postfix's smtp_connect_timeout
QUIT_TIMEOUT = 10.0  # the 221 is a courtesy; nothing depends on it

TLS_MODES = ("none", "opportunistic", "required", "implicit")
_QUITTABLE = frozenset({State.READY, State.GREETED, State.IN_MAIL, State.IN_RCPT,
                        State.REFUSED})  # states that take QUIT


# --- Failures -----------------------------------------------------------------------


class Refused(ConnectionFailure):
    """The peer refused a step of the set-up: `reply` to `command` (None for a 421 unasked)."""

    def __init__(self, response: Response) -> None:
        super().__init__(str(response.reply))
        self.reply = response.reply
        self.command = response.command or None


class GreetingRefused(Refused):
    """A greeting other than 220; the session was QUIT (RFC 5321 3.1: a 554 waits for it)."""


class HelloRefused(Refused):
    """EHLO refused with a 4xx, or EHLO and then HELO refused; the session was QUIT."""


class StartTLSRefused(Refused):
    """STARTTLS refused (RFC 3207 4); where TLS is required, the session was QUIT."""


class AuthRefused(Refused):
    """The login was refused (RFC 4954 6); the session was QUIT."""


class ServerClosing(Refused):
    """A 421 at any time (RFC 5321 3.8): the server closes the session, and so did we."""


class TLSNotOffered(ConnectionFailure):
    """TLS is required and the peer does not offer STARTTLS; the session was QUIT."""


class AuthNeedsTLS(ConnectionFailure):
    """A login is never sent in plaintext, and the session has no TLS; it was QUIT."""


class NoAuthMechanism(ConnectionFailure):
    """The peer offers neither PLAIN nor LOGIN, but `offered` ("no AUTH": nothing); QUIT."""

    def __init__(self, offered: tuple[str, ...]) -> None:
        self.offered = " ".join(offered) or "no AUTH"
        super().__init__(self.offered)


class UnusableLogin(ConnectionFailure):
    """The login cannot be written in the mechanism: `detail` says why; the session was QUIT."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class BadChallenge(ConnectionFailure):
    """The SASL challenge `reply` cannot be answered; the exchange was cancelled, then QUIT."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


# --- The connection -----------------------------------------------------------------


@dataclass(frozen=True)
class Setup:
    """How `SMTPConnection.open` makes a session ready (see the module docstring)."""

    tls: str = "opportunistic"  # one of TLS_MODES
    tls_context: ssl.SSLContext | None = None  # needed unless tls is "none"
    tls_name: str | None = None  # the name the certificate must carry; None: the host
    helo: str | None = None  # None: the address literal of our end (RFC 5321 4.1.3)
    login: tuple[str, str] | None = field(default=None, repr=False)  # (user, password)
    connect_timeout: float = CONNECT_TIMEOUT
    greeting_timeout: float = GREETING_TIMEOUT
    command_timeout: float = COMMAND_TIMEOUT
    trace: Trace | None = None  # told every line of the conversation, credentials hidden
    # Told when opportunistic TLS is given up: StartTLSRefused, or the TLSFailed
    # that a new plaintext connection follows.
    on_plaintext: Callable[[ConnectionFailure], None] | None = None

    def __post_init__(self) -> None:
        if self.tls not in TLS_MODES:
            raise ValueError(f"tls must be one of {TLS_MODES}, not {self.tls!r}")
        if self.tls != "none" and self.tls_context is None:
            raise ValueError(f"tls={self.tls!r} needs a tls_context")


def _shown(response: Response) -> str:
    """A reply as the trace shows it; EHLO's keywords in brackets after its first line."""
    reply = response.reply
    if response.command != EHLO:
        return str(reply)  # one line: a long reply's lines are joined
    lines = reply.text.split("\n")
    keywords = ", ".join(line.strip() for line in lines[1:] if line.strip())
    return f"{reply.code} {lines[0]}" + (f" ({keywords})" if keywords else "")


def _address_literal(channel: Channel) -> str:
    """The address literal of our end (RFC 5321 4.1.3): always valid, names no host."""
    local = channel.get_extra_info("sockname")
    if not local:
        return "localhost"
    ip = str(local[0])
    return f"[IPv6:{ip}]" if ":" in ip else f"[{ip}]"


class SMTPConnection(CoreSession[SMTPClient]):
    """One SMTP session's I/O: the client core, its channel, the trace. Made by `open`."""

    closed_event = ConnectionClosed

    def __init__(self, channel: Channel, setup: Setup) -> None:
        super().__init__(channel, SMTPClient(), setup.trace)
        self.tls_fallback = False  # in plaintext after a failed opportunistic handshake
        self._setup = setup
        self._helo = setup.helo or _address_literal(channel)
        peer = channel.get_extra_info("peername")
        self.address: tuple[str, int] | None = (str(peer[0]), int(peer[1])) if peer else None

    @classmethod
    async def open(cls, host: str, port: int, setup: Setup) -> SMTPConnection:
        """A session with host:port, ready for MAIL; a ConnectionFailure says why not."""
        try:
            return await cls._open(host, port, setup, starttls=setup.tls != "none")
        except TLSFailed as failure:
            if setup.tls != "opportunistic":
                raise
            if setup.on_plaintext is not None:
                setup.on_plaintext(failure)
        connection = await cls._open(host, port, setup, starttls=False)
        connection.tls_fallback = True
        return connection

    @classmethod
    async def _open(cls, host: str, port: int, setup: Setup, *, starttls: bool
                    ) -> SMTPConnection:
        channel = await open_channel(host, port, setup.connect_timeout)
        connection = cls(channel, setup)
        try:
            connection.trace(channel.connected_line(host, port))
            await connection._start(host, starttls)
        except BaseException as exc:
            if isinstance(exc, ConnectionFailure):
                exc.address = connection.address
            connection.close(abort=True)
            raise
        return connection

    # --- What callers see -------------------------------------------------------

    @property
    def extensions(self) -> Extensions:
        return self.core.extensions

    async def reply(self, timeout: float) -> Response:
        """The next reply, waiting up to `timeout` seconds for its bytes.

        A 421 raises ServerClosing; EOF, a timeout or a protocol error raise a
        SessionLost. Either way the connection is closed.
        """
        event = await self.next_event(timeout)
        assert isinstance(event, Response)
        self.trace(f"S: {_shown(event)}")
        if event.reply.code == 421:
            self.close()
            raise ServerClosing(event)
        return event

    async def command(self, shown: str, timeout: float) -> Response:
        """Write what the core holds (`shown` in the trace), then read the next reply."""
        self.trace(f"C: {shown}")
        await self.flush(timeout)
        return await self.reply(timeout)

    async def quit(self) -> None:
        """Say QUIT when the session is fit for it, then close the connection."""
        if self._closed:
            return
        try:
            if self.core.state in _QUITTABLE:
                self.core.quit()
                await self.command("QUIT", min(self._setup.command_timeout, QUIT_TIMEOUT))
        except ConnectionFailure:
            pass
        finally:
            self.close()

    # --- Session set-up ---------------------------------------------------------

    async def _start(self, host: str, starttls: bool) -> None:
        setup = self._setup
        if setup.tls == "implicit":
            await self._handshake(host)
        greeting = await self.reply(setup.greeting_timeout)
        if greeting.reply.code != 220:
            raise await self._give_up(GreetingRefused(greeting))
        await self._hello()
        if starttls and not self.tls_active:
            await self._starttls(host)
        if setup.login is not None:
            await self._authenticate(*setup.login)

    async def _hello(self) -> None:
        timeout = self._setup.command_timeout
        self.core.ehlo(self._helo)
        response = await self.command(f"EHLO {self._helo}", timeout)
        if response.reply.code >= 500:
            # RFC 5321 3.2: a server that does not know EHLO gets HELO.
            self.core.helo(self._helo)
            response = await self.command(f"HELO {self._helo}", timeout)
        if response.reply.code // 100 != 2:
            raise await self._give_up(HelloRefused(response))

    async def _starttls(self, host: str) -> None:
        required = self._setup.tls == "required"
        if not self.core.extensions.starttls:
            if required:
                raise await self._give_up(TLSNotOffered())
            return
        self.core.starttls()
        response = await self.command("STARTTLS", self._setup.command_timeout)
        if response.reply.code != 220:
            refused = StartTLSRefused(response)
            if required:
                raise await self._give_up(refused)
            refused.address = self.address  # RFC 3207 4.1 leaves the choice to the client
            if self._setup.on_plaintext is not None:
                self._setup.on_plaintext(refused)
            return
        leftover = self.channel.take()
        if leftover:
            # Read as if it came over TLS, it would be injected: the core refuses it.
            self.core.receive_data(leftover)
            await self.reply(self._setup.command_timeout)  # raises ProtocolError
        await self._handshake(host)
        self.core.tls_started()
        await self._hello()  # RFC 3207 4.2: all knowledge from before TLS is void

    async def _handshake(self, host: str) -> None:
        setup = self._setup
        assert setup.tls_context is not None  # Setup checks it
        await self.start_tls(setup.tls_context, setup.tls_name or host, setup.command_timeout)

    async def _authenticate(self, user: str, password: str) -> None:
        if not self.tls_active:
            raise await self._give_up(AuthNeedsTLS())
        offered = self.core.extensions.auth_mechanisms
        mechanism = next((m for m in (PLAIN, LOGIN) if m in offered), None)
        if mechanism is None:
            raise await self._give_up(NoAuthMechanism(offered))
        try:
            exchange = ClientExchange(mechanism, user, password)
        except ValueError as exc:
            raise await self._give_up(UnusableLogin(str(exc))) from None
        timeout = self._setup.command_timeout
        self.core.auth(mechanism, exchange.initial_response())
        response = await self.command(f"AUTH {mechanism} (credentials hidden)", timeout)
        while response.reply.code == 334:
            try:
                self.core.auth_response(exchange.respond(response.reply.text))
            except SASLError:
                self.core.auth_response("*")  # RFC 4954 4: cancel
                await self.command("*", timeout)
                raise await self._give_up(BadChallenge(response.reply)) from None
            response = await self.command("(credentials hidden)", timeout)
        if response.reply.code // 100 != 2:
            raise await self._give_up(AuthRefused(response))

    async def _give_up(self, failure: ConnectionFailure) -> ConnectionFailure:
        """End a session that cannot serve, politely (QUIT), and the failure to raise."""
        await self.quit()
        return failure
