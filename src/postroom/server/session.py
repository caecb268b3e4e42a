"""What SMTP and POP3 sessions share: the connection slot, timed writes, STARTTLS, logins."""

from __future__ import annotations

import abc
import asyncio
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from postroom.defense.gate import Defense
from postroom.protocol import sasl
from postroom.protocol.replies import Reply
from postroom.server import metrics
from postroom.server.deadline import RequestDeadline
from postroom.server.limits import ConnectionLimiter
from postroom.server.stream import Stream
from postroom.store.api import Directory, user_key


@dataclass(kw_only=True)
class Service:
    """What every session of one listener shares."""

    name: str  # the listener's name in the config: "smtp", "submission", "pop3s", ...
    hostname: str
    directory: Directory  # logins
    limiter: ConnectionLimiter
    defense: Defense  # limits and failed logins, shared by every listener and process
    tls_context: ssl.SSLContext | None
    sessions: set[Any] = field(default_factory=set)
    draining: bool = False


def count_tls(listener: str, stream: Stream) -> None:
    """Count a completed handshake by its version and cipher (server.metrics)."""
    obj = stream.get_extra_info("ssl_object")
    if obj is not None:
        cipher = obj.cipher()
        metrics.recorder.tls(listener, str(obj.version()), cipher[0] if cipher else "unknown")


class Core(Protocol):
    """What this module asks of a sans-IO server core (SMTP or POP3)."""

    def data_to_send(self) -> bytes: ...
    def tls_started(self) -> None: ...


class Session(abc.ABC):
    """One connection of a Service from accept to close; a subclass drives its core."""

    log: ClassVar[logging.Logger]
    conn: Core

    def __init__(self, service: Service, stream: Stream, timeout: float) -> None:
        self.service = service
        self.stream = stream
        self.timeout = timeout  # for the client to take a reply, and for a TLS handshake
        peer = stream.get_extra_info("peername") or ("unknown", 0)
        self.client_ip = str(peer[0])
        self.client = f"[{self.client_ip}]:{peer[1] if len(peer) > 1 else 0}"
        self.user: str | None = None  # who logged in
        self.deadline = RequestDeadline()  # of the request being read
        self._exchange: sasl.ServerExchange | None = None
        self.locked_out = False  # too many failed logins from this address (defense.gate)

    # -- what a subclass supplies ------------------------------------------------

    @abc.abstractmethod
    def _refuse(self) -> None:
        """Queue the answer to a client over the connection limits."""

    async def _admitted(self) -> bool:
        """Whether the session may go on to its greeting (SMTP: defense.gate's checks at
        connect); when not, the answer is queued."""
        return True

    @abc.abstractmethod
    def _greet(self) -> None:
        """Queue the greeting (RFC 5321 4.3.1, RFC 1939 4)."""

    @abc.abstractmethod
    async def _loop(self) -> None:
        """Read and answer commands until the session ends."""

    @abc.abstractmethod
    def _ended(self) -> None:
        """The connection is over: let go of what the session holds."""

    # -- the connection ----------------------------------------------------------

    async def run(self) -> None:
        svc = self.service
        if not svc.limiter.acquire(self.client_ip):
            self.log.warning("%s: connection refused from %s: too many connections", svc.name,
                             self.client)
            self._refuse()
            await self._flush()
            self.stream.close()
            return
        svc.sessions.add(self)
        self.log.info("%s: connect from %s", svc.name, self.client)
        try:
            if await self._admitted():
                self._greet()
                await self._loop()
            else:
                await self._flush()
        except (ConnectionError, ssl.SSLError) as exc:
            self.log.info("%s: lost connection from %s: %s", svc.name, self.client, exc)
        finally:
            self._ended()
            svc.sessions.discard(self)
            svc.limiter.release(self.client_ip)
            self.stream.close()
            self.log.info("%s: disconnect from %s%s", svc.name, self.client,
                          f" user={self.user}" if self.user else "")

    async def _flush(self) -> bool:
        """Write what the core has to say; False when the connection is over."""
        out = self.conn.data_to_send()
        if not out:
            return True
        self.stream.write(out)
        return await self._drain()

    async def _drain(self) -> bool:
        """Wait until the client has taken what was written; one that takes nothing for
        `timeout` seconds is cut off. False when the connection is over."""
        try:
            await self.stream.drain(self.timeout)
        except TimeoutError:
            self.log.info("%s: timeout sending to %s: it reads nothing", self.service.name,
                          self.client)
            self.stream.abort()
            return False
        except (ConnectionError, ssl.SSLError):
            return False
        return True

    async def _start_tls(self, accept: Callable[[], None]) -> bool:
        """STARTTLS or STLS (RFC 3207 4, RFC 2595 4), offered only with a TLS context:
        `accept()` queues the go-ahead. Reading stops before it goes out, so that the
        ClientHello reaches TLS and not a plaintext buffer (server/stream.py). False
        when the go-ahead could not be sent; a failed handshake ends the session."""
        context = self.service.tls_context
        assert context is not None, "the core offers STARTTLS only with a TLS context"
        self.stream.pause_reading()
        accept()
        if not await self._flush():
            return False
        try:
            await self.stream.start_tls(context, self.timeout)
        except (ssl.SSLError, TimeoutError, ConnectionError, OSError) as exc:
            self.log.info("%s: TLS handshake failed with %s: %s", self.service.name,
                          self.client, exc)
            raise ConnectionResetError("TLS handshake failed") from exc
        self.conn.tls_started()
        count_tls(self.service.name, self.stream)
        return True

    def under_stress(self, limit: float) -> None:
        """Most connection slots are taken: the request being read gets at most `limit`."""
        if self.deadline.shorten(asyncio.get_running_loop().time(), limit):
            self.stream.restart_deadline(limit)

    # -- logins --------------------------------------------------------------------

    def _sasl_step(self, mechanism: str | None, response: str | None) -> Reply | sasl.Credentials:
        """One step of a SASL exchange (RFC 4422 3), `response` as the client sent it
        (base64): AUTH `mechanism` with its initial response, or (no mechanism) the
        answer to the last challenge. Gives the next 334 challenge, a 5xx refusal of
        what the client sent, or the credentials to check with `_login`."""
        try:
            if mechanism is not None:
                self._exchange = sasl.ServerExchange(mechanism)
                return self._exchange.start(response)
            assert self._exchange is not None, "the core passes a response only after a challenge"
            return self._exchange.respond(response or "")
        except sasl.SASLError as exc:
            self._exchange = None
            return exc.reply

    async def _login(self, name: str, password: str, acting_as: str = "") -> str | None:
        """The key of user `name` if `password` is theirs, else None (see `_checked`).
        Acting as another user (`acting_as`, a SASL authzid, RFC 4616 2) is refused
        as a wrong password is."""
        if await self._login_refused():
            return None
        key = user_key(name)
        same = not acting_as or user_key(acting_as) == key
        good = key is not None and same and await self.service.directory.verify_password(
            key, password)
        return await self._checked(name, key if good else None)

    async def _login_refused(self) -> bool:
        """Too many failed logins from this address (all processes): no check at all;
        `locked_out` tells the caller to answer so and close."""
        self.locked_out = await self.service.defense.login_refused(self.service.name,
                                                                   self.client_ip)
        return self.locked_out

    async def _checked(self, name: str, key: str | None) -> str | None:
        """After a credential check for `name`: `key` when it passed, else None once the
        delay for the failure has passed (policy.auth, counted by defense.anvil)."""
        svc = self.service
        metrics.recorder.auth(svc.name, key is not None)
        if key is not None:
            svc.defense.login_succeeded(self.client_ip, key)
            return key
        delay = await svc.defense.login_failed(self.client_ip, name)
        self.log.warning("%s: authentication failed for %r from %s (answer delayed %.1fs)",
                         svc.name, name, self.client, delay)
        if not self.stream.is_closing():  # else no one is left to answer
            await asyncio.sleep(delay)
        return None
